"""How the CLI prints a listing: a Rich table on a terminal, and whole values, tab-separated and
one row a line, anywhere else (a pipe, a file, CI logs), where a table cut to the terminal's
80 columns would lose values."""
from __future__ import annotations

from typing import Iterable, Sequence


def print_rows(console, header: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    """Print ``rows`` under ``header``: a table when ``console`` is a terminal, else tab-separated
    lines with Rich markup (``[yellow]``…) removed. Values are printed with ``str``."""
    rows = [tuple(map(str, row)) for row in rows]
    if not console.is_terminal:
        from rich.text import Text

        for row in (tuple(header), *rows):
            print("\t".join(Text.from_markup(value).plain for value in row))
        return
    from rich.table import Table

    table = Table(*header)
    for row in rows:
        table.add_row(*row)
    console.print(table)
