"""Building a stage's config dataclass from three layers: its defaults, a TOML preset, the command line.

Option defaults shown in ``--help`` are the dataclass defaults; a ``--config FILE`` preset
overrides them; options given explicitly on the command line override the preset.
"""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path
from typing import Any, TypeVar

from cache_schema import UsageError

T = TypeVar("T")


class ConfigError(UsageError):
    """A preset file cannot be used; the message names the file and the key."""


def load_preset(path: Path, section: str) -> dict[str, Any]:
    """The ``[section]`` table of a TOML preset (keys may use dashes or underscores)."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"--config {path}: no such file; see configs/ for the shipped presets") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"--config {path}: not valid TOML ({e})") from None
    table = data.get(section, {})
    if not isinstance(table, dict):
        raise ConfigError(f"--config {path}: [{section}] must be a table")
    return {k.replace("-", "_"): v for k, v in table.items()}


def merge(cls: type[T], ctx, cli: dict[str, Any], preset: dict[str, Any], origin: str = "") -> T:
    """cls(**(defaults <- preset <- explicitly given CLI values))."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(preset) - names)
    if unknown:
        raise ConfigError(f"{origin or 'preset'}: unknown key {unknown[0]!r}; valid keys: {', '.join(sorted(names))}")
    values = dict(preset)
    for name, value in cli.items():
        if name not in names:
            continue
        # Compared by name: typer may carry its own copy of click's ParameterSource enum.
        source = ctx.get_parameter_source(name)
        given = source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")
        if given or name not in values:
            values[name] = value
    types = {f.name: f.type for f in dataclasses.fields(cls)}
    for name, value in values.items():
        if isinstance(value, str) and "Path" in str(types[name]):
            values[name] = Path(value)
    return cls(**values)


def from_context(cls: type[T], ctx, cli: dict[str, Any], config: Path | None, section: str) -> T:
    preset = load_preset(config, section) if config else {}
    return merge(cls, ctx, cli, preset, origin=f"--config {config} [{section}]")
