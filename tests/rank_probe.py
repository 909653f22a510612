"""`python -m pipeline ARGS` as a torchrun rank runs it, reporting at exit how many of the process group's
native threads are still alive: after a clean teardown none are, and none can then abort the rank while
the interpreter shuts down.

Each rank writes its report to a file of its own, ``$RANK_PROBE_DIR/rank-<RANK>.txt`` (written aside and
renamed), so reports of ranks sharing a stderr can never run together, nor into another rank's progress
bar; without ``RANK_PROBE_DIR`` the report is one whole-line write to stderr.
"""

import atexit
import glob
import os
import runpy
import sys


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


atexit.register(_report)
sys.argv = ["repa", *sys.argv[1:]]
runpy.run_module("pipeline", run_name="__main__", alter_sys=True)
