"""`python -m pipeline ARGS` as a torchrun rank runs it, reporting at exit (before the rank's own end,
``pipeline.errors.run_as_rank``) how many of the process group's native threads are still alive: after a
clean teardown none are.

Each rank writes its report to a file of its own, ``$RANK_PROBE_DIR/rank-<RANK>.txt`` (written aside and
renamed), so reports of ranks sharing a stderr can never run together, nor into another rank's progress
bar; without ``RANK_PROBE_DIR`` the report is one whole-line write to stderr.
"""

import atexit
import glob
import os
import sys

import pipeline.cli as cli


def _report() -> None:
    names = []
    for comm in glob.glob("/proc/self/task/*/comm"):
        try:
            with open(comm) as f:
                names.append(f.read().strip())
        except OSError:  # the thread ended while we looked
            pass
    line = f"rank exit: {sum('gloo' in n for n in names)} gloo thread(s) alive\n"
    folder = os.environ.get("RANK_PROBE_DIR")
    if folder is None:
        os.write(2, line.encode())
        return
    path = os.path.join(folder, f"rank-{os.environ.get('RANK', '0')}.txt")
    with open(f"{path}.tmp", "w") as f:
        f.write(line)
    os.replace(f"{path}.tmp", path)


def _probed_app(**kwargs) -> None:
    # registered once the rank's own exit handler is (pipeline.errors.run_as_rank), so that it runs before it
    atexit.register(_report)
    _app(**kwargs)


_app, cli.app = cli.app, _probed_app
sys.argv = ["repa", *sys.argv[1:]]
cli.main()
