"""Declaring a command's options once: type, default, help and checks on one dataclass field.

A stage's config is a dataclass whose fields are made with :func:`option`. From that single
declaration the CLI builds the typer command (``pipeline.commands``), TOML presets are checked and
converted (``pipeline.config``), the CLI reference, docs/cli.md, is generated (``pipeline.docs``) and values
are checked (:func:`check`), so a flag, a preset key and its error message cannot drift apart.

    @dataclass
    class TrainConfig:
        lr: float = option(1e-4, "AdamW learning rate.", gt=0)
        cond: str = option("auto", "Conditioning.", choices=("auto", "class", "text", "none"))

``check(cfg)`` tests every field against its declaration and then calls ``cfg.check()`` (when the
class defines it) for rules that involve several fields.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import UsageError

SPEC_KEY = "option"


@dataclass(frozen=True)
class Spec:
    """How one config field appears to the user."""

    help: str
    flags: tuple[str, ...] = ()  # command-line names; default: --field-name (bool: --name/--no-name)
    metavar: str | None = None
    default_text: str | None = None  # shown as the default in --help when the value is computed (or "required")
    choices: tuple[Any, ...] = ()
    aliases: tuple[tuple[str, str], ...] = ()  # (old spelling, choice): saved configs and presets still load
    gt: float | None = None  # value must be > gt
    ge: float | None = None  # value must be >= ge
    lt: float | None = None  # value must be < lt
    le: float | None = None  # value must be <= le
    multiple_of: int | None = None
    none_word: bool = False  # "none" (or "") on the command line or in a preset means None
    required: bool = False  # must be given, on the command line or in the preset (the default is None)
    cli: bool = True  # False: a preset key only, not a command-line option
    panel: str | None = None  # --help section


def option(default: Any, help: str, **spec: Any) -> Any:
    """A dataclass field carrying its user-facing declaration (see :class:`Spec`)."""
    meta = {SPEC_KEY: Spec(help=help, **spec)}
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def spec_of(f: dataclasses.Field) -> Spec | None:
    return f.metadata.get(SPEC_KEY)


def declared_fields(cls: type) -> list[tuple[dataclasses.Field, Spec]]:
    """The fields of a config class that carry a declaration, in declaration order."""
    return [(f, s) for f in dataclasses.fields(cls) if (s := spec_of(f)) is not None]


def flag_name(f: dataclasses.Field) -> str:
    spec = spec_of(f)
    if spec is not None and spec.flags:
        return spec.flags[0].split("/")[0]
    return "--" + f.name.replace("_", "-")


def field_types(cls: type) -> dict[str, Any]:
    """Resolved type hints of a config class (annotations are strings under postponed evaluation)."""
    return typing.get_type_hints(cls)


def base_type(hint: Any) -> Any:
    """``int`` for ``int | None`` / ``Optional[int]``; the hint itself otherwise."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if type(None) in typing.get_args(hint) and len(args) == 1:
        return args[0]
    return hint


def convert(cls: type, name: str, value: Any) -> Any:
    """A value from a preset or the command line as the field's type: ``none`` words, paths, tuples."""
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    spec = spec_of(f)
    if spec is not None and spec.none_word and isinstance(value, str) and value.strip().lower() in ("", "none"):
        return None
    if spec is not None and isinstance(value, str):
        value = dict(spec.aliases).get(value, value)
    hint = base_type(field_types(cls)[name])
    origin = typing.get_origin(hint)
    if value is None:
        return [] if origin is list else None
    if hint is Path and isinstance(value, str):
        return Path(value)
    if origin is tuple and isinstance(value, list):
        return tuple(value)
    if origin is list and isinstance(value, tuple):
        return list(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def canonical(cls: type, values: dict) -> dict:
    """``values`` (a saved config) with every old spelling of a choice replaced by its current one."""
    specs = {f.name: s for f, s in declared_fields(cls)}
    return {k: dict(specs[k].aliases).get(v, v) if k in specs and isinstance(v, str) else v for k, v in values.items()}


def _check_field(f: dataclasses.Field, spec: Spec, value: Any) -> str | None:
    """The reason ``value`` is not acceptable for this field, or None."""
    if value is None:
        return None
    if spec.choices and value not in spec.choices:
        return f"choose one of {', '.join(map(str, spec.choices))}" + (", or none" if spec.none_word else "")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if spec.gt is not None and not value > spec.gt:
        return "must be positive" if spec.gt == 0 else f"must be > {spec.gt}"
    if spec.ge is not None and not value >= spec.ge:
        return f"must be >= {spec.ge}"
    if spec.lt is not None and not value < spec.lt:
        return f"must be < {spec.lt}"
    if spec.le is not None and not value <= spec.le:
        return f"must be <= {spec.le}"
    if spec.multiple_of and value % spec.multiple_of:
        return f"must be a multiple of {spec.multiple_of}"
    return None


def check(cfg: Any) -> Any:
    """Raise UsageError naming the first field (as its flag) whose value breaks its declaration, then
    run the config's own cross-field ``check()``; returns ``cfg``."""
    for f, spec in declared_fields(type(cfg)):
        value = getattr(cfg, f.name)
        if spec.required and value in (None, ""):
            raise UsageError(f"{flag_name(f)} is required: give it on the command line or as {f.name} in the "
                             "--config preset (configs/demo.toml for the offline demo)")
        reason = _check_field(f, spec, value)
        if reason:
            shown = repr(value) if isinstance(value, str) else value
            raise UsageError(f"{flag_name(f)} {shown}: {reason}")
    own = getattr(cfg, "check", None)
    if callable(own):
        own()
    return cfg


def to_json(cfg: Any) -> dict:
    """A config as plain JSON values (paths as strings, tuples as lists)."""

    def plain(v: Any) -> Any:
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, (tuple, list)):
            return [plain(x) for x in v]
        return v

    return {f.name: plain(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
