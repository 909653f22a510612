"""Batches on the training device, the next one already on its way while the current one computes.

A copy issued on the default CUDA stream waits for the kernels queued before it, so a step's upload
could never overlap the previous step's compute. Here each batch is copied on a side stream from
pinned memory (the DataLoader's pinning thread), and the compute stream waits for that copy through
an event only when it needs the batch. Where there is no CUDA device the batches are moved as they come.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from stages.core.data.codec import features_to_device


def pad_text(batch: dict, length: int) -> dict:
    """Caption entries zero-padded (mask False) to ``length`` tokens: one shape for every batch, so a
    compiled model is traced once instead of once per caption length."""
    if "text" not in batch or batch["text"].shape[1] == length:
        return batch
    have = batch["text"].shape[1]
    if have > length:
        raise ValueError(f"a caption has {have} tokens, more than the cache's maximum of {length}")
    out = dict(batch)
    for name in ("text", "text_scale", "text_mask"):
        if name in batch:
            t = batch[name]
            pad = t.new_zeros((t.shape[0], length - have) + tuple(t.shape[2:]))
            out[name] = torch.cat([t, pad], dim=1)
    return out


class DevicePrefetcher:
    """Iterates ``batches`` (dicts of CPU tensors) as dicts on ``device``, int8 features dequantised
    there; with CUDA, batch n+1 is uploaded on a side stream while batch n is in use."""

    def __init__(self, batches: Iterator[dict], device: torch.device, text_length: int | None = None):
        self.batches, self.device, self.text_length = batches, torch.device(device), text_length
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._next: tuple[dict, torch.cuda.Event | None] | None = None

    def __iter__(self) -> DevicePrefetcher:
        return self

    def _upload(self) -> tuple[dict, torch.cuda.Event | None]:
        host = next(self.batches)
        if self.stream is None:
            return {name: t.to(self.device) for name, t in host.items()}, None
        with torch.cuda.stream(self.stream):
            moved = {name: t.to(self.device, non_blocking=True) for name, t in host.items()}
            done = torch.cuda.Event()
            done.record(self.stream)
        return moved, done

    def __next__(self) -> dict:
        moved, done = self._next if self._next is not None else self._upload()
        if done is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(done)
            for t in moved.values():  # made on the side stream, used on this one: the allocator must know
                t.record_stream(current)
        try:
            self._next = self._upload()  # the next copy starts now and overlaps this batch's compute
        except StopIteration:
            self._next = None
        batch = features_to_device(moved, self.device)
        return pad_text(batch, self.text_length) if self.text_length is not None else batch
