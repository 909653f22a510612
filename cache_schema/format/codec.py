"""Feature codecs, defined here with numpy as the reference.

``fp16`` stores features as they are; ``int8`` stores one int8 per value plus a float16 scale per
token (absmax / 127), halving bytes at cosine > 0.999 to the fp16 features. Writers quantise on
their device and readers dequantise after a batch reached its device (numpy dequantisation of a
training batch costs hundreds of milliseconds); those torch versions must agree with these.
"""

from __future__ import annotations

import numpy as np


def quantize_int8_numpy(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-token (last axis) symmetric int8: (q int8, scale float16) with x ~= q * scale.

    The scale is rounded to float16 first and the values are quantised with that rounded scale, so
    reconstruction error stays within half a quantisation step.
    """
    x32 = np.asarray(x, dtype=np.float32)
    scale = (np.abs(x32).max(axis=-1, initial=0.0) / 127.0).astype(np.float16)
    s = np.maximum(scale.astype(np.float32), np.finfo(np.float32).tiny)
    q = np.clip(np.rint(x32 / s[..., None]), -127, 127).astype(np.int8)
    return q, scale


def dequantize_int8_numpy(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """int8 values and their per-token scale back to float16."""
    return (q.astype(np.float32) * scale.astype(np.float32)[..., None]).astype(np.float16)
