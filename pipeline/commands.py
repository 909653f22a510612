"""Typer commands generated from the stages' config declarations (``stages.core.options``).

``config_command`` turns a config dataclass into a command whose options are its fields (names, types,
defaults, help, metavars and panels as declared) plus ``--config FILE.toml``; the command builds the
config (defaults <- preset <- command line), checks it and hands it to the stage.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional, cast

import typer

from stages.core.options import base_type, declared_fields, field_types

from .config import from_context
from .errors import user_errors

ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", help="TOML preset (see configs/); options given on the command line override it.",
                 metavar="FILE"),
]


def _cli_type(hint: Any) -> Any:
    """The annotation typer understands: ``Optional[X]`` for ``X | None``; lists as ``Optional[List[X]]``
    (typer gives None when the option is not repeated, and the config turns that into [])."""
    optional = type(None) in typing.get_args(hint)
    base = base_type(hint)
    if typing.get_origin(base) is list:
        # typer's forms, built at run time from the hint's own arguments (so typed as values, not types)
        base, optional = cast(Any, typing.List)[typing.get_args(base)[0]], True  # noqa: UP006
    elif typing.get_origin(base) is tuple:
        base = cast(Any, typing.Tuple)[typing.get_args(base)]  # noqa: UP006
    return Optional[base] if optional else base  # noqa: UP045 - typer's form, as above


def option_parameters(cls: type) -> list[inspect.Parameter]:
    """One keyword parameter per declared command-line option of ``cls``."""
    hints = field_types(cls)
    params = []
    for f, spec in declared_fields(cls):
        if not spec.cli:
            continue
        hint = hints[f.name]
        flags = spec.flags
        if not flags:
            dashed = "--" + f.name.replace("_", "-")
            flags = (f"{dashed}/--no-{dashed[2:]}",) if base_type(hint) is bool else (dashed,)
        default = None if f.default is dataclasses.MISSING else f.default  # lists: None -> []
        show = spec.default_text if spec.default_text is not None else True
        info = typer.Option(*flags, help=spec.help, metavar=spec.metavar, show_default=show,
                            rich_help_panel=spec.panel)
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                        annotation=Annotated[_cli_type(hint), info]))
    return params


def config_command(app: typer.Typer, name: str, cls: type, run: Callable[[Any], None], help: str,
                   section: str | None = None) -> None:
    """Add ``name`` to ``app``: options from ``cls``'s declaration, then ``run(config)``."""
    section = section or name

    def command(ctx: typer.Context, config: Path | None = None, **values: Any) -> None:
        run(from_context(cls, ctx, values, config, section))

    params = [
        inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context),
        inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=ConfigOpt),
        *option_parameters(cls),
    ]
    command = user_errors(command)
    # what typer reads the options from; typeshed's function type has no __signature__ though inspect reads it
    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params}
    app.command(name, help=help)(command)
