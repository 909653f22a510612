"""`python -m pipeline ARGS` as a torchrun rank runs it, reporting at exit how many of the process group's
native threads are still alive: after a clean teardown none are, and none can then abort the rank while
the interpreter shuts down."""

import atexit
import glob
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
    print(f"rank exit: {sum('gloo' in n for n in names)} gloo thread(s) alive", file=sys.stderr, flush=True)


atexit.register(_report)
sys.argv = ["repa", *sys.argv[1:]]
runpy.run_module("pipeline", run_name="__main__", alter_sys=True)
