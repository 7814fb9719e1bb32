"""The registered tools, found through the ``easel.tools`` entry-point group, and every registry
built from their declarations: the model families (the Celery queues), the precision table, the
tiny stand-ins and the preview factors. No list elsewhere names a tool or a family.

A package adds a tool by declaring, in its ``pyproject.toml``::

    [project.entry-points."easel.tools"]
    my_tool = "my_package.my_tool"

The module must expose ``TOOL`` (an :class:`easel.tools.base.ToolDeclaration`), ``prepare`` and
``run`` (see :mod:`easel.tools.base`). The built-in tools register the same way (Easel's own
``pyproject.toml``). Importing a tool module must not import torch (the API process lists tools).
"""
from __future__ import annotations

import importlib
import json
import threading
import typing
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from .base import SCHEMA_TYPES, DtypeKind, Family, ToolDeclaration, ToolInputs

if TYPE_CHECKING:  # pragma: no cover
    from .base import ToolContext

GROUP = "easel.tools"


class RegistryError(RuntimeError):
    """A tool plug-in that does not keep the contract (names the entry point and what is wrong)."""


@dataclass(frozen=True)
class RegisteredTool:
    """A registered tool: its declaration and its module (whose ``prepare``/``run`` are looked up
    at each call, so a test may replace them)."""

    declaration: ToolDeclaration
    module: ModuleType

    @property
    def name(self) -> str:
        return self.declaration.name

    def parse(self, validated: dict[str, object]) -> ToolInputs:
        """The typed inputs from ``ToolSpec.validate``'s output (see ``ToolInputs.from_validated``)."""
        return self.declaration.inputs.from_validated(validated)

    def prepare(self, inputs: "dict[str, object] | ToolInputs", ctx: "ToolContext") -> object:
        """The module's ``prepare`` on the typed inputs (a validated dict is parsed first)."""
        typed = inputs if isinstance(inputs, ToolInputs) else self.parse(inputs)
        return self.module.prepare(typed, ctx)

    def run(self, plan: object, ctx: "ToolContext") -> list[Path]:
        """The module's ``run``."""
        return self.module.run(plan, ctx)


_lock = threading.Lock()
_tools: dict[str, RegisteredTool] | None = None


def check_inputs(declaration: ToolDeclaration, schema: dict) -> None:
    """Check a tool's inputs class against its catalog file: the same field names, and each
    field's type the one ``ToolSpec.validate`` produces for the input's schema type.

    Raises:
        RegistryError: naming the tool and every mismatch.
    """
    cls = declaration.inputs
    hints = typing.get_type_hints(cls)
    fields = {n: hints[n] for n in cls.model_fields if n not in cls.NOT_IN_SCHEMA}
    inputs = {i["name"]: i["type"] for i in schema.get("inputs", [])}
    problems = [f"{n}: in the catalog file, not in {cls.__name__}" for n in inputs if n not in fields]
    problems += [f"{n}: in {cls.__name__}, not in the catalog file" for n in fields if n not in inputs]
    for name, kind in inputs.items():
        if name in fields and SCHEMA_TYPES.get(kind) != fields[name]:
            problems.append(f"{name}: the catalog type {kind!r} gives {SCHEMA_TYPES.get(kind)}, "
                            f"{cls.__name__} says {fields[name]}")
    if f"{schema.get('owner')}/{schema.get('slug')}" != declaration.name:
        problems.append(f"the catalog file is {schema.get('owner')}/{schema.get('slug')}")
    if schema.get("family") and schema["family"] != declaration.family.name:
        problems.append(f"the catalog file's family {schema['family']!r} is not the declared {declaration.family.name!r}")
    if problems:
        raise RegistryError(f"tool {declaration.name} ({declaration.catalog}) does not match its schema: "
                            + "; ".join(problems))


def _register(name: str, module_name: str) -> RegisteredTool:
    module = importlib.import_module(module_name)
    declaration = getattr(module, "TOOL", None)
    if not isinstance(declaration, ToolDeclaration):
        raise RegistryError(f"entry point {name} ({module_name}): TOOL is not a ToolDeclaration")
    for fn in ("prepare", "run"):
        if not callable(getattr(module, fn, None)):
            raise RegistryError(f"entry point {name} ({module_name}) has no {fn}(…) function")
    try:
        schema = json.loads(Path(declaration.catalog).read_text())
    except (OSError, ValueError) as exc:
        raise RegistryError(f"tool {declaration.name}: catalog file {declaration.catalog}: {exc}") from None
    if schema.get("module") and schema["module"] != module_name:
        raise RegistryError(f"tool {declaration.name}: its catalog file names module {schema['module']}, "
                            f"the entry point {module_name}")
    check_inputs(declaration, schema)
    return RegisteredTool(declaration, module)


def tools() -> dict[str, RegisteredTool]:
    """Every registered tool, ``owner/slug`` → :class:`RegisteredTool`, in entry-point name order.

    Raises:
        RegistryError: a plug-in that breaks the contract, or two plug-ins for one tool.
    """
    global _tools
    with _lock:
        if _tools is None:
            found: dict[str, RegisteredTool] = {}
            for ep in sorted(entry_points(group=GROUP), key=lambda e: e.name):
                tool = _register(ep.name, ep.value.split(":")[0])
                if tool.name in found and found[tool.name].module is not tool.module:
                    raise RegistryError(f"tool {tool.name} is registered twice ({found[tool.name].module.__name__}, "
                                        f"{tool.module.__name__})")
                found[tool.name] = tool
            _tools = found
        return _tools


def reset() -> None:
    """Forget what was found (after a plug-in was installed or removed in this process)."""
    global _tools
    with _lock:
        _tools = None
    from easel.catalog import load_tools

    load_tools.cache_clear()


def families() -> dict[str, Family]:
    """Every family a registered tool declares (its own or one it uses), name → :class:`Family`:
    the checkpoint families in the model catalog's order (``easel.catalog.CHECKPOINT_KINDS``;
    the first is the default queue), then the families of tools whose pipelines are more than a
    checkpoint, by name.

    Raises:
        RegistryError: two different declarations under one family name.
    """
    found: dict[str, Family] = {}
    for tool in tools().values():
        for family in tool.declaration.families:
            if found.setdefault(family.name, family) != family:
                raise RegistryError(f"family {family.name} is declared twice, differently "
                                    f"(last by {tool.name})")
    from easel.catalog import CHECKPOINT_KINDS

    def order(name: str) -> tuple[int, str]:
        return (CHECKPOINT_KINDS.index(name) if name in CHECKPOINT_KINDS else len(CHECKPOINT_KINDS), name)

    return {name: found[name] for name in sorted(found, key=order)}


def random_families() -> tuple[str, ...]:
    """The families ``easel.synthetic.fullsize`` writes random full-size weights for (declared with
    ``Family.random``), in :func:`families`' order: the ``random`` model source's and ``easel models
    make-random``'s choices."""
    return tuple(name for name, family in families().items() if family.random)


def dtype_kinds() -> dict[str, DtypeKind]:
    """The precision table: every family's row and its components' rows, kind → :class:`DtypeKind`.

    Raises:
        RegistryError: one kind declared with two different rows.
    """
    rows: dict[str, DtypeKind] = {}
    for family in families().values():
        for row in (family.precision, *family.components):
            if rows.setdefault(row.name, row) != row:
                raise RegistryError(f"precision kind {row.name} is declared twice, differently")
    return rows
