"""Math settings every stage uses on CUDA, applied before any model runs (and before any benchmark
timing, so that a measurement and a real run execute the same kernels)."""

from __future__ import annotations

import torch


def fast_cuda_math(device: torch.device, autotune: bool = True) -> None:
    """TF32 matmuls and convolutions (bf16/fp16 runs lose nothing by it); cuDNN autotuning for fixed
    input shapes (encoders see one image size). No effect off CUDA."""
    if torch.device(device).type != "cuda":
        return
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = autotune
