"""The tool catalog (one JSON file per tool) and the global model catalog (ids shared by all tools).

Data lives beside this module: ``tools/<owner>__<slug>.json`` and ``models.json``. An operator
override file (``Settings.catalog_override``) is merged over ``models.json`` at start-up, so a
community model whose source is unknown can be pointed at its weights without editing the package.

Validation turns raw request values (already parsed from JSON, multipart or form bodies by
``easel.api``) into typed tool inputs, raising :class:`InputError` that names the field and what
it accepts, with Wiro's documented message wording.

Modules: ``models`` (the model catalog and its kinds), ``toolspec`` (a tool's catalog file,
:meth:`ToolSpec.validate`, :func:`load_tools`), ``inputs`` (one input and the coercion of raw
values), ``errors``, ``examples`` (a tool's example request), ``limits`` (length caps), ``rules``
(checks across the inputs of one tool). Everything public is re-exported here.
"""
from __future__ import annotations

from .errors import CatalogError, InputError
from .examples import Example
from .inputs import InputSpec
from .models import CHECKPOINT_KINDS, COMPONENT_KINDS, HERE, KINDS, LORA_KINDS, ModelCatalog, ModelEntry
from .toolspec import ToolSpec, load_tools

__all__ = ["CHECKPOINT_KINDS", "COMPONENT_KINDS", "CatalogError", "Example", "HERE", "InputError", "InputSpec",
           "KINDS", "LORA_KINDS", "ModelCatalog", "ModelEntry", "ToolSpec", "families", "load_tools"]


def families() -> tuple[str, ...]:
    """The model families: what a worker keeps warm; a fleet has one queue per family
    (``easel.executors.celery``). Built from the registered tools' declarations
    (:func:`easel.tools.registry.families`; a tool whose pipeline is more than a checkpoint
    declares a family of its own), the default queue first."""
    from easel.tools.registry import families as declared

    return tuple(declared())


def __getattr__(name: str) -> tuple[str, ...]:
    """``FAMILIES``: :func:`families`, computed when first asked (the registry imports the tools)."""
    if name == "FAMILIES":
        return families()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
