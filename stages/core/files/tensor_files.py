"""Torch files: read without running code stored in them, written whole or not at all.

Every such file (RAE's ``stat.pt``, its decoder ``model.pt``, its stage-2 ``stage2_model.pt``) is read with
``torch.load(weights_only=True)``; anything else it could hold (a pickled object, a truncated file) ends in
one :class:`UsageError` line naming the file and what was expected. What a run writes (checkpoints,
preview latents) goes through :func:`save_tensors`, so a kill or a full disk never leaves a half file.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
from torch import Tensor, nn

from cache_schema.storage.fsutil import fsync_dir
from stages.core.errors import UsageError


def load_tensors(path: Path | str, what: str) -> object:
    """The file's contents (tensors and plain values only); ``what`` names the file's role in errors."""
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file (expected {what})") from None
    except IsADirectoryError:
        raise UsageError(f"{path}: is a directory (expected {what}, a .pt file)") from None
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UsageError(f"{path}: not a loadable {what} ({type(e).__name__}: {first[:160]}); only tensors and "
                         "plain values are read") from None


def load_state_dict_file(path: Path | str, what: str, prefer: tuple[str, ...] = ("ema", "model")) -> dict[str, Tensor]:
    """A bare state dict, or the first of ``prefer`` in a training checkpoint ``{"model": ..., "ema": ...}``;
    DDP's ``module.`` and torch.compile's ``_orig_mod.`` prefixes are stripped."""
    return state_dict_in(load_tensors(path, what), path, what, prefer)


def state_dict_in(obj: object, path: Path | str, what: str, prefer: tuple[str, ...] = ("ema", "model")
                  ) -> dict[str, Tensor]:
    """:func:`load_state_dict_file` on contents already loaded, so one file read can give several entries."""
    if isinstance(obj, dict):
        for key in prefer:
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not (isinstance(obj, dict) and obj
            and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())):
        raise UsageError(f"{path}: not a state dict of tensors (expected {what})")
    out = {}
    for key, value in obj.items():
        stripped = True
        while stripped:
            stripped = False
            for prefix in ("module.", "_orig_mod."):
                if key.startswith(prefix):
                    key, stripped = key[len(prefix):], True
        out[key] = value
    return out


def check_state_dict_fits(expected: dict[str, Tensor], state: dict[str, Tensor], path: Path | str, hint: str) -> None:
    """One error line naming the first missing, unexpected and mis-shaped keys, unless ``state`` fits exactly."""
    want = {k: tuple(v.shape) for k, v in expected.items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    missing = sorted(set(want) - set(got))
    unexpected = sorted(set(got) - set(want))
    wrong = sorted(k for k in set(want) & set(got) if want[k] != got[k])
    if missing or unexpected or wrong:
        parts = [f"{label} {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                 for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if keys]
        raise UsageError(f"{path}: does not fit ({'; '.join(parts)}); {hint}")


M = TypeVar("M", bound=nn.Module)


def load_released_weights(build: Callable[[], M], path: Path | str, what: str, hint: str,
                          device: torch.device | str = "cpu") -> M:
    """A released state dict (``load_state_dict_file``) in the network ``build()`` makes, which is built on the
    meta device first, so a file that does not fit is refused (``check_state_dict_fits``) before any memory is
    spent on it; every key must match, as the releases load with ``strict=True``."""
    state = load_state_dict_file(path, what)
    with torch.device("meta"):
        model = build()
    check_state_dict_fits(model.state_dict(), state, path, hint)
    model = model.to_empty(device=device)
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return model.eval()


def save_tensors(path: Path, state: dict, what: str) -> None:
    """torch.save to a temporary file, fsync, rename, fsync the directory; ``what`` names the file in errors.

    A write that fails for any reason (torch reports a full disk as a RuntimeError, not an OSError)
    removes the temporary file and leaves the files already written as they were. torch writes to
    the path itself: given a Python file, a stop signal raised inside one of its writes comes out as
    torch's RuntimeError, a failed write, instead of the stop it is."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save(state, str(tmp))
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if not isinstance(e, Exception):  # an interrupt: the caller's to handle
            raise
        cause = e.strerror if isinstance(e, OSError) and e.strerror else (str(e).strip().splitlines() or [""])[0]
        raise UsageError(f"{path}: {what} not written ({type(e).__name__}: {cause[:200]}); the checkpoints "
                         "before it are kept: free space or fix the cause, then rerun the same command to continue "
                         "from the newest") from None
