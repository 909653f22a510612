"""How many intra-op threads a process gives torch.

torch starts one intra-op thread per core in every process. With several processes per machine
(one per GPU, plus loader or decode workers) those threads outnumber the cores, and when a core is
taken they spin-wait for it and everything slows several-fold (BENCHMARKS.md, "Design measurements"). So each
process takes its share of the cores, less the worker processes it feeds from, and at least one.
"""

from __future__ import annotations

import os

import torch


def available_cores() -> int:
    """Cores this process may run on (its affinity mask, which containers and schedulers set)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def local_processes() -> int:
    """Processes of this job on this machine, as ``accelerate launch`` / ``torchrun`` announce them."""
    return max(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1)


def intra_op_threads(workers: int, cores: int | None = None, processes: int | None = None) -> int:
    """Cores per process minus the ``workers`` that process starts, at least 1."""
    cores = available_cores() if cores is None else cores
    processes = local_processes() if processes is None else processes
    return max(cores // processes - workers, 1)


def set_threads(requested: int | None, workers: int) -> int:
    """Give torch ``requested`` intra-op threads, or when None a share of the cores (see module doc);
    an ``OMP_NUM_THREADS`` set by the user is respected then. Returns the number in use."""
    if requested is None:
        if os.environ.get("OMP_NUM_THREADS"):
            return torch.get_num_threads()
        requested = intra_op_threads(workers)
    if requested < 1:
        raise ValueError(f"threads must be at least 1, got {requested}")
    torch.set_num_threads(requested)
    return requested
