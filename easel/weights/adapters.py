"""The LoRA adapters loaded into a resident pipeline.

:class:`LoraState` loads each LoRA file once per pipeline as a named PEFT adapter (the name is
derived from the file's content hash / catalog key), activates the requested set with
``set_adapters(names, weights)`` and disables LoRA entirely when none is requested. Switching
adapters or scales never touches the base weights. Beyond ``max_resident`` adapters the least
recently used is deleted. The state remembers what the modules hold, so a task that asks for
the active set again makes no call at all (``set_adapters`` walks every LoRA layer: ~12 ms on
the tiny SD, more on real networks); it is the only writer of a pipeline's adapters.

With ``hotswap_rank`` set (the FLUX tools), the state holds **one adapter slot** instead: the
first LoRA is loaded after ``enable_lora_hotswap(target_rank=hotswap_rank)``, and every later
LoRA is *hot-swapped* into that slot (``load_lora_weights(..., hotswap=True)``): its weights are
copied into the existing LoRA layers, so a ``torch.compile``-d transformer is not recompiled. A
LoRA that cannot be hot-swapped (it targets modules the slot does not, or its rank exceeds
``hotswap_rank``) replaces the slot by an ordinary unload + load, which is logged and counted.

Follows diffusers' PEFT integration (``load_lora_weights``, ``set_adapters``, ``delete_adapters``);
Kohya/A1111 LoRA files are converted by diffusers' own loaders.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import NamedTuple, Protocol, Sequence

from easel import metrics

from easel.weights.lora_formats import LoraSource, loadable


class LoraLoad(NamedTuple):
    """One LoRA to make active: ``key`` identifies the weights (same key, same adapter), ``path``
    is the local file, ``scale`` the adapter weight (any float; 0 disables its effect)."""

    key: str
    path: str
    scale: float


class LoraPipeline(Protocol):
    """What :class:`LoraState` uses of a diffusers pipeline with LoRA support (SD, SDXL and Flux
    pipelines: diffusers' ``*LoraLoaderMixin``)."""

    @property
    def components(self) -> dict[str, object]: ...

    def load_lora_weights(self, pretrained_model_name_or_path_or_dict: LoraSource, adapter_name: str | None = None,
                          hotswap: bool = False) -> None: ...

    def set_adapters(self, adapter_names: list[str], adapter_weights: list[float] | None = None) -> None: ...

    def enable_lora(self) -> None: ...

    def disable_lora(self) -> None: ...

    def delete_adapters(self, adapter_names: str | list[str]) -> None: ...

    def get_list_adapters(self) -> dict[str, list[str]]: ...

    def enable_lora_hotswap(self, target_rank: int = 128, check_compiled: str = "error") -> None: ...


def adapter_name(key: str) -> str:
    """A PEFT-safe adapter name for a LoRA weights key (no dots; stable for the same file)."""
    return "lora_" + hashlib.sha256(key.encode()).hexdigest()[:16]


class LoraState:
    """The adapters loaded into one pipeline, and which are active at what scale."""

    SLOT = "easel_slot"

    def __init__(self, max_resident: int = 8, hotswap_rank: int | None = None):
        self.max_resident = max_resident
        self.hotswap_rank = hotswap_rank
        self._loaded: OrderedDict[str, None] = OrderedDict()
        self._slot_key: str | None = None  # the slot exists (an adapter structure is loaded)
        self._slot_state: tuple[str, float] | None = None  # what its weights hold now
        self.loads = 0
        self.hotswaps = 0
        self.adapter_sets = 0  # set_adapters calls (skipped when the requested set is already active)
        self.last_action = ""
        # (adapter names, weights) the modules hold now; None = unknown (forces set_adapters)
        self._active: tuple[tuple[str, ...], tuple[float, ...]] | None = None

    def apply(self, pipe: LoraPipeline, loras: Sequence[LoraLoad]) -> None:
        """Make exactly ``loras`` active on ``pipe``.

        Args:
            pipe: A diffusers pipeline with ``LoraLoaderMixin`` (SD, SDXL, Flux).
            loras: :class:`LoraLoad`\\ s; ``key`` identifies the weights (same key, same
                adapter), ``scale`` is the adapter weight (any float; 0 disables its effect).

        Raises:
            ValueError: the file's keys match no layout diffusers knows for this pipeline, or
                match no module of it (e.g. an SDXL LoRA on SD 1.5); the message names the file.
                In hot-swap mode, also more than one LoRA.
        """
        if self.hotswap_rank:
            self._apply_slot(pipe, loras)
            return
        names = []
        for key, path, _ in loras:
            name = adapter_name(key)
            if name not in self._loaded:
                self._evict(pipe, keep={adapter_name(k) for k, _, _ in loras})
                self._active = None  # diffusers activates what it loads: the active set is unknown now
                self._load(pipe, key, path, name)
                self._loaded[name] = None
            self._loaded.move_to_end(name)
            names.append(name)
        wanted = (tuple(names), tuple(float(s) for _, _, s in loras))
        if wanted == self._active:  # what the modules already hold: set_adapters would cost ~12 ms for nothing
            self.last_action = "adapters unchanged"
            return
        self._active = None  # unknown until this change succeeds
        if not names:
            if self._loaded:
                pipe.disable_lora()
            self._active = wanted
            self.last_action = "LoRA disabled"
            return
        pipe.enable_lora()
        pipe.set_adapters(list(names), adapter_weights=list(wanted[1]))
        self.adapter_sets += 1
        self._active = wanted
        self.last_action = "adapters set"

    def _apply_slot(self, pipe: LoraPipeline, loras: Sequence[LoraLoad]) -> None:
        """One adapter slot whose *weights* change, never its structure or its Python-level scale.

        A compiled transformer guards on the adapter's ``scaling`` value and on the LoRA on/off
        flag, so changing either recompiles it. The slot therefore keeps adapter weight 1.0 and
        stays enabled. The requested scale is folded into the freshly hot-swapped ``lora_B``
        weights (``B ← scale · B``, exactly ``scale · ΔW``), and "no LoRA" zeroes them.
        """
        if len(loras) > 1:
            raise ValueError("hot-swap mode holds one LoRA at a time")
        if not loras:
            if self._slot_key is not None and self._slot_state is not None:
                _scale_lora_b(pipe, self.SLOT, 0.0)
                self._slot_state = None  # the slot keeps its structure; its weights are zero
            self.last_action = "no LoRA"
            return
        key, path, scale = loras[0]
        if (key, scale) == self._slot_state:
            self.last_action = "LoRA already resident"
            return
        self._slot_state = None  # unknown until this change succeeds: a failure must not look resident
        if self._slot_key is None:
            self._load_slot(pipe, key, path)
            self.last_action = "LoRA loaded into the adapter slot"
        else:
            try:
                # Zero the slot first: a LoRA without weights for some module (e.g. no text-encoder
                # keys) leaves that module's previous LoRA weights in place otherwise (diffusers only
                # swaps the components the new file has keys for).
                _scale_lora_b(pipe, self.SLOT, 0.0)
                with _quiet_hotswap_errors():  # a refused swap is handled below and logged as an action
                    pipe.load_lora_weights(loadable(path), adapter_name=self.SLOT, hotswap=True)
                self.hotswaps += 1
                metrics.lora_hotswapped()
                self.last_action = "LoRA hot-swapped into the resident adapter slot"
            except Exception as exc:
                # diffusers removes the slot when a hot-swap fails; load the LoRA as a fresh adapter
                reason = str(exc).splitlines()[0][:200]
                _cleanup_failed(pipe, self.SLOT)
                self._slot_key = None
                self._load_slot(pipe, key, path)
                self.last_action = f"LoRA not hot-swappable ({reason}); adapter slot reloaded"
        if self._slot_key is None:  # a new adapter: weight 1.0 once, the scale lives in its weights
            pipe.enable_lora()
            pipe.set_adapters([self.SLOT], adapter_weights=[1.0])
        self._slot_key = key
        _scale_lora_b(pipe, self.SLOT, float(scale))
        self._slot_state = (key, scale)

    def _load_slot(self, pipe: LoraPipeline, key: str, path: str) -> None:
        """Load a fresh slot, prepared for compiled hot-swap every time (diffusers consumes the
        preparation at the first load, so a slot re-created after a non-hot-swappable LoRA would
        otherwise keep that LoRA's rank and Python-float scales, and later swaps would recompile)."""
        compiled = any(hasattr(m, "_orig_mod") or getattr(m, "_compiled_call_impl", None) is not None
                       for m in getattr(pipe, "components", {}).values())
        # a compiled transformer recompiles once for the new structure (counted as a reload), never again
        pipe.enable_lora_hotswap(target_rank=self.hotswap_rank, check_compiled="ignore" if compiled else "error")
        self._load(pipe, key, path, self.SLOT, covering=True)

    def _load(self, pipe: LoraPipeline, key: str, path: str, name: str, covering: bool = False) -> None:
        """Load the LoRA file as a new adapter ``name``; on failure leave no half-loaded adapter.
        ``covering``: the hot-swap slot, padded to every block layer (:func:`covering_state_dict`)."""
        try:
            pipe.load_lora_weights(covering_state_dict(pipe, path) if covering else loadable(path), adapter_name=name)
        except Exception as exc:
            _cleanup_failed(pipe, name)
            raise ValueError(f"LoRA {key} could not be loaded into {type(pipe).__name__}: {exc}") from None
        if not _adapter_present(pipe, name):
            raise ValueError(f"LoRA {key} matches no module of {type(pipe).__name__}: "
                             "it was made for another model family or has an unknown key layout")
        self.loads += 1
        metrics.lora_loaded()

    def _evict(self, pipe: LoraPipeline, keep: set[str]) -> None:
        while len(self._loaded) >= self.max_resident:
            victim = next((n for n in self._loaded if n not in keep), None)
            if victim is None:
                return
            pipe.delete_adapters(victim)
            del self._loaded[victim]
            self._active = None


# The layers a FLUX LoRA targets live in the transformer's blocks; the hot-swap slot covers all of them
SLOT_MODULE_PREFIXES = ("transformer_blocks.", "single_transformer_blocks.")


def covering_state_dict(pipe: LoraPipeline, path: str) -> LoraSource:
    """The LoRA at ``path`` as diffusers reads it, plus zero LoRA weights for every other
    ``Linear`` layer of the transformer's blocks (:data:`SLOT_MODULE_PREFIXES`), so the adapter
    slot it creates targets every layer a later LoRA may target.

    PEFT hot-swaps only into layers the resident adapter already has (a LoRA with weights for
    another layer is refused with "unexpected keys" and the slot must be reloaded, which recompiles
    a compiled transformer). Slots were shaped by the first LoRA: XLabs' RealismLora (the FLUX
    tool's default) has LoRA layers in the double blocks' attention only, so every LoRA reaching
    the single blocks (a preset's style LoRA, any ai-toolkit or Kohya LoRA) fell back. The
    added layers hold ``lora_B = 0``, so they change nothing (``ΔW = B·A = 0``); they cost
    memory and time like a LoRA of that rank on those layers (at rank 128 in bfloat16, about
    1.4 GB for FLUX.1-dev). A pipeline without a ``transformer`` (or a file diffusers cannot read)
    gets :func:`loadable`'s value unchanged.
    """
    import torch

    transformer = getattr(pipe, "transformer", None)
    if transformer is None or not hasattr(pipe, "lora_state_dict"):
        return loadable(path)
    try:
        state, alphas = pipe.lora_state_dict(loadable(path), return_alphas=True)
    except Exception:
        return loadable(path)  # load_lora_weights gives diffusers' own error, which the caller reports
    prefix = "transformer."
    ranks = [v.shape[0] for k, v in state.items() if k.startswith(prefix) and k.endswith("lora_A.weight")]
    if not ranks:
        return loadable(path)
    rank = min(ranks)
    covered = {k[len(prefix):-len(".lora_A.weight")] for k in state if k.startswith(prefix) and k.endswith(".lora_A.weight")}
    ref = next(v for k, v in state.items() if k.endswith("lora_A.weight"))
    out = dict(state)
    for name, module in transformer.named_modules():
        # a layer PEFT has wrapped before (a slot reloaded after a failed swap) holds its Linear as base_layer
        name = name.removesuffix(".base_layer")
        if isinstance(module, torch.nn.Linear) and name.startswith(SLOT_MODULE_PREFIXES) and ".lora_" not in name \
                and name not in covered:
            covered.add(name)
            out[f"{prefix}{name}.lora_A.weight"] = torch.zeros(rank, module.in_features, dtype=ref.dtype)
            out[f"{prefix}{name}.lora_B.weight"] = torch.zeros(module.out_features, rank, dtype=ref.dtype)
    out.update(alphas or {})
    return out


class _quiet_hotswap_errors:
    """Silence diffusers' ``logger.error("Hotswapping ... was unsuccessful")`` around a hot-swap
    attempt: Easel handles the refusal (the slot is reloaded, :attr:`LoraState.last_action` says
    why, in the task's ``debugoutput``); an ERROR line on stderr would reach ``debugerror`` of a
    task that succeeded."""

    def __enter__(self):
        import logging

        self.logger = logging.getLogger("diffusers.loaders.peft")
        self.level = self.logger.level
        self.logger.setLevel(logging.CRITICAL)

    def __exit__(self, *exc):
        self.logger.setLevel(self.level)
        return False


def _scale_lora_b(pipe: LoraPipeline, adapter: str, factor: float) -> None:
    """Multiply every ``lora_B`` weight of ``adapter`` in the pipeline's modules by ``factor`` in place."""
    import torch

    with torch.no_grad():
        for comp in getattr(pipe, "components", {}).values():
            if not hasattr(comp, "modules"):
                continue
            for module in comp.modules():
                lora_b = getattr(module, "lora_B", None)
                if lora_b is not None and hasattr(lora_b, "keys") and adapter in lora_b.keys():
                    lora_b[adapter].weight.mul_(factor)


def _adapter_present(pipe: LoraPipeline, name: str) -> bool:
    try:
        return any(name in names for names in pipe.get_list_adapters().values())
    except Exception:
        return False


def _cleanup_failed(pipe: LoraPipeline, name: str) -> None:
    try:
        if _adapter_present(pipe, name):
            pipe.delete_adapters(name)
    except Exception:
        pass
