"""Stopping when a scheduler (SLURM, Kubernetes) or the user asks: a signal, then a clean end.

A command that can stop at a safe point (training: after the optimizer step in flight) takes the
first stop signal as a request it polls (``StopSignals.signum``); a command that cannot, or a
second signal, ends at once by raising :class:`Interrupted`, which unwinds like Ctrl-C (loaders
shut their workers down, claims and locks are released) and which the CLI turns into one line and
exit status 128 + the signal's number (SIGINT 130, SIGUSR1 138, SIGTERM 143), as a shell reports a
process the signal killed.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable

from stages.core.errors import UsageError

DEFAULT_STOP_SIGNALS = "TERM,INT,USR1"


def parse_signals(text: str | None, flag: str = "--stop-signals") -> tuple[signal.Signals, ...]:
    """``TERM,USR1`` (or ``SIGTERM``, ``15``; ``none``: no signal) as signals."""
    if not text or text.strip().lower() == "none":
        return ()
    out = []
    for word in (w.strip() for w in text.split(",")):
        name = word.upper() if word.upper().startswith("SIG") else f"SIG{word.upper()}"
        try:
            sig = signal.Signals(int(word)) if word.isdigit() else signal.Signals[name]
        except (KeyError, ValueError):
            raise UsageError(f"{flag} {text}: {word!r} is not a signal; give names such as TERM,INT,USR1 "
                             "(or none)") from None
        if sig in (signal.SIGKILL, signal.SIGSTOP):
            raise UsageError(f"{flag} {text}: {sig.name} cannot be caught; give others, such as TERM,INT,USR1")
        out.append(sig)
    return tuple(dict.fromkeys(out))


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


class Interrupted(KeyboardInterrupt):
    """A stop signal ended the command. ``line`` says what was kept and what to do next (empty on the
    processes that should stay quiet); the exit status is 128 + the signal's number."""

    def __init__(self, signum: int, line: str):
        super().__init__(line)
        self.signum, self.line = signum, line

    @property
    def status(self) -> int:
        return 128 + self.signum


class StopSignals:
    """While entered, ``signals`` stop the command: with ``graceful``, the first one only records itself
    in ``signum`` (and calls ``on_request``) for the command to stop at its next safe point; without it,
    or on the second, :class:`Interrupted` is raised with the line ``at_once()`` returns.

    Handlers are installed only in the main thread (Python runs them there); elsewhere this does nothing."""

    def __init__(self, signals, at_once: Callable[[int], str], graceful: bool = False,
                 on_request: Callable[[int], None] | None = None):
        self.signals = tuple(signals)
        self.at_once, self.graceful, self.on_request = at_once, graceful, on_request
        self.signum: int | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.graceful and self.signum is None:
            self.signum = signum
            if self.on_request is not None:
                self.on_request(signum)
            return
        self.signum = self.signum or signum
        self.restore()  # a third signal gets the default action: nothing can hold the process any more
        raise Interrupted(signum, self.at_once(signum))

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        self.restore()
