"""What every ``easel`` command group shares: the console, settings from flags, the config file and
the environment (a bad value is a usage error naming the variable, never a traceback), the
start-up checks of ``serve`` and ``worker``, and following a task from the shell."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from easel.cli.follow import follow

console = Console()

BROKER = typer.Option(None, "--broker", help="Celery broker URL: redis://host:6379/0 or amqp://user:pass@host/ "
                                             "[env EASEL_BROKER_URL; default redis://127.0.0.1:6379/0].")


def settings_from(config: Optional[Path], **kw):
    """:class:`easel.config.Settings` from the config file and environment, with the flags that
    were given (``kw``, None values ignored by ``Settings.from_env``) on top.

    Raises:
        typer.BadParameter: a value of the wrong type, naming the variable (exit code 2).
    """
    from easel.config import Settings

    try:
        return Settings.from_env(config, **kw)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


def checked(check, *args):
    """``check(*args)`` (a settings check that lives with the module it needs, e.g.
    :func:`easel.store.notify.check_live`), its ``ValueError`` turned into a usage error (exit code 2)
    with the same message."""
    try:
        return check(*args)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


def settings_for(data_dir: Optional[Path], **kw):
    """:func:`settings_from` without a config file flag (``EASEL_CONFIG_FILE`` still applies)."""
    return settings_from(None, data_dir=data_dir, **kw)


def sources(config: Optional[Path]) -> dict:
    """What the config file and the environment set (:func:`easel.config.read_sources`); a bad
    value raises ``typer.BadParameter`` as :func:`settings_from` does."""
    from easel.config import read_sources

    try:
        return read_sources(config)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


def csv(value: Optional[str]) -> Optional[tuple[str, ...]]:
    """A comma-separated flag as a tuple of its non-empty items (None when the flag was not given)."""
    return tuple(x.strip() for x in value.split(",") if x.strip()) if value else None


def check_storage(settings) -> None:
    """Stop with the reason (exit code 2) when the configured storage cannot be used, e.g. an S3
    bucket that does not exist or refuses these credentials: better at start than at the first Run."""
    from easel.storage import create_storage

    try:
        create_storage(settings).check()
    except OSError as exc:
        console.print(f"[red]Storage unusable: {exc}")
        raise typer.Exit(2) from None


def follow_task(client, taskid: str, tasktoken: str) -> dict:
    """Follow a task until it ends and return its Task/Detail: a live bar on a terminal, a line
    per phase and every few seconds otherwise (:func:`easel.cli.follow.follow`)."""
    return follow(client, taskid, tasktoken, console)
