"""``Settings.weights``: where model weights come from and how the weights cache behaves."""
from __future__ import annotations

from dataclasses import dataclass, field

CPU_PRECISIONS = ("float32", "half")  # WeightsSettings.cpu_precision's values (easel.weights.precision)


def check_cpu_precision(value: str) -> str:
    """``value`` if it is one of :data:`CPU_PRECISIONS`.

    Raises:
        ValueError: any other value (the message lists the accepted ones).
    """
    if value not in CPU_PRECISIONS:
        raise ValueError(f"cpu_precision must be one of {', '.join(CPU_PRECISIONS)}, not {value!r}")
    return value


@dataclass(frozen=True)
class WeightsSettings:
    """The weights sources' and the pipeline cache's settings (``easel.weights``).

    Attributes:
        model_source: ``"tiny"`` resolves every catalog id to the offline tiny model of its
            family; ``"hub"`` downloads the real weights with huggingface_hub on first use;
            ``"random"`` resolves every id to a random-weight network of its family at the
            published size (``easel.synthetic.fullsize``: real speed and memory, noise images).
        random_model_size: ``full`` (published sizes) or ``small`` (same architecture, narrow
            layers) for ``model_source="random"``.
        accept_licenses: Licence names (the catalog entries' ``license.accept``: ``flux.1-dev``,
            ``antelopev2``, ``bria-rmbg-1.4`` ...; ``all`` for every one) the operator accepts;
            weights under another such licence are not fetched and a Run needing them fails
            saying how to accept (``EASEL_ACCEPT_LICENSES=flux.1-dev,antelopev2``).
        lora_max_bytes: Size cap of a LoRA downloaded from a user URL, in bytes.
        download_reserve_bytes: Bytes a weights download must leave free on its disk (checked
            before it starts).
        weights_max_bytes: Size cap of one weights file from a catalog ``url`` source.
        weights_fetch_timeout_seconds: Time limit of one catalog ``url`` download.
        pipeline_cache_bytes: Memory budget of warm pipelines (weights' bytes), LRU-evicted.
        device_memory_headroom_bytes: On CUDA, device memory a worker keeps free for a task's
            activations: before a model loads, warm ones are evicted until the device's actually
            free memory (the driver's count, so another worker on the GPU counts) holds the new
            weights plus this much.
        max_resident_loras: LoRA adapters kept loaded per pipeline before the LRU one is deleted.
        lora_hotswap_rank: Highest LoRA rank the FLUX tools' hot-swap slot takes (adapters are
            zero-padded to it; a higher-rank LoRA is loaded the slow way).
        torch_compile: ``torch.compile`` the FLUX transformer (CUDA or CPU; LoRA changes then
            hot-swap without recompiling).
        cpu_offload: Force ``enable_model_cpu_offload`` for FLUX (it is also chosen automatically
            when the GPU's memory is below the weights' size plus 25 %).
        cpu_precision: Dtypes of the networks on a machine without CUDA: ``float32`` (default) or
            ``half``, the dtypes CUDA uses (bf16 for FLUX, fp16 for SD 1.5 / SDXL, IC-Light's
            bf16 VAE...), so the GPU path's dtype combinations run on the CPU (slowly); for tests
            and debugging. No effect with CUDA. See ``easel.weights.precision``.
    """

    model_source: str = "tiny"
    random_model_size: str = "full"
    accept_licenses: tuple[str, ...] = field(default_factory=tuple)
    lora_max_bytes: int = 2 * 1024**3
    download_reserve_bytes: int = 512 * 1024**2
    weights_max_bytes: int = 64 * 1024**3
    weights_fetch_timeout_seconds: float = 6 * 3600.0
    pipeline_cache_bytes: int = 16 * 1024**3
    device_memory_headroom_bytes: int = 3 * 1024**3
    max_resident_loras: int = 8
    lora_hotswap_rank: int = 128
    torch_compile: bool = False
    cpu_offload: bool = False
    cpu_precision: str = "float32"

    def __post_init__(self) -> None:
        if self.model_source not in ("tiny", "hub", "random"):
            raise ValueError(f"model_source must be 'tiny', 'hub' or 'random', not {self.model_source!r}")
        if self.random_model_size not in ("full", "small"):
            raise ValueError(f"random_model_size must be 'full' or 'small', not {self.random_model_size!r}")
        check_cpu_precision(self.cpu_precision)
