"""Server settings: one frozen object of sections, built by the CLI; each layer is handed its section.

``Settings`` holds eight small frozen sections, each documenting its own fields:

- ``core`` (:class:`~.core.CoreSettings`): every process: data paths, database, public URL, key, logs;
- ``api`` (:class:`~.api.ApiSettings`): the API: HTTP caps, CORS, rate limit, nonces, OpenAI, webhooks;
- ``worker`` (:class:`~.worker.WorkerSettings`): workers and executors: count, GPUs, leases, limits;
- ``weights`` (:class:`~.weights.WeightsSettings`): ``easel.weights``: sources, licences, cache, precision;
- ``storage`` (:class:`~.storage.StorageSettings`): ``easel.storage`` and the retention sweeps;
- ``fleet`` (:class:`~.fleet.FleetSettings`): the executors: local or Celery, broker, queues;
- ``live`` (:class:`~.live.LiveSettings`): ``easel.store.notify`` and the live waiters, Redis;
- ``fetch`` (:class:`~.fetch.FetchSettings`): the safe fetcher, request files' and images' caps.

The outside contract is flat: every field can be set in a TOML config file (``--config`` /
``EASEL_CONFIG_FILE``) as ``field = value`` (or inside a ``[section]`` table), in the environment
as ``EASEL_<FIELD>`` (upper case; list fields take a comma-separated value) and, for the common
ones, by ``easel serve`` flags; a flag overrides only when it is given. ``Settings(data_dir=...,
workers=2)`` and ``settings.with_(workers=0)`` take the flat names too and route each to its
section. Field names are unique across sections. Sources are read and validated with
``pydantic-settings`` (:mod:`easel.config.sources`). The object is picklable so worker processes
receive it as is.

Each section checks what it can alone. Checks that need another module live there: the queue
names against the tools' families (``easel.executors.celery.check_queues``), the live-push
backend and the Redis URL (``easel.store.notify.check_live``), and ``gpus = "all"``
(``easel.executors.local.expand_gpus``). This package imports none of catalog, store or torch.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from easel.config.api import ApiSettings
from easel.config.core import CoreSettings
from easel.config.fetch import FetchSettings
from easel.config.fleet import FleetSettings
from easel.config.live import LiveSettings
from easel.config.storage import StorageSettings, parse_s3_url
from easel.config.weights import CPU_PRECISIONS, WeightsSettings, check_cpu_precision
from easel.config.worker import WorkerSettings

__all__ = ["Settings", "SECTIONS", "FIELD_SECTION", "CoreSettings", "ApiSettings", "WorkerSettings",
           "WeightsSettings", "StorageSettings", "FleetSettings", "LiveSettings", "FetchSettings",
           "CPU_PRECISIONS", "check_cpu_precision", "parse_s3_url", "read_sources", "field_names"]

SECTIONS: dict[str, type] = {"core": CoreSettings, "api": ApiSettings, "worker": WorkerSettings,
                             "weights": WeightsSettings, "storage": StorageSettings, "fleet": FleetSettings,
                             "live": LiveSettings, "fetch": FetchSettings}
# every flat field name (the EASEL_<FIELD> and TOML key) -> the section that holds it
FIELD_SECTION: dict[str, str] = {f.name: name for name, cls in SECTIONS.items() for f in dataclasses.fields(cls)}
if len(FIELD_SECTION) != sum(len(dataclasses.fields(c)) for c in SECTIONS.values()):
    raise RuntimeError("a setting's name is used by two sections: the flat names must be unique")


def field_names() -> list[str]:
    """Every flat setting name (``EASEL_<NAME>`` upper-cased), in section order."""
    return list(FIELD_SECTION)


@dataclass(frozen=True, init=False)
class Settings:
    """Configuration of one Easel deployment: its sections (see the module docstring).

    ``Settings(**values)`` takes flat field names (``data_dir=..., workers=2``), each routed to its
    section, and/or whole sections by name (``worker=WorkerSettings(...)``; flat names then change
    fields of it). Unset fields keep their defaults.

    Raises:
        TypeError: an unknown name.
        ValueError: a value a section refuses (the message names the setting).
    """

    core: CoreSettings
    api: ApiSettings
    worker: WorkerSettings
    weights: WeightsSettings
    storage: StorageSettings
    fleet: FleetSettings
    live: LiveSettings
    fetch: FetchSettings

    def __init__(self, **values) -> None:
        self._fill({}, values)

    def _fill(self, sections: dict, values: dict) -> None:
        """Set every section: ``sections`` (name -> section object) as given, changed by the flat
        or whole-section ``values``; the rest from their defaults."""
        sections = dict(sections)
        flat: dict[str, dict] = {name: {} for name in SECTIONS}
        for key, value in values.items():
            if key in SECTIONS and isinstance(value, SECTIONS[key]):  # ("storage" is a field name too)
                sections[key] = value
            elif key in FIELD_SECTION:
                flat[FIELD_SECTION[key]][key] = value
            else:
                raise TypeError(f"Settings() got an unexpected keyword argument {key!r}")
        for name, cls in SECTIONS.items():
            base = sections.get(name)
            if base is None:
                section = cls(**flat[name])
            else:  # a section left unchanged is shared (frozen), not rebuilt
                section = dataclasses.replace(base, **flat[name]) if flat[name] else base
            object.__setattr__(self, name, section)

    @classmethod
    def from_env(cls, config_file: Path | str | None = None, **overrides) -> "Settings":
        """Build settings from, in increasing precedence: defaults, a TOML config file, ``EASEL_*``
        environment variables, then ``overrides`` (CLI flags, flat names; a ``None`` value means
        "not given" and overrides nothing).

        Args:
            config_file: TOML file of ``field = value`` lines (flat field names, optionally inside
                ``[section]`` tables); default ``$EASEL_CONFIG_FILE`` if set, else none.

        Raises:
            ValueError: a value of the wrong type (the message names the variable), or an
                unknown key in the config file.
        """
        from easel.config.sources import read_sources

        return cls(**{**read_sources(config_file), **{k: v for k, v in overrides.items() if v is not None}})

    def with_(self, **changes) -> "Settings":
        """A copy with ``changes`` (flat field names, or whole sections by name) applied."""
        copy = object.__new__(Settings)
        copy._fill({name: getattr(self, name) for name in SECTIONS}, changes)
        return copy


def read_sources(config_file: Path | str | None = None) -> dict:
    """The flat settings given in the config file and the environment; see
    :func:`easel.config.sources.read_sources`."""
    from easel.config.sources import read_sources as read

    return read(config_file)
