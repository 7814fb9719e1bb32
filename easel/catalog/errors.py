"""The catalog's two errors: a request value that does not fit a tool's schema, and a catalog
entry that cannot be used as configured."""
from __future__ import annotations


class InputError(ValueError):
    """A request value that does not fit the tool's schema.

    Attributes:
        field: The request field name.
        message: Wiro-style message, e.g. ``Request parameter [steps] must be between 1 and 150``.
    """

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field
        self.message = message


class CatalogError(RuntimeError):
    """A catalog entry cannot be used as configured (e.g. its weights source is unknown)."""
