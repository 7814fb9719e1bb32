"""``easel projects create | nonce-policy | rotate-key``: projects (API key + secret) in the store."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from easel.cli.common import console, settings_for

app = typer.Typer(help="Manage projects (API key + secret).", no_args_is_help=True)


def _store(settings):
    """The migrated store of ``settings``, able to open the projects' sealed secrets."""
    from easel.store import SecretBox, Store

    store = Store(settings.core.database_url, secrets=SecretBox.for_settings(settings.core))
    store.migrate()
    return store


@app.command("create")
def create(
    name: str,
    data_dir: Optional[Path] = typer.Option(None, help="[env EASEL_DATA_DIR; default easel-data]"),
    auth: str = typer.Option("signature", help="signature or apikey"),
    nonce_policy: str = typer.Option("lenient", help="Signature projects: lenient (any nonce, reusable: what "
                                                     "Wiro's own clients need) or strict (each nonce once; "
                                                     "timestamp nonces within EASEL_NONCE_WINDOW_SECONDS)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
):
    """Create a project and print its apikey and apisecret."""
    store = _store(settings_for(data_dir))
    if auth not in ("signature", "apikey"):
        raise typer.BadParameter("must be 'signature' or 'apikey'", param_hint="--auth")
    if nonce_policy not in ("lenient", "strict"):
        raise typer.BadParameter("must be 'lenient' or 'strict'", param_hint="--nonce-policy")
    p = store.create_project(name, auth, nonce_policy)
    info = {"id": p.id, "name": p.name, "apikey": p.apikey, "apisecret": p.apisecret, "auth": p.auth_mode,
            "nonce_policy": p.nonce_policy}
    if as_json:
        print(json.dumps(info))
    else:
        for k, v in info.items():
            console.print(f"{k}: {v}")


@app.command("nonce-policy")
def nonce_policy(
    apikey: str = typer.Argument(..., help="The project's API key."),
    policy: str = typer.Argument(..., help="lenient or strict"),
    data_dir: Path = typer.Option(Path("easel-data")),
):
    """Change a project's nonce policy (projects made before 0.3 are lenient after the upgrade)."""
    if policy not in ("lenient", "strict"):
        raise typer.BadParameter("must be 'lenient' or 'strict'", param_hint="POLICY")
    project = _store(settings_for(data_dir)).set_nonce_policy(apikey, policy)
    if project is None:
        console.print("[red]no project has this API key")
        raise typer.Exit(1)
    console.print(f"{project.name}: nonce policy {project.nonce_policy}")


@app.command("rotate-key")
def rotate_key(
    data_dir: Optional[Path] = typer.Option(None, help="[env EASEL_DATA_DIR; default easel-data]"),
    new: bool = typer.Option(False, "--new", help="First put a new key first in the key file (secret.key)."),
    drop_old: bool = typer.Option(False, "--drop-old", help="Then keep only the first key in the key file."),
):
    """Re-encrypt every project's API secret with the first operator key (docs/configuration.md)."""
    from easel.cli.keys import rotate_key as rotate

    done = rotate(settings_for(data_dir), new=new, drop_old=drop_old)
    console.print(f"{done.projects} API secret(s) re-encrypted with the first key of {done.source}"
                  + (f"; {done.dropped} old key(s) removed from it" if done.dropped else ""), soft_wrap=True)
