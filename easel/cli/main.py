"""The ``easel`` command: one Typer app assembled from the command groups, each in its own module.

``serve`` (:mod:`easel.cli.serve`), ``worker`` (:mod:`easel.cli.worker`), ``run``
(:mod:`easel.cli.run`), ``demo`` (:mod:`easel.cli.demo`), and the groups ``projects``
(:mod:`easel.cli.projects`), ``models`` (:mod:`easel.cli.models`) and ``tasks``
(:mod:`easel.cli.tasks`). What they share is in :mod:`easel.cli.common`.
"""
from __future__ import annotations

import sys

import typer

from easel.cli import demo, models, projects, run, serve, tasks, worker
from easel.cli.common import console

app = typer.Typer(help="Easel: a self-hostable image-generation server speaking the Wiro tool API.",
                  no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None)
app.command()(serve.serve)
app.command()(worker.worker)
app.command()(run.run)
app.command()(demo.demo)
app.add_typer(projects.app, name="projects")
app.add_typer(models.app, name="models")
app.add_typer(tasks.app, name="tasks")


def main() -> None:
    """Run the ``easel`` command; a missing or wrong operator key for the API secrets is a line
    saying what to do (exit code 2), not a traceback."""
    from easel.store.secretbox import SecretKeyError

    try:
        app()
    except SecretKeyError as exc:
        console.print(f"[red]API secrets: {exc}", soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
