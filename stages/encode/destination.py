"""Where an encode writes: a local cache directory, or a prefix on S3-compatible object storage.

Both give the encode the same few things: the claim store, the directory part writers build parts
in (the cache itself, or a local staging directory), how to start the cache (manifest), how to
prepare a claimed part, and what to do once a part is committed where it was built (nothing for a
local cache; upload it and write its record last for object storage).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from cache_schema import CacheError, Manifest, start_encode
from cache_schema.format.manifest import record_path
from cache_schema.storage.object_store import S3Path, cache_root, is_s3
from cache_schema.writing.claims import ClaimStore, LocalClaims, Owner
from cache_schema.writing.writer import drop_part, settle_part

from .config import EncodeConfig


class LocalDestination:
    def __init__(self, cache: Path):
        self.cache = Path(cache)
        self.claims: ClaimStore = LocalClaims(self.cache)
        self.writer_dir = self.cache

    def writer_owner(self, owner: Owner) -> Owner | None:
        return owner  # PartWriter checks the claim under the cache lock at its rename

    def start(self, template: Manifest, cfg: EncodeConfig, sources: dict, unreadable: dict[str, str]) -> Manifest:
        return start_encode(self.cache, template, cfg.overwrite, sources, cfg.lease_seconds, unreadable)

    def prepare(self, part: str, redo: bool, owner: Owner, log) -> bool:
        """Call holding the claim: clean up after dead writers; whether the part still needs encoding."""
        if redo:
            drop_part(self.cache, part)
        restored = settle_part(self.cache, part, owner)
        if restored is not None and not restored.complete:
            drop_part(self.cache, part)  # a part cut short, published by a process that died: redo it
        elif restored is not None:
            log(f"{part}: restored the record of a part committed by a process that died")
        return not record_path(self.cache, part).exists()  # restored, or committed by another job since the plan

    def publish(self, part: str, owner: Owner) -> bool:
        return True  # PartWriter.commit renamed it and wrote its record in the cache itself

    def close(self) -> None:
        pass


class S3Destination:
    def __init__(self, root: S3Path, staging: Path | None, owner: Owner):
        from cache_schema.writing.s3_claims import S3Claims

        self.root = root
        self.claims: ClaimStore = S3Claims(root)
        # A folder of this process's own (several encodes may share one --staging-dir), removed at the end.
        if staging is None:
            self.writer_dir = Path(tempfile.mkdtemp(prefix="repa-encode-"))
        else:
            self.writer_dir = Path(staging) / owner.id
            try:
                self.writer_dir.mkdir(parents=True)
            except OSError as e:
                raise CacheError(f"--staging-dir {staging}: not writable ({e.strerror}); choose another") from None

    def writer_owner(self, owner: Owner) -> Owner | None:
        return None  # the staging directory holds no claims; publish checks the claim on the store

    def start(self, template: Manifest, cfg: EncodeConfig, sources: dict, unreadable: dict[str, str]) -> Manifest:
        from stages.encode.s3_publish import start_encode_s3

        return start_encode_s3(self.root, template, sources, unreadable)

    def prepare(self, part: str, redo: bool, owner: Owner, log) -> bool:
        if redo:
            raise CacheError(f"part {part} at {self.root}: committed but cut short or damaged, and parts on object "
                             "storage are never rewritten; encode into a local cache and `repa cache push` it")
        return not record_path(self.root, part).is_file()  # committed by another job since the plan

    def publish(self, part: str, owner: Owner) -> bool:
        from stages.encode.s3_publish import publish_staged

        return publish_staged(self.writer_dir, self.root, part, self.claims, owner)

    def close(self) -> None:
        shutil.rmtree(self.writer_dir, ignore_errors=True)


def refuse_on_object_storage(cfg: EncodeConfig) -> None:
    """What an encode into object storage cannot do, refused before anything runs."""
    if not is_s3(cfg.cache):
        return
    root = cache_root(cfg.cache)
    refused = [flag for flag, on in (("--overwrite", cfg.overwrite), ("--redo", cfg.redo), ("--repair", cfg.repair),
                                     ("--add-target", cfg.add_target is not None)) if on]
    if refused:
        raise CacheError(f"--cache {root}: {refused[0]} is not supported on object storage (committed parts there are "
                         "never rewritten); encode into a local cache, then `repa cache push DIR s3://bucket/prefix`")


def destination(cfg: EncodeConfig, owner: Owner) -> LocalDestination | S3Destination:
    refuse_on_object_storage(cfg)
    root = cache_root(cfg.cache)
    if isinstance(root, S3Path):
        return S3Destination(root, cfg.staging_dir, owner)
    return LocalDestination(root)
