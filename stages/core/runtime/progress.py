"""Progress bars: tqdm's on a terminal; in a log (stderr is a file or a pipe: a batch job, `make sweep > log`)
one plain line per bar every ``REPA_PROGRESS_INTERVAL`` seconds (30 by default) and when it ends, with rate and
ETA as on a terminal but no carriage returns or cursor movements."""

from __future__ import annotations

import os
import re
import sys

from tqdm import tqdm

_CURSOR_CODES = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class _Lines:
    """A stream for tqdm that turns its in-place redraws into whole lines."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        for line in _CURSOR_CODES.sub("", text).replace("\r", "\n").split("\n"):
            if line.strip():
                self.stream.write(line.rstrip() + "\n")

    def flush(self) -> None:
        self.stream.flush()


def on_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed by the caller
        return False


def progress_bar(*args, **kwargs) -> tqdm:
    """``tqdm(*args, **kwargs)``, as lines when stderr is not a terminal."""
    if not on_terminal():
        # leave: a log keeps every line anyway, and a bar's closing line is its final rate
        kwargs.update(file=_Lines(sys.stderr), mininterval=float(os.environ.get("REPA_PROGRESS_INTERVAL", 30)),
                      dynamic_ncols=False, ncols=100, ascii=True, leave=True)
    return tqdm(*args, **kwargs)
