"""How a training stops on a scheduler's signal (``--stop-signals``): after the optimizer step in flight,
with a checkpoint of that step, on every process at the same step.

Only some processes may receive the signal (a scheduler signalling one node, Ctrl-C in one
terminal), so the processes vote after every step: each one's signal number, all-reduced by MAX
over a gloo group on the CPU (one small message, no wait on the GPU's queue). A second signal on a
process stops it at once with the newest checkpoint written so far.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from stages.core.files.checkpoint import checkpoint_path
from stages.core.runtime.stop import Interrupted, StopSignals, parse_signals, signal_name

from .config import TrainConfig

if TYPE_CHECKING:
    from accelerate import Accelerator
    from torch.distributed import ProcessGroup


class TrainStop:
    def __init__(self, cfg: TrainConfig) -> None:
        self.run_dir, self.steps = Path(cfg.run_dir), cfg.steps
        self.main = os.environ.get("RANK", "0") == "0"
        self.last_checkpoint: int | None = None  # the newest checkpoint on disk, kept up to date by the loop
        self.signals = StopSignals(parse_signals(cfg.stop_signals), self._at_once, graceful=True)
        self.group: ProcessGroup | None = None  # the vote's (gloo); None: one process
        self.world = 1

    def join(self, accelerator: Accelerator) -> None:
        """Set up the vote (every process, at the same point)."""
        self.world = accelerator.num_processes
        if self.world > 1:
            import torch.distributed as dist

            self.group = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")

    def leave(self) -> None:
        """Let go of the vote's group, so that tearing the process group down ends its threads."""
        self.group, self.world = None, 1

    def agreed(self) -> int:
        """The signal (its number) some process received, else 0; the same on every process."""
        mine = self.signals.signum or 0
        if self.world == 1:
            return mine
        import torch.distributed as dist

        vote = torch.tensor([mine], dtype=torch.int64)
        dist.all_reduce(vote, op=dist.ReduceOp.MAX, group=self.group)
        return int(vote.item())

    def stopped(self, signum: int, step: int, start_step: int) -> Interrupted:
        """The end of a training stopped by ``signum`` after ``step``."""
        name = signal_name(signum)
        if step > start_step:
            line = (f"{name}: stopped after step {step} of {self.steps}, checkpoint "
                    f"{checkpoint_path(self.run_dir, step)} written; rerun the same command to resume from it")
        elif step:
            line = f"{name}: stopped before training on from step {step}; rerun the same command to resume from it"
        else:
            line = f"{name}: stopped before the first step; nothing was trained; rerun the same command to start"
        return Interrupted(signum, line if self.main else "")

    def _at_once(self, signum: int) -> str:
        if not self.main:
            return ""
        name, first = signal_name(signum), signal_name(self.signals.signum or signum)
        kept = (f"the newest checkpoint is {checkpoint_path(self.run_dir, self.last_checkpoint)}; rerun the same "
                "command to resume from it" if self.last_checkpoint else
                "no checkpoint was written; rerun the same command to start again")
        return f"{name} after {first}: stopped at once, the steps since the newest checkpoint are lost; {kept}"
