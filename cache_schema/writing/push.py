"""Publishing a committed local cache on S3-compatible object storage (`repa cache push`).

The protocol is the local one with objects for files: a part's files are uploaded first, then its
record, the commit point, with a conditional PUT (``If-None-Match: *``) so that no writer ever
replaces a record another one wrote. Readers list records, so a part whose upload was cut short
(files, no record) is invisible to them, and the next push uploads it again over what was left.
The manifest is created first, also conditionally; a manifest with another fingerprint is never
replaced (it is another cache).

A rerun skips every part whose record is there with the same content, so pushing again after a
crash, or while another push of the same cache runs, ends with one complete cache.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from cache_schema.errors import CacheError
from cache_schema.format.layout import MANIFEST_NAME, PART_SUFFIX, PARTS_DIR, RECORD_SUFFIX, RECORDS_DIR
from cache_schema.format.manifest import manifest_path, read_manifest, read_records, record_path, target_dir
from cache_schema.storage.object_store import S3Path, client, local_path, put_if_absent


@dataclass
class PushResult:
    uploaded: list[str]  # parts uploaded and committed by this push ("<target>/<part>" for added targets)
    skipped: list[str]  # parts whose record was already there with the same content
    bytes: int  # bytes uploaded


def _read_existing(dest: S3Path) -> bytes | None:
    try:
        return dest.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise CacheError(f"{dest}: cannot be read ({e}); check the credentials and AWS_ENDPOINT_URL") from None


def _push_manifest(src: Path, dest: S3Path) -> None:
    data = manifest_path(src).read_bytes()
    ours = json.loads(data)
    where = dest / MANIFEST_NAME
    if put_if_absent(where, data):
        return
    theirs_raw = _read_existing(where)
    try:
        theirs = json.loads(theirs_raw or b"")
    except ValueError:
        theirs = {}
    if theirs.get("fingerprint") != ours.get("fingerprint"):
        raise CacheError(f"{where}: holds a cache with fingerprint {theirs.get('fingerprint')}, not {src}'s "
                         f"{ours.get('fingerprint')}; push to another prefix")
    if theirs_raw != data:
        # Same cache, grown since (an added target, more input shards): the newer manifest replaces it.
        from botocore.exceptions import ClientError

        try:
            client().put_object(Bucket=where.bucket, Key=where.key, Body=data)
        except ClientError as e:
            raise CacheError(f"{where}: cannot be written ({e}); check the credentials") from None


def _part_units(src: Path, dest: S3Path) -> list[tuple[str, Path, S3Path, dict]]:
    """(label, local root, remote root, record) of every committed part of the cache and its added targets."""
    manifest = read_manifest(src)
    units = [(p["name"], src, dest, p) for p in manifest.parts]
    for target in sorted(manifest.targets):
        for rec in sorted(read_records(target_dir(src, target)), key=lambda r: r["name"]):
            units.append((f"{target}/{rec['name']}", local_path(target_dir(src, target)),
                          S3Path.parse(target_dir(dest, target)), rec))
    return units


def push_cache(src: str | Path, dest: str | S3Path, threads: int = 8,
               progress: Callable[[int, int], None] | None = None, max_rate: float | None = None) -> PushResult:
    """Upload the committed local cache ``src`` to ``dest`` (``s3://bucket/prefix``). ``progress(total,
    done)`` is called with the bytes to upload (once, done 0), then with each file's bytes as it lands.
    ``max_rate``: bytes/s per upload thread (None: as fast as the link allows)."""
    from boto3.s3.transfer import TransferConfig

    config = TransferConfig(max_bandwidth=int(max_rate) if max_rate else None, use_threads=False)
    src, dest = Path(src), S3Path.parse(dest)
    units = _part_units(src, dest)  # reads and checks the local manifest and records first
    _push_manifest(src, dest)
    records = {label: record_path(root, rec["name"]).read_bytes() for label, root, _, rec in units}
    todo, skipped = [], []
    with ThreadPoolExecutor(threads) as pool:
        there = list(pool.map(lambda u: _read_existing(_record_key(u[2], u[0])), units))
    for unit, existing in zip(units, there, strict=True):
        label = unit[0]
        if existing is None:
            todo.append(unit)
        elif _same_record(existing, records[label]):
            skipped.append(label)
        else:
            raise CacheError(f"{_record_key(unit[2], label)}: holds another commit of part {label} (another encode "
                             f"of it); delete that record to replace the part with {src}'s")
    total = sum(sum(rec["files"].values()) for *_, rec in todo)
    if progress:
        progress(total, 0)
    committed = []
    with ThreadPoolExecutor(threads) as pool:
        # Parts one after another, each part's files by the pool: a part's record goes up as soon as its
        # last file has landed, so a push cut short leaves as many whole parts as it could.
        for label, root, rroot, rec in todo:
            outcome = publish_part(label, root / PARTS_DIR / f"{rec['name']}{PART_SUFFIX}", rroot, rec, records[label],
                                   config, pool.map, (lambda size: progress(total, size)) if progress else None)
            if outcome == OTHER:
                raise CacheError(f"{_record_key(rroot, label)}: another writer committed part {label} while this push "
                                 "uploaded it; its files may now hold this push's bytes: delete that record and push "
                                 "again from one cache")
            if outcome == COMMITTED:
                committed.append(label)
    return PushResult(committed, skipped, total)


def _record_key(root: S3Path, label: str) -> S3Path:
    return root / RECORDS_DIR / f"{label.rsplit('/', 1)[-1]}{RECORD_SUFFIX}"


def _same_record(theirs: bytes, ours: bytes) -> bool:
    try:
        return json.loads(theirs) == json.loads(ours)
    except ValueError:
        return False


def _upload_file(label: str, local_part: Path, remote_root: S3Path, rec: dict, rel: str, config) -> int:
    from botocore.exceptions import BotoCoreError, ClientError

    path = local_part / rel
    key = remote_root / PARTS_DIR / f"{rec['name']}{PART_SUFFIX}" / rel.replace(os.sep, "/")
    size = path.stat().st_size
    if size != rec["files"][rel]:
        raise CacheError(f"part {label}: file {rel} has {size} bytes, its record says {rec['files'][rel]}; "
                         "run `repa cache verify` on the local cache and repair it before pushing")
    try:
        client().upload_file(str(path), key.bucket, key.key, Config=config)
    except (ClientError, BotoCoreError, OSError) as e:
        raise CacheError(f"part {label}: {rel} cannot be uploaded to {key} ({e}); rerun the push") from None
    return size


COMMITTED, SAME, OTHER = "committed", "same", "other"


def publish_part(label: str, local_part: Path, remote_root: S3Path, rec: dict, record: bytes, config,
                 upload_map=map, on_file: Callable[[int], None] | None = None) -> str:
    """Upload a committed local part's files, then write its record, the commit point, with a conditional
    PUT. ``upload_map`` runs the file uploads (a thread pool's ``map``); ``on_file(bytes)`` after each.
    Returns COMMITTED, SAME (an identical record was already there) or OTHER (another writer committed
    the part first; the caller decides whether that is an error)."""
    for size in upload_map(lambda rel: _upload_file(label, local_part, remote_root, rec, rel, config),
                           sorted(rec["files"])):
        if on_file:
            on_file(size)
    key = _record_key(remote_root, label)
    if put_if_absent(key, record):
        return COMMITTED
    return SAME if _same_record(_read_existing(key) or b"", record) else OTHER
