"""Claims of a cache on S3-compatible object storage: ``claims/<part>.json`` under the cache's prefix.

Object storage has no lock, so every step is one conditional request and the store decides races:
a claim is created with ``If-None-Match: *`` (one creator wins), renewed with ``If-Match: <etag>``
of the claim as this owner last wrote it (a renewal that fails means another owner took the claim
over: the part is lost), and a stale claim (its owner a dead process of this host, or its heartbeat
older than the lease) is taken over with ``If-Match`` on the stale claim's etag, so of two takers
exactly one wins. Release deletes the claim after checking that it is still this owner's.
"""

from __future__ import annotations

import json
import threading
import time

from cache_schema.format.layout import CLAIMS_DIR
from cache_schema.storage.object_store import S3Path, delete, get_with_etag, put_if_absent, put_if_match
from cache_schema.writing.claims import Owner, is_stale


class S3Claims:
    def __init__(self, root: S3Path):
        self.root = root
        self._etags: dict[str, str] = {}  # part -> etag of this owner's claim as last written
        self._lock = threading.Lock()

    def _key(self, part: str) -> S3Path:
        return self.root / CLAIMS_DIR / f"{part}.json"

    def _read(self, part: str) -> tuple[dict, str] | None:
        got = get_with_etag(self._key(part))
        if got is None:
            return None
        try:
            body = json.loads(got[0])
        except ValueError:
            body = {}  # unreadable: stale, so a damaged claim never blocks a part for ever
        return (body if isinstance(body, dict) else {}), got[1]

    @staticmethod
    def _body(owner: Owner, started: float) -> bytes:
        return json.dumps({"owner": owner.id, "host": owner.host, "pid": owner.pid, "started": started,
                           "renewed": time.time()}).encode()

    def _etag_of_new(self, part: str, body: bytes) -> str | None:
        # put_if_absent does not return the etag; read it back and check the claim is the one written.
        got = get_with_etag(self._key(part))
        return got[1] if got is not None and got[0] == body else None

    def claim(self, parts: list[str], owner: Owner, lease_s: float) -> tuple[list[str], dict]:
        got, held = [], {}
        for part in parts:
            now = time.time()
            body = self._body(owner, now)
            current = self._read(part)
            if current is None:
                etag = self._etag_of_new(part, body) if put_if_absent(self._key(part), body) else None
            elif current[0].get("owner") == owner.id or is_stale(current[0], lease_s, now):
                etag = put_if_match(self._key(part), body, current[1])
            else:
                held[part] = current[0]
                continue
            if etag is None:  # another writer created or took it first
                latest = self._read(part)
                held[part] = latest[0] if latest else {}
                continue
            with self._lock:
                self._etags[part] = etag
            got.append(part)
        return got, held

    def renew(self, parts: list[str], owner: Owner) -> list[str]:
        lost = []
        for part in parts:
            with self._lock:
                etag = self._etags.get(part)
            new = put_if_match(self._key(part), self._body(owner, time.time()), etag) if etag else None
            with self._lock:
                if new is None:
                    self._etags.pop(part, None)
                    lost.append(part)
                else:
                    self._etags[part] = new
        return lost

    def owns(self, part: str, owner: Owner) -> bool:
        # The owner id is unique per process start: a claim taken over carries another.
        current = self._read(part)
        return current is not None and current[0].get("owner") == owner.id

    def release(self, part: str, owner: Owner) -> None:
        if self.owns(part, owner):
            delete(self._key(part))
        with self._lock:
            self._etags.pop(part, None)
