"""Training data from the feature cache: resumable sampler, batch dataset, loader.

Only the cache is read here; no encoder is ever loaded. A batch is fetched whole by one
DataLoader worker (``__getitems__``) straight into shared-memory buffers, which the worker reuses
once the training process has dropped every reference to them: collation is free, nothing is
pickled but tensor handles, and no memory is allocated per batch. int8 features travel as int8
and are dequantised on the training device (``stages.core.data.codec.features_to_device``).
"""

from __future__ import annotations

import copy
import functools
import math
import multiprocessing
import os
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from cache_schema import CacheError, FastReader
from cache_schema.format.layout import FIRST_TARGET, flip_name
from stages.core.runtime.processes import exit_with_process

Batch = dict[str, torch.Tensor]


def piece_index(rank: int, micro: int, world_size: int) -> int:
    """Which of the ``world_size x grad_accum`` equal pieces of a step's global batch is micro-batch ``micro``
    of rank ``rank``."""
    return micro * world_size + rank


class EpochBatchSampler:
    """Micro-batches of ids for one process: each step takes the next slice of a per-epoch permutation.

    The permutation of ``ids`` depends only on (seed, epoch). Step ``k`` of an epoch takes positions
    ``[k * G, (k + 1) * G)`` of it, ``G = batch_size * world_size * grad_accum`` (the global batch, in distinct
    ids), whatever the number of processes; the ``len(ids) % G`` ids after the last whole global batch sit out
    that epoch (different ones every epoch). The global batch is cut into ``world_size * grad_accum`` pieces of
    ``batch_size`` (``piece_index``): micro-batch ``m`` of rank ``r`` is piece ``m * world_size + r``. So which
    id sits at which position of which step's global batch is a function of (seed, step, position) alone: a run
    resumed on another number of processes, or with other accumulation, but the same global batch, reads the
    same data.
    Iteration never ends: it runs through epochs from ``start = (epoch, step_in_epoch)``, so a run resumed at
    ``position_after(steps done)`` continues exactly where the interrupted one stopped.

    With ``flip``, each position of the epoch's permutation also gets a fair coin from the same
    (seed, epoch) stream, drawn after the permutation (which is the one without ``flip``): a sample
    whose coin is heads is served as ``~id`` (negative), read from the features of its flipped crop
    (``CacheBatchDataset``). What a batch holds stays a function of (seed, epoch, position).

    With ``drop_last=False`` the epoch's last, short global batch is served too, each piece holding its
    positions of it (some may be short or empty).
    """

    def __init__(
        self,
        ids: np.ndarray,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = True,
        start: tuple[int, int] = (0, 0),
        name: str = "the id set",
        flip: bool = False,
        grad_accum: int = 1,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        if batch_size < 1 or grad_accum < 1:
            raise ValueError(f"batch size and accumulation must be positive, got {batch_size} and {grad_accum}")
        self.ids = np.asarray(ids, dtype=np.int64)
        self.batch_size, self.seed = batch_size, seed
        self.rank, self.world_size, self.grad_accum = rank, world_size, grad_accum
        self.drop_last, self.flip = drop_last, flip
        self.global_batch = batch_size * world_size * grad_accum
        if self.global_batch > len(self.ids):
            share = len(self.ids) // (world_size * grad_accum)
            split = f"{world_size} process(es)" + (f" x {grad_accum} micro-batches" if grad_accum > 1 else "")
            raise ValueError(
                f"batch {batch_size} > {share} samples per process in {name} "
                f"({len(self.ids)} samples over {split}); lower the batch size"
            )
        rounding = math.floor if drop_last else math.ceil
        self.batches_per_epoch = rounding(len(self.ids) / self.global_batch)  # steps per epoch
        epoch, batch = start
        if epoch < 0 or not 0 <= batch < self.batches_per_epoch:
            raise ValueError(f"start {start} outside epochs of {self.batches_per_epoch} steps")
        self.start = (epoch, batch)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Every id of ``epoch`` in the order of its global batches (``~id``: flipped)."""
        rng = np.random.default_rng([self.seed, epoch])
        ids = self.ids[rng.permutation(len(self.ids))]
        if self.flip:
            heads = rng.random(len(self.ids)) < 0.5
            ids = np.where(heads, ~ids, ids)
        return ids

    def pieces(self, order: np.ndarray, step: int) -> list[np.ndarray]:
        """This rank's micro-batches of step ``step`` of an epoch in ``order``."""
        first = step * self.global_batch
        starts = [first + piece_index(self.rank, m, self.world_size) * self.batch_size for m in range(self.grad_accum)]
        return [order[a : a + self.batch_size] for a in starts]

    def epoch_ids(self, epoch: int) -> np.ndarray:
        """This rank's ids for ``epoch``, in the order they will be served (``~id``: flipped)."""
        order = self.epoch_order(epoch)
        pieces = [p for k in range(self.batches_per_epoch) for p in self.pieces(order, k)]
        return np.concatenate(pieces) if pieces else order[:0]

    def position_after(self, num_steps: int) -> tuple[int, int]:
        """(epoch, step in epoch) of the next step once ``num_steps`` from ``start`` are done."""
        done = self.start[0] * self.batches_per_epoch + self.start[1] + num_steps
        return divmod(done, self.batches_per_epoch)

    def __iter__(self) -> Iterator[np.ndarray]:
        epoch, step = self.start
        while True:
            order = self.epoch_order(epoch)
            for k in range(step, self.batches_per_epoch):
                yield from self.pieces(order, k)
            epoch, step = epoch + 1, 0


# Where a batch entry is read into: alloc(name, shape, dtype) -> an uninitialised tensor.
Allocator = Callable[[str, tuple[int, ...], torch.dtype], torch.Tensor]


def _plain_tensor(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Allocator for batches read in the training process itself."""
    return torch.empty(shape, dtype=dtype)


def _shared_tensor(
    shape: tuple[int, ...], dtype: torch.dtype, storage: torch.UntypedStorage | None = None
) -> torch.Tensor:
    """A tensor in shared memory, so that sending it to another process copies nothing. Uses
    ``storage`` when given (it must be large enough); otherwise allocates new shared memory."""
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    if storage is None:
        storage = torch.empty(nbytes, dtype=torch.uint8).share_memory_().untyped_storage()
    # torch takes set_(storage, offset, size) with a contiguous stride; its stubs list only the 4-argument form
    return torch.empty(0, dtype=dtype).set_(storage, 0, shape)  # type: ignore[call-overload]


def _share(values: np.ndarray) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(values))
    return t.share_memory_() if t.numel() else t


class CacheBatchDataset(Dataset):
    """Batches of cached features, fetched whole through ``__getitems__``.

    A batch is a dict of tensors: ``index`` (B,) int64 global ids; ``moments`` (B, 2C, h, w) fp16;
    ``dino`` (B, T, D) as stored, with ``dino_scale`` (B, T) for int8 (each of ``targets`` likewise, by name);
    ``label`` (B,) int64 (-1: none); with ``need_text``: ``text`` (B, Lmax, Dt) as stored and zero-padded, ``text_mask``
    (B, Lmax) bool, and ``text_scale`` (B, Lmax) for int8. Fields not asked for are not read.

    With ``flips``, an id given as ``~id`` (negative, see ``EpochBatchSampler``) is served with the moments
    and targets of its flipped crop (the ``_flip`` fields; label and caption are the sample's). A batch holds
    the unflipped samples first, then the flipped ones, each group in the order given, so each group is
    read into one contiguous slice; ``index`` says which sample each row is.
    """

    def __init__(
        self,
        cache_dir: str | Path,
        need_dino: bool = True,
        need_text: bool = False,
        need_label: bool = True,
        parts: list[str] | None = None,
        targets: list[str] | None = None,
        flips: bool = False,
        index: dict[str, np.ndarray] | None = None,
        class_tokens: bool = False,
        need_moments: bool = True,
    ):
        """``need_moments`` False: no VAE moments (a run diffusing a target's tokens); ``targets``: the alignment
        targets read with ``need_dino`` (default: the first, dino); ``flips``: serve ``~id`` flipped (the cache
        must hold flips); ``index``: labels or caption spans another dataset over the same parts has read already
        (not read again); ``class_tokens``: also ``{target}_cls`` of each target read (of the first one without
        ``need_dino``), for REG."""
        self.reader = FastReader(cache_dir, parts)
        wanted = ({"label"} if need_label else set()) | ({"text_start", "text_count"} if need_text else set())
        self.reader.adopt_index({k: v for k, v in (index or {}).items() if k in wanted})
        if need_text and not self.reader.has_text:
            raise CacheError(
                f"{cache_dir}: cache has no text features but this run needs them; "
                "re-encode with a text encoder or train without text conditioning"
            )
        named = targets or [FIRST_TARGET]
        cls_targets = (named if need_dino else named[:1]) if class_tokens else []
        targets = (targets or ["dino"]) if need_dino else []
        self.reader.require_targets(targets)
        names = (["moments"] if need_moments else []) + targets + (["label"] if need_label else [])
        if self.reader.manifest.codec == "int8":
            names += [f"{name}_scale" for name in targets]
        names += [f"{name}_cls" for name in cls_targets]
        self.per_sample = names
        # The field each per-sample name is read from for a flipped sample (label has no flipped twin).
        self.flipped = {}
        if flips:
            self.flipped = {name: name if name == "label" else flip_name(name) for name in names}
            missing = [n for n in self.flipped.values() if n not in self.reader.fields]
            if missing:
                raise CacheError(f"{cache_dir}: cache holds no features of flipped crops ({missing[0]}); re-encode "
                                 "it with `repa encode --flips` to train with --flip")
        self.need_text = need_text
        # Labels and caption spans are read once, here, into shared memory: workers map the same pages
        # instead of each reading its own copy (~290 MB per process at 12 M samples).
        self.reader.load_index(label=need_label, text=need_text)
        self._index = {name: _share(values) for name, values in self.reader.index_arrays().items()}
        self.reader.adopt_index({name: t.numpy() for name, t in self._index.items()})

    def __getstate__(self) -> dict:
        reader = copy.copy(self.reader)
        reader.adopt_index({})  # the shared tensors in _index travel instead, as handles
        return {**self.__dict__, "reader": reader}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.reader.adopt_index({name: t.numpy() for name, t in self._index.items()})

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, index: int) -> Batch:
        """A batch of one sample (the dataset is meant to be read batch-wise)."""
        return self.__getitems__([index])

    def __getitems__(self, ids) -> Batch:
        return self.fetch(ids, _plain_tensor)

    def fetch(self, ids, alloc: Allocator) -> Batch:
        """The batch for ``ids``, read straight into tensors obtained from ``alloc(name, shape, dtype)``."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        flipped = ids < 0
        k = len(ids)
        if self.flipped and flipped.any():
            k = int((~flipped).sum())
            ids = np.concatenate([ids[~flipped], ~ids[flipped]])
        ids = self.reader.checked_ids(ids)  # a negative id without flips is out of range
        batch: Batch = {"index": alloc("index", ids.shape, torch.int64)}
        batch["index"].numpy()[...] = ids
        for name in self.per_sample:
            f = self.reader.fields[name]
            batch[name] = alloc(name, (len(ids),) + f.inner_shape, getattr(torch, f.dtype))
        self.reader.read_many(ids[:k], {name: batch[name].numpy()[:k] for name in self.per_sample})
        if k < len(ids):
            self.reader.read_many(ids[k:], {self.flipped[name]: batch[name].numpy()[k:] for name in self.per_sample})
        if self.need_text:
            batch.update(self._text(ids, alloc))
        return batch

    def _text(self, ids: np.ndarray, alloc: Allocator) -> Batch:
        lengths = self.reader.text_lengths(ids)
        lead = (len(ids), int(lengths.max(initial=0)))
        fields = self.reader.fields
        out = {"text": alloc("text", lead + fields["text"].inner_shape, getattr(torch, fields["text"].dtype))}
        if self.reader.manifest.codec == "int8":
            out["text_scale"] = alloc("text_scale", lead, getattr(torch, fields["text_scale"].dtype))
        scale_out = out["text_scale"].numpy() if "text_scale" in out else None
        self.reader.read_text(ids, padded=True, out=out["text"].numpy(), scale_out=scale_out)
        out["text_mask"] = alloc("text_mask", lead, torch.bool)
        np.less(np.arange(lead[1]), lengths[:, None], out=out["text_mask"].numpy())
        return out


# -- loading in worker processes ------------------------------------------------------------------
# A 100 MiB batch (256 SiT-XL/2 samples) in fresh shared memory costs a worker ~75-90 ms of page
# allocation and faults on a 2-core VM, more than reading it (shared memory gets no huge pages).
# So each worker keeps a few shared buffers ("slots") and refills one only after the main process
# has seen every reference to it dropped, signalled through a small shared table of flags; this
# took the 2-worker loader from ~1 800 to ~4 500 samples per CPU-second. Correctness never depends
# on timing: a worker that finds no free slot reads into fresh shared memory instead.
_SLOT_KEY = "_slot"
_FREE, _LENT = 0, 1
# A batch as a worker sends it: the Batch, and under _SLOT_KEY (worker, slot) of the memory it was read into.
SlottedBatch = dict[str, torch.Tensor | tuple[int, int]]


def _with_slot(batch: Batch, worker: int, slot: int) -> SlottedBatch:
    return {**batch, _SLOT_KEY: (worker, slot)}


class _SlottedDataset(Dataset):
    """Worker side: fetches each batch into the first free slot of this worker."""

    def __init__(self, dataset: CacheBatchDataset, flags: torch.Tensor):
        self.dataset = dataset
        self.flags = flags  # (workers, slots) uint8 in shared memory, written by both sides
        self._buffers: list[dict[str, torch.UntypedStorage]] = []

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitems__(self, ids) -> SlottedBatch:
        info = get_worker_info()
        assert info is not None  # read only in the loader's worker processes (make_loader)
        worker = info.id
        row = self.flags[worker].numpy()
        free = np.flatnonzero(row == _FREE)
        if len(free) == 0:
            return _with_slot(self.dataset.fetch(ids, lambda name, shape, dtype: _shared_tensor(shape, dtype)),
                              worker, -1)
        slot = int(free[0])
        row[slot] = _LENT
        while len(self._buffers) <= slot:
            self._buffers.append({})
        try:
            batch = self.dataset.fetch(ids, lambda name, shape, dtype: self._slot_tensor(slot, name, shape, dtype))
        except BaseException:  # the error goes to the main process; the slot was never handed out
            row[slot] = _FREE
            raise
        return _with_slot(batch, worker, slot)

    def _slot_tensor(self, slot: int, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        buffers = self._buffers[slot]
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if name not in buffers or buffers[name].nbytes() < nbytes:
            buffers[name] = _shared_tensor((max(nbytes, 1),), torch.uint8).untyped_storage()
        return _shared_tensor(shape, dtype, buffers[name])


def storage_lifetime_is_observable() -> bool:
    """Whether a weak reference to a tensor's storage dies exactly when the last tensor or view using
    that memory dies: true when torch gives each storage one Python object for its whole life, which
    the slot recycling below relies on. Checked once per process, not assumed."""
    t = torch.empty(16)
    if t.untyped_storage() is not t.untyped_storage():
        return False
    ref = weakref.ref(t.untyped_storage())
    view = t[4:8]
    del t
    alive_with_view = ref() is not None
    del view
    return alive_with_view and ref() is None


class RecyclingLoader(DataLoader):
    """A DataLoader over worker slots (see ``make_loader``); yields batches without ``_SLOT_KEY``.

    A slot is handed back to its worker once every tensor (and every view) of the batch read into it
    is gone, seen through weak references to the batch's storages and checked each time the next
    batch is requested. Keeping a batch longer is safe; it only makes its worker fall back to fresh
    memory (counted in ``unrecycled_batches``). Where storage lifetimes cannot be observed (see
    ``storage_lifetime_is_observable``) each batch is copied out of its slot on arrival instead
    (``copy_out``), which is correct and slower.
    """

    def __init__(self, dataset: _SlottedDataset, copy_out: bool | None = None, **kwargs):
        super().__init__(dataset, **kwargs)
        self.flags = dataset.flags
        self.unrecycled_batches = 0
        self.copy_out = not storage_lifetime_is_observable() if copy_out is None else copy_out
        self._lent: dict[tuple[int, int], list[weakref.ref]] = {}

    def __iter__(self) -> Iterator[Batch]:  # type: ignore[override]  # serves batches, not DataLoader's iterator
        batches = super().__iter__()
        while True:
            # Release before asking: receiving a batch lets the DataLoader hand its worker the next task.
            self._release_unused()
            batch = next(batches, None)
            if batch is None:
                return
            worker, slot = batch.pop(_SLOT_KEY)
            if slot < 0:
                self.unrecycled_batches += 1
            elif all(t.is_pinned() for t in batch.values() if t.numel()):
                # The DataLoader's pinning thread has copied the batch out of the slot already.
                # (pin_memory=True alone says nothing: without an accelerator nothing is pinned.)
                self.flags[worker, slot] = _FREE
            elif self.copy_out:
                batch = {name: t.clone() for name, t in batch.items()}
                self.flags[worker, slot] = _FREE
            else:
                self._lent[(worker, slot)] = [weakref.ref(t.untyped_storage()) for t in batch.values()]
            yield batch

    def _release_unused(self) -> None:
        for key, refs in list(self._lent.items()):
            if all(ref() is None for ref in refs):
                del self._lent[key]
                self.flags[key] = _FREE


def _whole_batch(batch: Batch) -> Batch:
    """Collation is a no-op: ``__getitems__`` already returns the batch."""
    return batch


def make_loader(
    dataset: CacheBatchDataset,
    batch_sampler: EpochBatchSampler,
    num_workers: int,
    pin_memory: bool = False,
    prefetch_factor: int = 2,
    copy_out: bool | None = None,
) -> DataLoader:
    """A DataLoader that fetches whole batches in ``num_workers`` persistent worker processes.

    Workers are forked from a clean ``forkserver`` process that has imported this module (and so
    torch) once: forking the training process itself is not an option, since tensorstore aborts a
    forked child once the parent has used it, and ``spawn`` workers re-import torch each and exit
    through interpreter teardown, which aborts in torch when batches are still queued. With
    workers, batches arrive in recycled shared memory (``RecyclingLoader``).
    """
    if num_workers == 0:
        # torch's stubs type a batch_sampler's batches as lists and collate_fn's input as a list of samples;
        # DataLoader hands each ndarray batch to __getitems__ and what that returns to collate_fn unchanged
        return DataLoader(dataset, batch_sampler=batch_sampler, collate_fn=_whole_batch,  # type: ignore[arg-type]
                          pin_memory=pin_memory)
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])  # no effect once the server runs; it has them then
    # prefetch_factor batches queued per worker, one with the consumer, one awaiting release.
    flags = torch.zeros((num_workers, prefetch_factor + 2), dtype=torch.uint8).share_memory_()
    return RecyclingLoader(
        _SlottedDataset(dataset, flags),
        copy_out=copy_out,
        batch_sampler=batch_sampler,
        num_workers=num_workers,
        collate_fn=_whole_batch,
        pin_memory=pin_memory,
        persistent_workers=True,
        prefetch_factor=prefetch_factor,
        multiprocessing_context=context,
        worker_init_fn=functools.partial(exit_with_process, os.getpid()),
    )
