"""Helper processes that end with the process they serve, however it ends (even ``kill -9``).

DataLoader workers blocked on a full pipe never notice that their parent is gone, so each watches
its parent through a pidfd (readable once the process has ended) and exits then, taking its own
children (e.g. the command of a ``pipe:`` source) with it.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import threading


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
    leave_stop_signals_to(pid)
    exit_when_gone(pid)


def exit_with_parent(worker_id: int) -> None:
    """DataLoader ``worker_init_fn`` for workers forked straight from the process they serve."""
    leave_stop_signals_to(os.getppid())
    exit_when_gone(os.getppid())


def leave_stop_signals_to(pid: int) -> None:
    """Stop signals sent to the whole process group (Ctrl-C, a scheduler's SIGTERM or SIGUSR1) are for
    process ``pid`` to act on (it may finish a step first, with this helper's data); only a SIGTERM that
    ``pid`` itself sends (a DataLoader shutting its workers down) ends this process.

    SIGTERM is blocked and taken by a thread that sees the sender; SIGINT and SIGUSR1 get a handler that
    does nothing (exec resets it: a ``pipe:`` command still ends on Ctrl-C)."""
    for sig in (signal.SIGINT, signal.SIGUSR1):
        signal.signal(sig, _ignore)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # threads started from now on inherit the mask

    def wait_for_terminate() -> None:
        while True:
            if signal.sigwaitinfo({signal.SIGTERM}).si_pid == pid:
                _kill_children()
                os._exit(0)

    threading.Thread(target=wait_for_terminate, name="terminate-by-parent", daemon=True).start()
    # multiprocessing's resource sharer reports through sys.excepthook, other threads through threading's
    sys.excepthook = _quiet_cut_connections
    threading.excepthook = _quiet_cut_thread_connections


def _quiet_cut_connections(exc_type, exc, tb) -> None:
    """A connection that the served process cut by stopping mid-transfer (multiprocessing hands tensors'
    file descriptors over through a thread here) is its stop, not an error of this helper to report."""
    if not issubclass(exc_type, (ConnectionError, EOFError)):
        sys.__excepthook__(exc_type, exc, tb)


def _quiet_cut_thread_connections(args) -> None:
    if not issubclass(args.exc_type, (ConnectionError, EOFError)):
        threading.__excepthook__(args)


def _ignore(signum, frame) -> None:
    pass


def _kill_children() -> None:
    import psutil

    for child in psutil.Process().children(recursive=True):
        try:
            child.kill()
        except psutil.Error:
            pass
