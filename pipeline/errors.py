"""How the CLI ends: one line for errors the user can fix, a clean exit on Ctrl-C and stop signals (status
128 + the signal's number), process groups torn down, and a rank of several ending without the interpreter's
own teardown."""

from __future__ import annotations

import atexit
import errno
import functools
import os
import sys
from collections.abc import Callable

import typer

from cache_schema import CacheError
from stages.core.errors import UsageError
from stages.core.runtime.stop import Interrupted


def user_errors(fn):
    """Turn expected failures into `error: <one line>` and exit status 2; tear down process groups."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (UsageError, CacheError) as e:
            typer.echo(f"error: {own_message(e)}", err=True)
            raise typer.Exit(2) from None
        except OSError as e:  # the machine, not the code: a full disk, permissions, a vanished mount
            if own_message(e) != str(e):  # raised in a loader worker: errno and filename are in its text only
                typer.echo(f"error: {own_message(e)}; fix it and rerun the same command", err=True)
                raise typer.Exit(2) from None
            what = f"{e.filename}: " if e.filename else ""
            hint = ("free space and rerun the same command (committed parts and checkpoints are kept)"
                    if e.errno in (errno.ENOSPC, errno.EDQUOT) else "fix it and rerun the same command")
            typer.echo(f"error: {what}{e.strerror or e}; {hint}", err=True)
            raise typer.Exit(2) from None
        except Interrupted as e:  # a stop signal (stages.core.runtime.stop): the stage said what was kept
            if e.line:
                typer.echo(e.line, err=True)
            raise typer.Exit(e.status) from None
        except KeyboardInterrupt:
            typer.echo("interrupted: committed parts and checkpoints are kept; rerun the same command to resume",
                       err=True)
            raise typer.Exit(130) from None
        finally:
            _teardown_distributed()

    return wrapper


def own_message(e: BaseException) -> str:
    """The message of ``e`` as the code that raised it wrote it.

    torch's DataLoader raises an error of a worker process again in the main process as the same type,
    with "Caught X in DataLoader worker process N." and the worker's traceback as its message; the
    traceback ends with the original "module.X: message", which is what the user is to read.
    """
    text, name = str(e), type(e).__name__
    if not text.startswith(f"Caught {name} in DataLoader worker"):
        return text
    lines = text.rstrip().splitlines()
    for i in range(len(lines) - 1, 0, -1):
        head, sep, rest = lines[i].partition(": ")
        if sep and head.rsplit(".", 1)[-1] == name and not head.startswith(" "):
            return "\n".join([rest, *lines[i + 1:]])
    return text


def _teardown_distributed() -> None:
    dist = sys.modules.get("torch.distributed")  # never import torch just to find nothing to tear down
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def run_as_rank(app: Callable[[], object]) -> None:
    """Run ``app`` in one rank of several, and end the process with its exit status once the atexit handlers
    (trackers, multiprocessing) have run, skipping the interpreter's teardown of what is left.

    That teardown is where torch destroys a gloo process group that something still holds (DDP's reducer): it
    joins the group's threads with the GIL held, while one of them may be finishing a collective's work and
    wait for the GIL to release its tensors. The rank then hangs after its last line, its work done (seen with
    a stop signal on one rank of two). Everything the run writes is on disk before this point (checkpoints
    fsynced, metrics appended line by line, trackers ended); helpers end with their parent."""
    status = [1]  # an exception that escapes app(): Python prints it, then the handlers run

    def end_here() -> None:  # atexit runs handlers last-registered first: this one after those registered later
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a closed pipe or stream: nothing more can be said on it
                pass
        os._exit(status[0])

    atexit.register(end_here)
    try:
        app()
        status[0] = 0
    except SystemExit as e:
        status[0] = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        raise
