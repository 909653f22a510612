"""The manifest: what a cache holds, how it was made, and which parts are committed.

The manifest is the single source of truth for readers. Writers update it under an advisory
file lock (``fcntl.flock`` on ``.manifest.lock``) with an atomic replace, so any number of
processes, on one machine or several sharing a POSIX filesystem, may commit parts concurrently.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from .errors import CacheError
from .fsutil import atomic_write_json
from .layout import LOCK_NAME, MANIFEST_NAME, SCHEMA_VERSION, Field

# Settings that change the stored features. Two caches agree on these or they are different caches.
FINGERPRINT_KEYS = (
    "schema_version",
    "resolution",
    "crop",
    "vae",
    "dino",
    "dino_preprocess",
    "text_encoder",
    "max_text_tokens",
    "dtype",
    "feature_codec",
)


def fingerprint(settings: dict) -> str:
    """sha256 over the canonical JSON of the fingerprint settings (first 16 hex digits)."""
    canon = {k: settings.get(k) for k in FINGERPRINT_KEYS}
    return hashlib.sha256(json.dumps(canon, sort_keys=True).encode()).hexdigest()[:16]


def settings_diff(old: dict, new: dict) -> list[str]:
    """Names of the fingerprint settings that differ, each as 'name: old -> new'."""
    out = []
    for k in FINGERPRINT_KEYS:
        if old.get(k) != new.get(k):
            out.append(f"{k}: {_short(old.get(k))} -> {_short(new.get(k))}")
    return out


def _short(v) -> str:
    s = json.dumps(v, sort_keys=True)
    return s if len(s) <= 120 else s[:117] + "..."


@dataclass
class PartRecord:
    name: str
    source: str
    num_samples: int
    num_text_tokens: int = 0
    bytes: int = 0
    skipped: int = 0
    latent_sum: list[float] = field(default_factory=list)
    latent_sumsq: list[float] = field(default_factory=list)
    latent_count: int = 0
    writer: str = ""


@dataclass
class Manifest:
    settings: dict
    latent: dict  # channels, size, scaling_factor, shift_factor, mean, std
    dino: dict  # model, dim, tokens, grid, registers
    text: dict | None  # model, dim, max_tokens, or None without a text encoder
    fields: dict  # name -> {dtype, shape, per_sample, doc}
    encoders: dict = field(default_factory=dict)  # role -> {id, subfolder, revision}: where to load them again
    fingerprint: str = ""
    schema_version: int = SCHEMA_VERSION
    parts: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    created: str = ""
    updated: str = ""

    # -- derived views -------------------------------------------------------------------------
    @property
    def num_samples(self) -> int:
        return sum(p["num_samples"] for p in self.parts)

    @property
    def codec(self) -> str:
        return self.settings["feature_codec"]

    @property
    def shard_size(self) -> int:
        return self.settings["shard_size"]

    def part_names(self) -> list[str]:
        return [p["name"] for p in self.parts]

    def has_part(self, name: str) -> bool:
        return any(p["name"] == name for p in self.parts)

    def bytes_per_sample(self) -> dict[str, float]:
        """Mean stored bytes per sample for each field (ragged text counted over its real tokens)."""
        n = max(self.num_samples, 1)
        tokens = sum(p.get("num_text_tokens", 0) for p in self.parts)
        out = {}
        for name, spec in self.fields.items():
            f = field_from_json(name, spec)
            if f.dtype == "str":
                continue
            rows = tokens if not f.per_sample else n
            if name == "text_offsets":
                rows = n
            out[name] = f.bytes_per_row * rows / n
        return out

    # -- mutation (call inside locked_update) --------------------------------------------------
    def add_part(self, rec: PartRecord, skipped: list[dict]) -> None:
        if self.has_part(rec.name):
            raise CacheError(f"part {rec.name} is already committed; refusing to record it twice")
        self.parts.append(asdict(rec))
        self.skipped.extend(skipped)
        self._update_latent_stats()

    def _update_latent_stats(self) -> None:
        c = self.latent["channels"]
        s, ss, n = [0.0] * c, [0.0] * c, 0
        for p in self.parts:
            if p.get("latent_count"):
                s = [a + b for a, b in zip(s, p["latent_sum"])]
                ss = [a + b for a, b in zip(ss, p["latent_sumsq"])]
                n += p["latent_count"]
        if n:
            mean = [a / n for a in s]
            self.latent["mean"] = mean
            self.latent["std"] = [math.sqrt(max(b / n - m * m, 0.0)) for b, m in zip(ss, mean)]

    # -- (de)serialisation ---------------------------------------------------------------------
    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: dict) -> "Manifest":
        return cls(**obj)


def field_to_json(f: Field) -> dict:
    return {"dtype": f.dtype, "shape": list(f.inner_shape), "per_sample": f.per_sample, "sharded": f.sharded, "doc": f.doc}


def field_from_json(name: str, spec: dict) -> Field:
    return Field(name, spec["dtype"], tuple(spec["shape"]), spec["per_sample"], spec["sharded"], spec.get("doc", ""))


def manifest_path(cache_dir: Path) -> Path:
    return Path(cache_dir) / MANIFEST_NAME


def read_manifest(cache_dir: Path) -> Manifest:
    path = manifest_path(cache_dir)
    if not Path(cache_dir).is_dir():
        raise CacheError(f"{cache_dir}: no such cache directory; create one with `repa encode --cache {cache_dir}`")
    if not path.is_file():
        raise CacheError(f"{path}: no manifest; this is not a finished cache (run `repa encode` into it first)")
    try:
        obj = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CacheError(f"{path}: unreadable manifest ({e}); restore it or re-encode with --overwrite") from e
    version = obj.get("schema_version")
    if version != SCHEMA_VERSION:
        raise CacheError(
            f"{path}: cache schema version {version}, this tool reads version {SCHEMA_VERSION}; re-encode the cache"
        )
    return Manifest.from_json(obj)


@contextlib.contextmanager
def manifest_lock(cache_dir: Path) -> Iterator[None]:
    lock_path = Path(cache_dir) / LOCK_NAME
    with open(lock_path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def locked_update(cache_dir: Path, fn: Callable[[Manifest | None], Manifest]) -> Manifest:
    """Read-modify-write the manifest under the lock; fn gets None when there is no manifest yet."""
    with manifest_lock(cache_dir):
        path = manifest_path(cache_dir)
        current = read_manifest(cache_dir) if path.exists() else None
        new = fn(current)
        now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        new.created = new.created or now
        new.updated = now
        atomic_write_json(path, new.to_json())
        return new


def new_manifest(
    settings: dict,
    latent: dict,
    dino: dict,
    text: dict | None,
    fields: dict[str, Field],
    encoders: dict | None = None,
) -> Manifest:
    """A manifest for a cache about to be written; the fingerprint is derived from ``settings``.

    ``encoders`` says where each encoder was loaded from (Hub id or folder); it is kept for the
    sampling stage but is not part of the fingerprint, which identifies weights by content hash.
    """
    settings = {**settings, "schema_version": SCHEMA_VERSION}
    return Manifest(
        settings=settings,
        latent=latent,
        dino=dino,
        text=text,
        fields={name: field_to_json(f) for name, f in fields.items()},
        encoders=encoders or {},
        fingerprint=fingerprint(settings),
    )
