"""``easel models pull | list | set | make-tiny | make-random``: fetch catalog weights ahead of time
(with progress bars, licence acceptance, resume and hash checks), show every id's source status,
point an id at its weights in the operator's override file, and write the tiny or full-size
random-weight models."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                           TransferSpeedColumn)

from easel.cli.common import console, settings_from
from easel.cli.output import print_rows

app = typer.Typer(help="Model utilities.", no_args_is_help=True)

_DATA = typer.Option(None, "--data-dir", help="Data directory [env EASEL_DATA_DIR; default easel-data].")
_CONFIG = typer.Option(None, "--config", help="TOML file of settings [env EASEL_CONFIG_FILE].")


def _source_text(source: Optional[dict]) -> str:
    if not source:
        return "none"
    if source.get("type") == "url":
        return source["url"]
    text = f"{'dataset:' if source.get('repo_type') == 'dataset' else ''}{source['repo']}"
    files = source.get("files") or ([source["weight_name"]] if source.get("weight_name") else [])
    if len(files) == 1:
        text += f":{files[0]}"
    if source.get("revision") and source["revision"] != "main":
        text += f"@{source['revision']}"
    return text


def _raw_catalog() -> dict:
    """The built-in catalog's JSON entries (with their display-only fields: approx_bytes, verified)."""
    return json.loads((Path(__file__).parent.parent / "catalog" / "models.json").read_text())["models"]


def _load(config, data_dir):
    """The settings (hub weights) and the weights sources the model commands work with."""
    from easel.catalog import ModelCatalog
    from easel.weights.sources import ModelSources

    settings = settings_from(config, data_dir=data_dir, model_source="hub")
    return settings, ModelSources(settings, ModelCatalog.load(settings.core.catalog_override))


@app.command("make-tiny")
def make_tiny_cmd(folder: Path, force: bool = typer.Option(False, help="Rewrite even if present.")):
    """Write the tiny random-weight models (noise images; for offline tests and demos)."""
    from easel.synthetic.tiny import make_tiny

    for name, path in make_tiny(folder, force=force).items():
        console.print(f"{name}: {path}")


@app.command("make-random")
def make_random_cmd(
    folder: Path,
    family: str = typer.Option(..., help="A model family the tools declare with random full-size weights "
                                          "(an unknown one is refused, naming those that are)."),
    size: str = typer.Option("full", help="full (published sizes) or small (same architecture, narrow layers)."),
    device: str = typer.Option("cpu", help="Where to build the weights: cpu, cuda, cuda:1 ..."),
    dtype: str = typer.Option("", help="fp32, fp16 or bf16; default fp32 on CPU, bf16 for flux / fp16 otherwise on CUDA."),
    force: bool = typer.Option(False, help="Rewrite even if present."),
):
    """Write a random-weight pipeline at its family's published size (diffusers folder + LoRAs)."""
    import torch

    from easel.synthetic.fullsize import SIZES, make_random
    from easel.tools.registry import random_families

    dtypes = {"": None, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    families = random_families()
    if family not in families:
        raise typer.BadParameter(f"must be one of {', '.join(families)}", param_hint="--family")
    if size not in SIZES:
        raise typer.BadParameter(f"must be one of {', '.join(SIZES)}", param_hint="--size")
    if dtype not in dtypes:
        raise typer.BadParameter("must be fp32, fp16 or bf16", param_hint="--dtype")
    path = make_random(folder, family, size, device=device, dtype=dtypes[dtype], force=force)
    console.print(f"{family}-{size}: {path}")
    console.print((path / "easel-random.json").read_text())


@app.command("pull")
def pull(
    ids: Optional[list[str]] = typer.Argument(None, help="Catalog ids to fetch."),
    tool: Optional[str] = typer.Option(None, "--tool", help="OWNER/SLUG: what its seed page's own request loads."),
    seeds: bool = typer.Option(False, "--seeds", help="Everything the five seed pages' own example requests load."),
    all_: bool = typer.Option(False, "--all", help="Every id with a public source."),
    accept_license: list[str] = typer.Option([], "--accept-license", help="Accept a licence by name (see "
                                              "`easel models list`), e.g. flux.1-dev; repeat or comma-separate; "
                                              "recorded in the data directory for the server too."),
    data_dir: Optional[Path] = _DATA,
    config: Optional[Path] = _CONFIG,
):
    """Download catalog weights now (exactly the files the pipelines load), with a progress bar per
    file; an interrupted pull resumes; two pulls or a pull and a worker never fetch a file twice."""
    from easel.catalog import CatalogError, InputError, load_tools
    from easel.weights.download import human_size
    from easel.weights.needs import run_needs

    settings, sources = _load(config, data_dir)
    catalog = sources.catalog
    wanted = list(ids or [])
    tools = load_tools()
    try:
        if tool:
            if tool not in tools:
                raise typer.BadParameter(f"unknown tool {tool!r}; tools: {', '.join(sorted(tools))}",
                                         param_hint="--tool")
            wanted += run_needs(tools[tool], _example(tools[tool]), catalog)
        if seeds:
            for spec in tools.values():
                if spec.example is not None:
                    wanted += run_needs(spec, _example(spec), catalog)
    except InputError as exc:
        raise typer.BadParameter(exc.message) from None
    if all_:
        wanted += [mid for mid, e in catalog.entries.items() if e.source]
    wanted = list(dict.fromkeys(wanted))
    if not wanted:
        raise typer.BadParameter("name catalog ids, or use --tool, --seeds or --all")
    unknown = [m for m in wanted if m not in catalog.entries]
    if unknown:
        raise typer.BadParameter(f"not in the catalog: {', '.join(unknown)}")
    names = [n.strip() for item in accept_license for n in item.split(",") if n.strip()]
    if names:
        sources.record_license(names)
        console.print(f"accepted licences: {', '.join(names)}")
    failed = []
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
               TimeRemainingColumn())
    with Progress(*columns, console=console) as bars:
        for mid in wanted:
            entry = catalog.get(mid)
            bars_of: dict = {}

            def on_file(f, mid=mid) -> None:
                bars_of[f.path] = bars.add_task(f"{mid} {f.path}", total=f.size or None)

            def on_bytes(f, n: int) -> None:
                bars.advance(bars_of[f.path], n)

            def progress(done: int, total: int, mid=mid) -> None:  # URL sources: one file, no on_file
                if not bars_of:
                    bars_of["url"] = bars.add_task(mid, total=total or None)
                if "url" in bars_of:
                    bars.update(bars_of["url"], completed=done, total=total or None)

            sources.progress, sources.on_file, sources.on_bytes = progress, on_file, on_bytes
            try:
                here = sources.is_local(entry)
                path = sources.resolve(entry)
                console.print(f"[green]{mid}[/green] ({entry.label}): {path}{' (already here)' if here else ''}")
            except CatalogError as exc:
                failed.append(mid)
                console.print(f"[red]{mid}[/red] ({entry.label}): {exc}")
            finally:
                sources.progress = sources.on_file = sources.on_bytes = None
    if failed:
        console.print(f"[red]not fetched: {', '.join(failed)}")
        raise typer.Exit(1)
    raw = _raw_catalog()
    total = sum(raw.get(m, {}).get("approx_bytes") or 0 for m in wanted)
    console.print(f"all {len(wanted)} ready" + (f" (~{human_size(total)})" if total else ""))

@app.command("list")
def list_(
    as_json: bool = typer.Option(False, "--json", help="A JSON array, one object per id."),
    data_dir: Optional[Path] = _DATA,
    config: Optional[Path] = _CONFIG,
):
    """Every catalog id: kind, weights source (or why there is none), licence, size, and whether
    it is on this machine."""
    from easel.weights.download import human_size
    from easel.weights.licenses import accepted_licenses

    settings, sources = _load(config, data_dir)
    raw = _raw_catalog()
    accepted = accepted_licenses(settings.weights, settings.core.models_dir)
    rows = []
    for mid, entry in sources.catalog.entries.items():
        lic = entry.license or {}
        extra = raw.get(mid, {})
        rows.append({"id": mid, "kind": entry.kind, "label": entry.label, "source": entry.source,
                     "license": lic or None, "license_accepted": (not lic.get("accept")) or
                     lic["accept"].lower() in accepted or "all" in accepted,
                     "approx_bytes": extra.get("approx_bytes"), "verified": extra.get("verified", ""),
                     "local": sources.is_local(entry), "why": "" if entry.source else entry.why})
    if as_json:
        print(json.dumps(rows, indent=1))
        return
    lines = []
    for r in rows:
        lic = r["license"] or {}
        licence = lic.get("id", "")
        if lic.get("accept"):
            licence += f" (accept: {lic['accept']}{', accepted' if r['license_accepted'] else ''})"  # () not []: Rich markup
        lines.append((r["id"], r["kind"], _source_text(r["source"]) if r["source"] else "[yellow]none: easel models set",
                      licence, human_size(r["approx_bytes"]) if r["approx_bytes"] else "?",
                      "yes" if r["local"] else "no"))
    print_rows(console, ("id", "kind", "source", "licence", "size", "local"), lines)

@app.command("set")
def set_(
    model_id: str = typer.Argument(..., help="A catalog id."),
    hf: Optional[str] = typer.Option(None, "--hf", help="OWNER/REPO[:FILE][@REVISION] on the Hugging Face Hub."),
    url: Optional[str] = typer.Option(None, "--url", help="An https URL of a .safetensors file (Civitai's "
                                                          "download API works; CIVITAI_TOKEN if it asks)."),
    sha256: Optional[str] = typer.Option(None, "--sha256", help="Pin the file's hash (hex)."),
    data_dir: Optional[Path] = _DATA,
    config: Optional[Path] = _CONFIG,
):
    """Point a catalog id at its weights: writes the operator's override file
    (``<data_dir>/catalog.override.json``); restart the server to use it."""
    import re

    from easel.weights.download import parse_hf_spec

    settings, sources = _load(config, data_dir)
    if model_id not in sources.catalog.entries:
        raise typer.BadParameter(f"{model_id!r} is not in the catalog", param_hint="MODEL_ID")
    if bool(hf) == bool(url):
        raise typer.BadParameter("give exactly one of --hf and --url")
    if hf:
        try:
            source = parse_hf_spec(hf)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--hf") from None
    else:
        if not re.match(r"https?://[^/\s]+/", url or ""):
            raise typer.BadParameter("must be an http(s) URL", param_hint="--url")
        source = {"type": "url", "url": url}
    if sha256:
        if not re.fullmatch(r"[0-9a-fA-F]{64}", sha256):
            raise typer.BadParameter("must be 64 hex digits", param_hint="--sha256")
        source["sha256"] = sha256.lower()
    path = Path(settings.core.catalog_override)
    try:
        data = json.loads(path.read_text()) if path.exists() else {}
    except ValueError as exc:
        raise typer.BadParameter(f"{path} is not valid JSON: {exc}") from None
    data.setdefault("models", {}).setdefault(model_id, {})["source"] = source
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")
    console.print(f"{model_id}: {_source_text(source)} (written to {path}; restart the server to use it)")


def _example(spec) -> dict:
    """The tool's example request (its seed page's own; :mod:`easel.catalog.examples`), {} if none."""
    return dict(spec.example.request) if spec.example is not None else {}
