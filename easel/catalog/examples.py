"""A tool's example request: the ``example`` object of its catalog file.

The seed page's own request (its curl body, quirks included: string numbers, the callback
sentence) and the input files it names, shipped beside the catalog file::

    "example": {
     "request": {"prompt": "a woman", "inputImageUrl": "bg-img2.png", ...},
     "files": {"bg-img2.png": "examples/bg-img2.png"}
    }

``files`` maps the name a request value uses to a path relative to the catalog file's folder; a
client uploads each file first (``POST /v1/File/Upload``) and sends the request as it is, the
file names resolving to the uploads. ``easel demo``, the fleet tests and the benchmarks read it
(:attr:`easel.catalog.ToolSpec.example`), so a tool, built-in or a plug-in package, brings its own
example and nothing else names it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping


@dataclass(frozen=True)
class Example:
    """A tool's example request and the input files it names.

    Attributes:
        request: the Run body, field name → value as the seed's curl sends it (JSON types).
        files: file name used in ``request`` → absolute path of the shipped file.
    """

    request: Mapping[str, object]
    files: Mapping[str, Path] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: Mapping[str, object] | None, folder: Path) -> "Example | None":
        """The ``example`` object of a catalog file (None when the file has none).

        Args:
            data: the object: ``{"request": {...}, "files"?: {name: relative path}}``.
            folder: the catalog file's folder, which ``files`` paths are relative to.

        Raises:
            ValueError: ``request`` is not an object, or ``files`` is not an object of strings.
        """
        if data is None:
            return None
        request, files = data.get("request"), data.get("files", {})
        if not isinstance(request, dict):
            raise ValueError("example.request must be an object (the tool's Run body)")
        if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
            raise ValueError("example.files must map file names to paths relative to the catalog file")
        return cls(dict(request), {str(name): Path(folder) / rel for name, rel in files.items()})

    def read_files(self) -> dict[str, bytes]:
        """File name → contents of every file the request names.

        Raises:
            OSError: a listed file is missing from the tool's package.
        """
        return {name: path.read_bytes() for name, path in self.files.items()}
