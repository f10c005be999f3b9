"""Settings from a config file (YAML or TOML) under the environment: ``spillway serve
--config spillway.yaml`` or ``SPILLWAY_CONFIG``. Precedence, highest first: command-line
options, ``SPILLWAY_*`` variables, the file, the defaults.

pydantic-settings reads the file (its own YAML/TOML sources); what is written here is the
choice of source, a check that the file names only settings that exist (the model ignores
unknown keys, as it must for the environment, where any ``SPILLWAY_*`` variable may be
set, so a typo in a file would otherwise be dropped in silence), and errors said in one
sentence that names the field.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import UnionType
from typing import Any, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    TomlConfigSettingsSource,
    YamlConfigSettingsSource,
)

from server.config import Settings

CONFIG_ENV = "SPILLWAY_CONFIG"


class ConfigError(ValueError):
    """A settings problem, in one sentence naming the file and the field."""


def _source(settings_cls: type[BaseSettings], path: Path) -> PydanticBaseSettingsSource:
    """pydantic-settings' own reader for the file's kind."""
    if path.suffix.lower() in (".yaml", ".yml"):
        return YamlConfigSettingsSource(settings_cls, yaml_file=path)
    if path.suffix.lower() == ".toml":
        return TomlConfigSettingsSource(settings_cls, toml_file=path)
    raise ConfigError(f"config file {path}: use .yaml, .yml or .toml, not {path.suffix!r}")


def _read(path: Path) -> dict[str, Any]:
    try:
        data: dict[str, Any] = _source(Settings, path)()  # the source parses as it is made
    except ConfigError:
        raise
    except Exception as exc:  # a parser's error, whichever parser: said in one sentence
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"config file {path} does not parse: {first}") from None
    return data


def unknown_keys(data: dict[str, Any], model: type[BaseModel], prefix: str = "") -> list[str]:
    """Dotted names in ``data`` that ``model`` has no field for, nested models included
    (a field typed as a mapping takes any keys)."""
    found = []
    for key, value in data.items():
        field = model.model_fields.get(key)
        name = f"{prefix}{key}"
        if field is None:
            found.append(name)
            continue
        kinds = get_args(field.annotation) if get_origin(field.annotation) in (
            Union, UnionType) else (field.annotation,)  # `X | None`: X; a mapping: itself
        nested = [t for t in kinds if isinstance(t, type) and issubclass(t, BaseModel)]
        if nested and isinstance(value, dict):
            found.extend(unknown_keys(value, nested[0], f"{name}."))
    return found


def describe(exc: ValidationError, where: str) -> str:
    """pydantic's errors as one sentence: each field's dotted name and what is wrong."""
    parts = []
    for err in exc.errors():
        name = ".".join(str(p) for p in err["loc"]) or "settings"
        parts.append(f"{name}: {err['msg']}")
    return f"{where}: " + "; ".join(parts)


def config_path(config: Path | None) -> Path | None:
    """The file asked for on the command line, else ``SPILLWAY_CONFIG``, else none."""
    if config is not None:
        return config
    named = os.environ.get(CONFIG_ENV, "").strip()
    return Path(named) if named else None


def load_settings(config: Path | None = None, **overrides: Any) -> Settings:
    """The settings: ``overrides`` (command-line options), then the environment, then the
    config file if one is named, then the defaults. A ConfigError says what is wrong."""
    given = {k: v for k, v in overrides.items() if v is not None}
    path = config_path(config)
    if path is None:
        try:
            return Settings(**given)
        except ValidationError as exc:
            raise ConfigError(describe(exc, "settings")) from None
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    data = _read(path)
    file = path  # for the class below (mypy does not carry the narrowing into it)
    unknown = unknown_keys(data, Settings)
    if unknown:
        raise ConfigError(f"config file {path}: unknown setting"
                          f"{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}")
    class FileSettings(Settings):
        @classmethod
        def settings_customise_sources(
                cls, settings_cls: type[BaseSettings],
                init_settings: PydanticBaseSettingsSource,
                env_settings: PydanticBaseSettingsSource,
                dotenv_settings: PydanticBaseSettingsSource,
                file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            return (init_settings, env_settings, dotenv_settings,
                    _source(settings_cls, file), file_secret_settings)

    try:
        return FileSettings(**given)
    except ValidationError as exc:
        raise ConfigError(describe(exc, f"config file {path} (or SPILLWAY_* over it)")) from None


def effective(settings: Settings) -> dict[str, Any]:
    """The settings as a config file would write them; every secret masked (keys, and a
    password inside the ledger's URL)."""
    from sqlalchemy.engine import make_url

    data = settings.model_dump(mode="json")
    try:
        data["ledger_url"] = make_url(settings.ledger_url).render_as_string(hide_password=True)
    except Exception:  # not a URL SQLAlchemy reads: the server will say so at start
        data["ledger_url"] = "**********"
    return data
