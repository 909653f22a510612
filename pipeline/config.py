"""Building a stage's config from three layers: its declared defaults, a TOML preset, the command line.

Option defaults shown in ``--help`` are the declared defaults; a ``--config FILE`` preset overrides
them; options given explicitly on the command line override the preset. Preset keys are the config's
field names (dashes or underscores); an unknown key is refused with the closest valid one named.
"""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
from pathlib import Path
from typing import Any, TypeVar

from stages.core.errors import UsageError
from stages.core.options import check, convert

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


def unknown_key_error(where: str, key: str, valid: set[str], table: str = "") -> ConfigError:
    """A preset key that is not an option, with the closest valid key (or all of them) named."""
    close = difflib.get_close_matches(key, sorted(valid), n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}?" if close else f"valid keys: {', '.join(sorted(valid))}"
    return ConfigError(f"{where}: unknown key {key!r}{f' in {table}' if table else ''}; {hint}")


def check_keys(cls: type, keys, where: str) -> None:
    names = {f.name for f in dataclasses.fields(cls)}
    for key in keys:
        if key not in names:
            raise unknown_key_error(where, key, names)


def build(cls: type[T], values: dict[str, Any], where: str = "preset") -> T:
    """``cls`` from preset-style values (converted to the field types), checked against its declaration."""
    check_keys(cls, values, where)
    return check(cls(**{k: convert(cls, k, v) for k, v in values.items()}))


def merge(cls: type[T], ctx, cli: dict[str, Any], preset: dict[str, Any], origin: str = "") -> T:
    """cls(**(defaults <- preset <- explicitly given CLI values)), checked."""
    check_keys(cls, preset, origin or "preset")
    values = dict(preset)
    for name, value in cli.items():
        # Compared by name: typer may carry its own copy of click's ParameterSource enum.
        source = ctx.get_parameter_source(name)
        given = source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")
        if given or name not in values:
            values[name] = value
    return build(cls, values, origin or "preset")


def from_context(cls: type[T], ctx, cli: dict[str, Any], config: Path | None, section: str) -> T:
    preset = load_preset(config, section) if config else {}
    return merge(cls, ctx, cli, preset, origin=f"--config {config} [{section}]")
