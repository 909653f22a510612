"""What the full encode and ``--add-target`` share: the process and its device, and one pass over the claimed
input shards (decode workers -> encoder -> background part sink), with progress, and the claims released
however the pass ends."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from cache_schema.writing.claims import Heartbeat
from stages.core.encoders.load import torch_dtype
from stages.core.runtime.cuda_settings import fast_cuda_math
from stages.core.runtime.processes import exit_with_parent
from stages.core.runtime.progress import progress_bar

from .part_sink import PartSink, SinkStats, feeding
from .source import Batch, ShardStream

if TYPE_CHECKING:
    from accelerate import PartialState

DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


@dataclass
class Process:
    state: PartialState
    device: torch.device
    dtype: torch.dtype

    @property
    def main(self) -> bool:
        return self.state.is_main_process

    @property
    def dtype_name(self) -> str:
        return DTYPE_NAMES[self.dtype]


def this_process(dtype: str) -> Process:
    """This process of the job (one per GPU, or one on the CPU), with the encoders' dtype and CUDA math set."""
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    fast_cuda_math(state.device)
    return Process(state, state.device, torch_dtype(dtype, state.device))


@dataclass
class Pass:
    """One pass of this process over the shards it claimed."""

    stream: ShardStream
    workers: int
    sink: PartSink
    heartbeat: Heartbeat
    release: Callable[[], None]  # drops this process's claims left uncommitted
    encode: Callable[[Batch], tuple[dict, torch.cuda.Event | None]]  # features on the host, and when they are there
    total: int | None  # images the bar expects, every process's
    desc: str
    processes: int = 1  # other processes run at about the same rate: the bar counts theirs too
    postfix: Callable[[], dict] | None = None


@dataclass
class PassResult:
    stats: SinkStats
    seconds: float
    steady_rate: float | None  # img/s of this process from its first batch to its last, when it saw two


def run_pass(p: Pass, process: Process) -> PassResult:
    loader = torch.utils.data.DataLoader(
        p.stream, batch_size=None, num_workers=p.workers, prefetch_factor=4 if p.workers else None,
        pin_memory=process.device.type == "cuda", worker_init_fn=exit_with_parent if p.workers else None,
    )
    bar = progress_bar(total=p.total, unit="img", disable=not process.main, dynamic_ncols=True, desc=p.desc)
    start = time.perf_counter()
    first: float | None = None  # arrival of the first batch
    last = start  # submission of the last batch (set with or after first)
    steady = 0  # images after the first batch
    with feeding(p.sink, bar, p.heartbeat, p.release):
        for batch in loader:
            if first is None and len(batch):
                first = time.perf_counter()
            elif first is not None:
                steady += len(batch)
            features, ready = p.encode(batch) if len(batch) else ({}, None)  # an empty batch ends a shard
            p.sink.submit(batch, features, ready)
            last = time.perf_counter()
            bar.update(len(batch) * p.processes)
            if p.postfix is not None:
                bar.set_postfix(**p.postfix(), refresh=False)
        stats = p.sink.close()
    rate = steady / (last - first) if first is not None and last > first else None
    return PassResult(stats, time.perf_counter() - start, rate)
