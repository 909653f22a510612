"""The manifest and the part records: what a cache holds, how it was made, which parts are committed.

``manifest.json`` holds what is true of the whole cache (settings and their fingerprint, encoders,
latent/DINOv2/text geometry, fields, and the input shards any encode was asked for). Each committed
part has its own record, ``records/<part>.json``: committing a part writes one small file, whatever
the number of parts already there, and readers see a part exactly when its record exists. Reading
a manifest loads both; global sample ids run over parts in name order.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from cache_schema.errors import CacheError
from cache_schema.format.layout import (
    FILTER_SKIP_CODES,
    FIRST_TARGET,
    MANIFEST_NAME,
    RECORD_SUFFIX,
    RECORDS_DIR,
    SCHEMA_VERSION,
    TARGETS_DIR,
    Field,
)
from cache_schema.format.lock import cache_lock
from cache_schema.storage.fsutil import atomic_write_json
from cache_schema.storage.object_store import S3Path, cache_root, local_path

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
    "text_attention",
    "dtype",
    "feature_codec",
)
# Settings added after caches existed: in the fingerprint only when set, so that a cache made before them
# (or without them) keeps its fingerprint. filters: what decides which samples are stored; similarity_model:
# the model whose similarity is stored per sample (and filtered on).
# class_tokens: DINOv2's class and register tokens are stored too. flips: the image features of the flipped
# crop are stored too (a cache with flips holds other fields: another cache).
OPTIONAL_FINGERPRINT_KEYS = ("filters", "similarity_model", "class_tokens", "flips")


def fingerprint(settings: dict) -> str:
    """sha256 over the canonical JSON of the fingerprint settings (first 16 hex digits)."""
    canon = {k: settings.get(k) for k in FINGERPRINT_KEYS}
    canon.update({k: settings[k] for k in OPTIONAL_FINGERPRINT_KEYS if settings.get(k) is not None})
    return hashlib.sha256(json.dumps(canon, sort_keys=True).encode()).hexdigest()[:16]


def settings_diff(old: dict, new: dict) -> list[str]:
    """Names of the fingerprint settings that differ, each as 'name: old -> new'."""
    out = []
    for k in FINGERPRINT_KEYS + OPTIONAL_FINGERPRINT_KEYS:
        if old.get(k) != new.get(k):
            out.append(f"{k}: {_short(old.get(k))} -> {_short(new.get(k))}")
    return out


def _short(v) -> str:
    s = json.dumps(v, sort_keys=True)
    return s if len(s) <= 120 else s[:117] + "..."


@dataclass
class PartRecord:
    """What a committed part holds; written to ``records/<name>.json`` (and the part's group attributes)."""

    name: str
    source: str  # the input shard as it was given
    num_samples: int
    source_id: str = ""  # content identity of the input shard (cache_schema.format.sources)
    num_text_tokens: int = 0
    bytes: int = 0
    skipped: int = 0
    skips: list[dict] = field(default_factory=list)  # key, source, index, reason of each skipped sample
    complete: bool = True  # the source was read to its end without error and without a sample limit
    samples_read: int = 0  # samples met in the source (encoded + skipped)
    files: dict[str, int] = field(default_factory=dict)  # every file of the part (relative path) -> bytes
    latent_sum: list[float] = field(default_factory=list)
    latent_sumsq: list[float] = field(default_factory=list)
    latent_count: int = 0
    writer: str = ""  # the temporary directory it was written in (host, pid, unique id)
    committed: str = ""
    # A part of an added target: the cache part it belongs to ({"writer", "num_samples"} of its record),
    # so a cache part encoded again since is never read with the old target features.
    base: dict = field(default_factory=dict)

    @classmethod
    def from_json(cls, obj: dict, where: str) -> PartRecord:
        known = {f.name for f in fields(cls)}
        missing = [k for k in ("name", "source", "num_samples") if k not in obj]
        if missing or not isinstance(obj.get("files", {}), dict):
            raise CacheError(f"{where}: not a part record (missing {', '.join(missing) or 'files'})")
        return cls(**{k: v for k, v in obj.items() if k in known})


@dataclass
class Manifest:
    settings: dict
    latent: dict  # channels, size, downsample, scaling_factor, shift_factor (+ mean, std over the parts)
    dino: dict  # dim, tokens, grid, registers
    text: dict | None  # dim, kind, max_tokens, or None without a text encoder
    fields: dict  # name -> {dtype, shape, per_sample, sharded, doc}
    encoders: dict = field(default_factory=dict)  # role -> {id, subfolder, revision}: where to load them again
    fingerprint: str = ""
    schema_version: int = SCHEMA_VERSION
    sources: dict = field(default_factory=dict)  # part name -> {url, id}: every input shard an encode asked for
    # Alignment targets added after the first encode: name -> {settings, fingerprint, dim, tokens, grid, fields,
    # encoder, ...}; their arrays live in targets/<name>/ (``target_dir``), the cache's parts are never touched.
    targets: dict = field(default_factory=dict)
    created: str = ""
    updated: str = ""
    parts: list[dict] = field(default_factory=list)  # the part records, in name order (not in manifest.json)

    # -- derived views -------------------------------------------------------------------------
    @property
    def num_samples(self) -> int:
        return sum(p["num_samples"] for p in self.parts)

    @property
    def codec(self) -> str:
        return self.settings["feature_codec"]

    @property
    def flips(self) -> bool:
        """Whether the image features of the horizontally flipped crop are stored too (``<field>_flip``)."""
        return bool(self.settings.get("flips"))

    @property
    def shard_size(self) -> int:
        return self.settings["shard_size"]

    @property
    def skipped(self) -> list[dict]:
        return [s for p in self.parts for s in p.get("skips", [])]

    def skip_counts(self) -> Counter:
        return Counter(s["reason"].split(":")[0] for s in self.skipped)

    def filter_counts(self) -> dict[str, int]:
        """Samples each encode-time filter removed, by its key in ``settings["filters"]`` (the filters set)."""
        counts = self.skip_counts()
        return {name: counts.get(FILTER_SKIP_CODES[name], 0) for name in (self.settings.get("filters") or {})
                if name in FILTER_SKIP_CODES}

    def part_names(self) -> list[str]:
        return [p["name"] for p in self.parts]

    def has_part(self, name: str) -> bool:
        return any(p["name"] == name for p in self.parts)

    def incomplete_parts(self) -> list[dict]:
        """Committed parts whose source was not read to its end (a break, a sample limit)."""
        return [p for p in self.parts if not p.get("complete", True)]

    def missing_sources(self) -> list[str]:
        """Input shards an encode was asked for that have no committed part yet (part names)."""
        done = set(self.part_names())
        return sorted(name for name in self.sources if name not in done)

    @property
    def complete(self) -> bool:
        return not self.missing_sources() and not self.incomplete_parts()

    def completeness(self) -> str:
        """One line saying what is missing, or that nothing is."""
        missing, short = self.missing_sources(), self.incomplete_parts()
        if not missing and not short:
            return f"complete: {len(self.parts)} of {len(self.sources) or len(self.parts)} input shards committed"
        return (f"incomplete: {len(missing)} of {len(self.sources)} input shards not committed"
                + (f" (first: {self.sources[missing[0]]['url']})" if missing else "")
                + (f", {len(short)} part(s) cut short (first: {short[0]['name']})" if short else ""))

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

    def with_parts(self, parts: list[dict]) -> Manifest:
        """This manifest seeing ``parts`` (sorted by name), with latent statistics over them."""
        self.parts = sorted(parts, key=lambda p: p["name"])
        c = self.latent["channels"]
        s, ss, n = [0.0] * c, [0.0] * c, 0
        for p in self.parts:
            if p.get("latent_count"):
                s = [a + b for a, b in zip(s, p["latent_sum"], strict=False)]
                ss = [a + b for a, b in zip(ss, p["latent_sumsq"], strict=False)]
                n += p["latent_count"]
        mean = [a / n for a in s] if n else None
        std = [math.sqrt(max(b / n - m * m, 0.0)) for b, m in zip(ss, mean, strict=True)] if mean else None
        self.latent = {**self.latent, "mean": mean, "std": std}
        return self

    def target_names(self) -> list[str]:
        """Every alignment target the cache holds: the first one, then the added ones by name."""
        return [FIRST_TARGET] + sorted(self.targets)

    def target(self, name: str) -> dict:
        """dim, tokens, grid and fields of target ``name``; KeyError naming the targets there are."""
        if name == FIRST_TARGET:
            names = [n for n in self.fields if n == FIRST_TARGET or n.startswith(f"{FIRST_TARGET}_")]
            return {**self.dino, "fields": {n: self.fields[n] for n in names},
                    "settings": {"model": self.settings.get("dino")}}
        if name not in self.targets:
            raise KeyError(f"cache has no alignment target {name!r}; it has {', '.join(self.target_names())}")
        return self.targets[name]

    # -- (de)serialisation ---------------------------------------------------------------------
    def to_json(self) -> dict:
        out = asdict(self)
        del out["parts"]
        out["latent"] = {k: v for k, v in out["latent"].items() if k not in ("mean", "std")}
        return out

    @classmethod
    def from_json(cls, obj: dict, where: str = MANIFEST_NAME) -> Manifest:
        required = {"settings": dict, "latent": dict, "dino": dict, "fields": dict}
        wrong = [k for k, t in required.items() if not isinstance(obj.get(k), t)]
        if wrong or not isinstance(obj.get("sources", {}), dict):
            raise CacheError(f"{where}: not a cache manifest ({', '.join(wrong) or 'sources'} missing or of the "
                             "wrong type); restore it from a copy or re-encode with --overwrite")
        known = {f.name for f in fields(cls)} - {"parts"}
        return cls(**{k: v for k, v in obj.items() if k in known})


def field_to_json(f: Field) -> dict:
    return {"dtype": f.dtype, "shape": list(f.inner_shape), "per_sample": f.per_sample, "sharded": f.sharded,
            "doc": f.doc}


def field_from_json(name: str, spec: dict) -> Field:
    return Field(name, spec["dtype"], tuple(spec["shape"]), spec["per_sample"], spec["sharded"], spec.get("doc", ""))


def manifest_path(cache_dir: str | Path | S3Path) -> Path | S3Path:
    return cache_root(cache_dir) / MANIFEST_NAME


def record_path(cache_dir: str | Path | S3Path, part: str) -> Path | S3Path:
    return cache_root(cache_dir) / RECORDS_DIR / f"{part}{RECORD_SUFFIX}"


def _read_json(path: Path | S3Path, what: str, fix: str, data: bytes | None = None) -> dict:
    fix = f"; {fix}" if fix else ""
    try:
        obj = json.loads(path.read_bytes() if data is None else data)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CacheError(f"{path}: unreadable {what} ({e}){fix}") from None
    if not isinstance(obj, dict):
        raise CacheError(f"{path}: not a {what} (a JSON object is expected){fix}")
    return obj


def read_manifest_only(cache_dir: str | Path | S3Path) -> Manifest:
    """manifest.json alone, without the part records."""
    path = manifest_path(cache_dir)
    if not cache_root(cache_dir).is_dir():
        raise CacheError(f"{cache_dir}: no such cache directory; create one with `repa encode --cache {cache_dir}`")
    if not path.is_file():
        raise CacheError(f"{path}: no manifest; this is not a cache yet (run `repa encode` into it first)")
    obj = _read_json(path, "manifest", "restore it from a copy or re-encode with --overwrite")
    version = obj.get("schema_version")
    if version != SCHEMA_VERSION:
        raise CacheError(
            f"{path}: cache schema version {version}, this tool reads version {SCHEMA_VERSION}; re-encode the cache"
        )
    return Manifest.from_json(obj, str(path))


def target_dir(cache_dir: str | Path | S3Path, name: str) -> Path | S3Path:
    """Where the parts, records and claims of added target ``name`` live."""
    return cache_root(cache_dir) / TARGETS_DIR / name


def target_fingerprint(settings: dict) -> str:
    """sha256 over the canonical JSON of a target's settings (first 16 hex digits)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def target_part_problem(part: dict, rec: dict | None) -> str | None:
    """Why the target record ``rec`` does not hold the features of cache part ``part`` (None: it does)."""
    if rec is None:
        return "not encoded yet"
    if rec.get("base", {}).get("writer") != part.get("writer") or rec["num_samples"] != part["num_samples"]:
        return "the cache part was encoded again since"
    return None


RECORD_FIX = "rerun the encode command (with --source naming the part's input shard) to encode the part again"


def read_records(cache_dir: str | Path | S3Path, unreadable: dict[str, str] | None = None,
                 fix: str = RECORD_FIX) -> list[dict]:
    """Every committed part's record (unsorted).

    A record that cannot be read (cut short, garbage, not a record) is an error naming it, saying
    ``fix`` ({name}: the part); or, given ``unreadable``, it is left out and what is wrong with it is
    stored there under the part's name. Readers never guess what such a part held; an encode treats
    it as never committed and encodes it again, which is what ``fix`` says to do.
    """
    root = cache_root(cache_dir)
    paths: list[Path] | list[S3Path]
    if isinstance(root, S3Path):
        prefix = root / RECORDS_DIR
        names = [n for n in prefix.list_sizes() if n.endswith(RECORD_SUFFIX) and "/" not in n
                 and not n.startswith(".")]
        paths = [prefix / n for n in names]
    else:
        folder = root / RECORDS_DIR
        if not folder.is_dir():
            return []
        paths = [Path(e.path) for e in os.scandir(folder) if e.name.endswith(RECORD_SUFFIX)
                 and not e.name.startswith(".")]
    out = []
    for path, rec, problem in _read_all(paths):
        name = path.name[: -len(RECORD_SUFFIX)]
        if problem is None:
            out.append(rec)
        elif unreadable is None:
            raise CacheError(f"{problem}; {fix.format(name=name)}")
        else:
            unreadable[name] = problem
    return out


def read_record(cache_dir: Path, name: str) -> dict | None:
    """Part ``name``'s record, or None when it has none or one that cannot be read (not committed)."""
    path = record_path(cache_dir, name)
    return _read_all([path])[0][1] if path.exists() else None


def _read_all(paths: list) -> list[tuple]:
    """(path, record or None, problem or None) of each record file; those on object storage are read
    concurrently (one at a time, a CC12M cache's 2 176 records take minutes of round trips)."""
    def one(path) -> tuple:
        try:
            return path, asdict(PartRecord.from_json(_read_json(path, "part record", ""), str(path))), None
        except CacheError as e:
            return path, None, str(e)

    if not paths or not isinstance(paths[0], S3Path):
        return [one(p) for p in paths]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(16) as pool:
        return list(pool.map(one, paths))


def read_manifest(cache_dir: str | Path | S3Path, unreadable: dict[str, str] | None = None) -> Manifest:
    """The manifest with every committed part (``unreadable``: see ``read_records``)."""
    return read_manifest_only(cache_dir).with_parts(read_records(cache_dir, unreadable))


def write_record(cache_dir: Path, rec: PartRecord) -> None:
    path = local_path(record_path(cache_dir, rec.name))
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, asdict(rec))


def update_manifest(cache_dir: Path, fn: Callable[[Manifest | None], Manifest]) -> Manifest:
    """Read-modify-write manifest.json under the cache lock; ``fn`` gets None when there is none yet."""
    with cache_lock(cache_dir):
        current = read_manifest_only(cache_dir) if manifest_path(cache_dir).exists() else None
        new = fn(current)
        now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        new.created = new.created or now
        new.updated = now
        atomic_write_json(local_path(manifest_path(cache_dir)), new.to_json())
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
        latent={k: v for k, v in latent.items() if k not in ("mean", "std")},
        dino=dino,
        text=text,
        fields={name: field_to_json(f) for name, f in fields.items()},
        encoders=encoders or {},
        fingerprint=fingerprint(settings),
    )
