"""Helper processes that end with the process they serve, however it ends (even ``kill -9``).

DataLoader workers blocked on a full pipe never notice that their parent is gone, so each watches
its parent through a pidfd (readable once the process has ended) and exits then, taking its own
children (e.g. the command of a ``pipe:`` source) with it.
"""

from __future__ import annotations

import os
import select
import threading

from .stop import ignore_stop_signals


def exit_when_gone(pid: int, code: int = 0) -> None:
    """Exit this process (with ``code``) as soon as process ``pid`` has ended (no-op where pidfds are missing)."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        os._exit(code)
    except (AttributeError, OSError):  # no pidfd (not Linux >= 5.3): rely on the DataLoader's own shutdown
        return

    def wait_then_exit() -> None:
        select.select([pidfd], [], [])
        _kill_children()
        os._exit(code)

    threading.Thread(target=wait_then_exit, name="exit-with-parent", daemon=True).start()


def exit_with_process(pid: int, worker_id: int) -> None:
    """DataLoader ``worker_init_fn`` (with ``functools.partial(exit_with_process, pid)``); the worker leaves
    stop signals to that process (it ends the worker when it is done with it)."""
    ignore_stop_signals()
    exit_when_gone(pid)


def exit_with_parent(worker_id: int) -> None:
    """DataLoader ``worker_init_fn`` for workers forked straight from the process they serve."""
    ignore_stop_signals()
    exit_when_gone(os.getppid())


def _kill_children() -> None:
    import psutil

    for child in psutil.Process().children(recursive=True):
        try:
            child.kill()
        except psutil.Error:
            pass
