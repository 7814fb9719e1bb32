"""Reading settings from a TOML config file and ``EASEL_*`` environment variables (pydantic-settings)."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from easel.config import FIELD_SECTION, SECTIONS


def _split(value):
    if isinstance(value, str):
        return tuple(x.strip() for x in value.split(",") if x.strip())
    return tuple(value)


def flatten_tables(data: dict) -> dict:
    """A config file's keys with ``[section]`` tables (``[api]``, ``[worker]``...) merged in flat.

    Raises:
        ValueError: a key inside a table that does not belong to that section.
    """
    out = {k: v for k, v in data.items() if not (k in SECTIONS and isinstance(v, dict))}
    for name in SECTIONS:
        table = data.get(name)
        if isinstance(table, dict):
            wrong = [k for k in table if FIELD_SECTION.get(k) != name]
            if wrong:
                raise ValueError(f"config file: [{name}] has no setting {', '.join(map(repr, wrong))}")
            out.update(table)
    return out


def read_sources(config_file: Path | str | None = None) -> dict:
    """The settings given in the config file and the environment (only those given), flat names
    to values, validated and typed by ``pydantic-settings``; see :meth:`easel.config.Settings.from_env`.

    Raises:
        ValueError: a value of the wrong type (naming ``EASEL_<FIELD>``), an unknown key, or a
            config file that does not exist.
    """
    from typing import Annotated, Optional, get_type_hints

    from pydantic import BeforeValidator, ValidationError, create_model
    from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict
    from pydantic_settings import TomlConfigSettingsSource

    fields: dict = {}
    for cls in SECTIONS.values():
        hints = get_type_hints(cls)
        for f in dataclasses.fields(cls):
            kind = hints[f.name]
            if kind == tuple[str, ...]:  # comma-separated in the environment, a list in TOML
                kind = Annotated[tuple[str, ...], NoDecode, BeforeValidator(_split)]
            fields[f.name] = (Optional[kind], None)
    path = config_file or os.environ.get("EASEL_CONFIG_FILE") or None

    class _FlatToml(TomlConfigSettingsSource):
        def _read_file(self, file_path):
            return flatten_tables(super()._read_file(file_path))

    class _Base(BaseSettings):
        model_config = SettingsConfigDict(env_prefix="EASEL_", extra="forbid", toml_file=path,
                                          case_sensitive=False)

        @classmethod
        def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                       file_secret_settings) -> tuple[PydanticBaseSettingsSource, ...]:
            sources = [env_settings]
            if path:
                if not Path(path).is_file():
                    raise ValueError(f"config file {path} does not exist")
                sources.append(_FlatToml(settings_cls))
            return tuple(sources)

    model = create_model("EnvSettings", __base__=_Base, **fields)
    try:
        loaded = model()
    except ValidationError as exc:
        problems = "; ".join(f"EASEL_{'.'.join(map(str, e['loc'])).upper()}: {e['msg']}" for e in exc.errors())
        raise ValueError(f"invalid Easel settings: {problems}") from None
    return {name: getattr(loaded, name) for name in loaded.model_fields_set}
