"""docs/cli.md, the CLI reference, generated from the commands themselves.

    python -m pipeline.docs            print the reference (Markdown)
    python -m pipeline.docs --write    replace the block between the markers in docs/cli.md
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer

START = "<!-- cli-reference:start -->"
END = "<!-- cli-reference:end -->"
PAGE = Path(__file__).resolve().parent.parent / "docs" / "cli.md"


def _walk(cmd, prefix: str):
    if hasattr(cmd, "commands"):  # a group (typer may vendor its own click, so no isinstance)
        for name in sorted(cmd.commands):
            yield from _walk(cmd.commands[name], f"{prefix} {name}")
    else:
        yield prefix, cmd


def _default(p) -> str:
    if isinstance(p.show_default, str):  # a computed default, described in words
        return p.show_default
    if p.is_flag and not p.secondary_opts:
        return "off" if not p.default else "on"
    if p.is_flag:
        return p.opts[0] if p.default else p.secondary_opts[0]
    if p.default is None or p.default == "":
        return "-"
    return f"`{p.default}`"


def reference() -> str:
    from .cli import app

    root = typer.main.get_command(app)
    commands = list(_walk(root, "repa"))
    # GitHub's anchor for a heading "`repa cache info`" is "repa-cache-info"
    out = ["\n".join(f"- [`{name}`](#{name.replace(' ', '-')})" for name, _ in commands) + "\n"]
    for name, cmd in commands:
        out.append(f"## `{name}`\n\n{(cmd.help or '').strip().splitlines()[0]}\n")
        args = [p for p in cmd.params if p.param_type_name == "argument"]
        if args:
            described = (f"`{(a.metavar or a.name).upper()}` ({a.help or ''})" for a in args)
            out.append("Arguments: " + ", ".join(described) + "\n")
        opts = [p for p in cmd.params if p.param_type_name == "option" and p.name != "help"]
        if opts:
            out.append("| option | default | meaning |\n|---|---|---|")
            for p in opts:
                names = " / ".join(f"`{o}`" for o in p.opts + p.secondary_opts)
                help_text = (p.help or "").replace("|", "\\|").replace("\n", " ")
                out.append(f"| {names} | {_default(p)} | {help_text} |")
            out.append("")
    return "\n".join(out).rstrip() + "\n"


def write_page(path: Path = PAGE) -> None:
    text = path.read_text()
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    path.write_text(f"{head}{START}\n{reference()}{END}{tail}")


if __name__ == "__main__":
    if "--write" in sys.argv:
        write_page()
    else:
        sys.stdout.write(reference())
