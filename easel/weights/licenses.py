"""Weights licences the operator must accept before they are fetched (``license.accept`` in the
catalog; ``WeightsSettings.accept_licenses``, ``easel models pull --accept-license``)."""
from __future__ import annotations

import json
from pathlib import Path

from easel.catalog import ModelEntry
from easel.config import WeightsSettings

LICENSES_FILE = "accepted-licenses.json"  # under <data_dir>/models


def accepted_licenses(weights: WeightsSettings, models_dir: Path) -> set[str]:
    """Licence names the operator accepted, lower-cased: ``weights.accept_licenses``
    (``EASEL_ACCEPT_LICENSES``) and those recorded by ``easel models pull --accept-license`` in
    ``<models_dir>/accepted-licenses.json`` (an unreadable file counts as none)."""
    names = {n.strip().lower() for n in weights.accept_licenses if n.strip()}
    try:
        names |= {str(n).lower() for n in json.loads((models_dir / LICENSES_FILE).read_text())}
    except (OSError, ValueError, TypeError):
        pass
    return names


def record_license(weights: WeightsSettings, models_dir: Path, names: list[str]) -> None:
    """Record ``names`` (stripped, lower-cased) with those already accepted (:func:`accepted_licenses`)
    in ``<models_dir>/accepted-licenses.json``.

    Raises:
        OSError: the file cannot be written.
    """
    accepted = sorted(accepted_licenses(weights, models_dir) | {n.strip().lower() for n in names if n.strip()})
    path = models_dir / LICENSES_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(accepted))


def license_problem(entry: ModelEntry, weights: WeightsSettings, models_dir: Path) -> str | None:
    """Why ``entry``'s weights may not be used yet (its licence's ``accept`` name was not accepted,
    see :func:`accepted_licenses`; ``all`` accepts every one), naming the licence and how to accept
    it; None when nothing needs accepting or it was accepted."""
    lic = entry.license or {}
    name = lic.get("accept")
    accepted = accepted_licenses(weights, models_dir)
    if not name or name.lower() in accepted or "all" in accepted:
        return None
    terms = "non-commercial use only" if lic.get("noncommercial") else "terms that must be accepted"
    where = f", {lic['url']}" if lic.get("url") else ""
    return (f"{entry.label} ({entry.id}) is under the {lic.get('id', name)} licence ({terms}{where}), which the "
            f"operator has not accepted. To accept it, set EASEL_ACCEPT_LICENSES={name} (comma-separated with "
            f"others) for the server and its workers, or run `easel models pull {entry.id} --accept-license {name}`.")
