"""Encoding straight into a cache on S3-compatible object storage.

Each part is built and committed in a local staging directory exactly as in a local cache
(``PartWriter``), then published with the push protocol (``push.publish_part``): its files first,
its record last with ``If-None-Match: *``. A part whose upload was cut short has files and no
record: readers do not see it, and the next writer of that part uploads over it. A record already
there means another writer committed the part first: this copy is dropped, never written over it.
The manifest is created with ``If-None-Match: *``; an existing one of the same fingerprint gets the
new input shards merged in with ``If-Match: <etag>`` (retried when another writer changed it first).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from cache_schema.errors import CacheError
from cache_schema.format.layout import MANIFEST_NAME
from cache_schema.format.manifest import Manifest, read_records, record_path, settings_diff
from cache_schema.storage.object_store import S3Path, get_with_etag, put_if_absent, put_if_match
from cache_schema.writing.claims import ClaimStore, Owner
from cache_schema.writing.push import COMMITTED, OTHER, publish_part
from cache_schema.writing.writer import part_path

MANIFEST_RETRIES = 20


def start_encode_s3(root: S3Path, template: Manifest, sources: dict,
                    unreadable: dict[str, str] | None = None) -> Manifest:
    """``start_encode`` for an S3 prefix: create the manifest, or merge ``sources`` into one of the same
    fingerprint; another fingerprint is refused (another cache lives there)."""
    where = root / MANIFEST_NAME
    for _ in range(MANIFEST_RETRIES):
        got = get_with_etag(where)
        now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        if got is None:
            new = Manifest.from_json({**template.to_json(), "sources": dict(sources), "created": now, "updated": now})
            if put_if_absent(where, json.dumps(new.to_json(), indent=1).encode()):
                return new.with_parts(read_records(root, unreadable))
            continue  # another writer created it first: merge into theirs
        current = Manifest.from_json(_json(got[0], where), str(where))
        if current.fingerprint != template.fingerprint:
            diff = "; ".join(settings_diff(current.settings, template.settings)) or "fingerprint"
            raise CacheError(f"{where}: holds a cache made with other settings ({diff}); use another --cache prefix")
        if all(current.sources.get(k) == v for k, v in sources.items()):
            return current.with_parts(read_records(root, unreadable))
        current.sources = {**current.sources, **sources}
        current.updated = now
        if put_if_match(where, json.dumps(current.to_json(), indent=1).encode(), got[1]) is not None:
            return current.with_parts(read_records(root, unreadable))
    raise CacheError(f"{where}: changed by other writers {MANIFEST_RETRIES} times in a row; rerun the encode")


def _json(data: bytes, where: S3Path) -> dict:
    try:
        obj = json.loads(data)
    except ValueError as e:
        raise CacheError(f"{where}: unreadable manifest ({e}); restore it or use another --cache prefix") from None
    if not isinstance(obj, dict):
        raise CacheError(f"{where}: not a cache manifest; restore it or use another --cache prefix")
    return obj


def publish_staged(staging: Path, root: S3Path, name: str, claims: ClaimStore, owner: Owner) -> bool:
    """Publish the part ``name`` committed in ``staging`` to ``root``: whether this writer committed it
    (False: another writer committed it first; its part stands). The staging copy is deleted either way.
    Raises CacheError when the claim was taken over before the upload (nothing is uploaded then)."""
    from boto3.s3.transfer import TransferConfig

    local = part_path(staging, name)
    staged = record_path(staging, name)
    assert isinstance(staged, Path)  # the staging directory is local
    try:
        if record_path(root, name).is_file():
            return False  # checked before uploading, so a finished part's files are never written over
        if not claims.owns(name, owner):
            raise CacheError(f"part {name}: another process took over its claim while this one was writing it "
                             "(stalled past the lease); this copy is discarded")
        data = staged.read_bytes()
        outcome = publish_part(name, local, root, json.loads(data), data, TransferConfig(use_threads=False))
        claims.release(name, owner)
        if outcome == OTHER:  # only after a claim was taken over between the checks above and the record
            raise CacheError(f"{record_path(root, name)}: another writer committed part {name} while this one "
                             "uploaded it; its files may hold this writer's bytes: delete that record and encode again")
        return outcome == COMMITTED
    finally:
        shutil.rmtree(local, ignore_errors=True)
        staged.unlink(missing_ok=True)
