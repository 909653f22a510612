"""How a process runs: threads per process, CUDA math settings, helper processes tied to their parent, stop
signals, progress bars and position-keyed seeds."""
