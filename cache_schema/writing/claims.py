"""Which process encodes which input shard: one lease file per part, ``CACHE/claims/<part>.json``.

A process claims a part before writing it and renews its claims with a heartbeat. A claim is live
while its owner renews it; it is stale when its owner is a process of this host that no longer
exists, or when it was last renewed more than ``lease_s`` seconds ago (the only test possible for an
owner on another machine). A stale claim is taken over. Claims, renewals, releases and the check
"do I still own this part" made at commit time all run under the cache's advisory lock, so at most
one live process owns a part at any moment, and a process that lost its claim (it stalled past the
lease and another took over) finds out before it commits anything.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

from cache_schema.errors import CacheError
from cache_schema.format.layout import CLAIMS_DIR
from cache_schema.format.lock import cache_lock
from cache_schema.storage.fsutil import atomic_write_json

DEFAULT_LEASE_S = 300.0


@dataclass(frozen=True)
class Owner:
    """A writing process: unique per process start, with the host and pid for messages and liveness."""

    id: str
    host: str
    pid: int

    @classmethod
    def here(cls) -> Owner:
        host = socket.gethostname()
        return cls(f"{host}-{os.getpid()}-{uuid.uuid4().hex[:8]}", host, os.getpid())

    def describe(self) -> str:
        return f"process {self.pid} on {self.host}"


def _path(cache_dir: Path, part: str) -> Path:
    return Path(cache_dir) / CLAIMS_DIR / f"{part}.json"


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # unreadable: treated as stale, so a damaged claim never blocks a part for ever


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_stale(claim: dict, lease_s: float, now: float | None = None) -> bool:
    if not claim or "owner" not in claim:
        return True
    now = time.time() if now is None else now
    if claim.get("host") == socket.gethostname() and not _pid_alive(int(claim.get("pid", -1))):
        return True
    return now - float(claim.get("renewed", 0.0)) > lease_s


def _write(cache_dir: Path, part: str, owner: Owner, started: float) -> None:
    atomic_write_json(_path(cache_dir, part), {"owner": owner.id, "host": owner.host, "pid": owner.pid,
                                               "started": started, "renewed": time.time()})


def claim(cache_dir: Path, parts: list[str], owner: Owner, lease_s: float = DEFAULT_LEASE_S) -> tuple[list[str], dict]:
    """Claim every part of ``parts`` that nobody live holds; returns (claimed, {part: holder's claim})."""
    (Path(cache_dir) / CLAIMS_DIR).mkdir(parents=True, exist_ok=True)
    got, held = [], {}
    with cache_lock(cache_dir):
        now = time.time()
        for part in parts:
            current = _read(_path(cache_dir, part))
            if current is None or current.get("owner") == owner.id or is_stale(current, lease_s, now):
                _write(cache_dir, part, owner, now)
                got.append(part)
            else:
                held[part] = current
    return got, held


def renew(cache_dir: Path, parts: list[str], owner: Owner) -> list[str]:
    """Renew this owner's claims; returns the parts it no longer owns (taken over after a stall)."""
    lost = []
    with cache_lock(cache_dir):
        for part in parts:
            current = _read(_path(cache_dir, part))
            if current and current.get("owner") == owner.id:
                _write(cache_dir, part, owner, float(current.get("started", time.time())))
            else:
                lost.append(part)
    return lost


def owns(cache_dir: Path, part: str, owner: Owner) -> bool:
    """Call under ``cache_lock``: whether ``owner`` holds the claim on ``part`` right now."""
    current = _read(_path(cache_dir, part))
    return current is not None and current.get("owner") == owner.id


def release(cache_dir: Path, part: str, owner: Owner, locked: bool = False) -> None:
    """Drop this owner's claim on ``part`` (``locked``: the caller already holds ``cache_lock``)."""
    def drop() -> None:
        if owns(cache_dir, part, owner):
            _path(cache_dir, part).unlink(missing_ok=True)

    if locked:
        drop()
    else:
        with cache_lock(cache_dir):
            drop()


def live_claims(cache_dir: Path, lease_s: float = DEFAULT_LEASE_S) -> dict[str, dict]:
    """Every part claimed by a live process, with its claim."""
    folder = Path(cache_dir) / CLAIMS_DIR
    if not folder.is_dir():
        return {}
    now, out = time.time(), {}
    for path in folder.glob("*.json"):
        current = _read(path)
        if current and not is_stale(current, lease_s, now):
            out[path.stem] = current
    return out


def describe_holder(claim: dict) -> str:
    age = time.time() - float(claim.get("renewed", 0.0))
    return f"process {claim.get('pid')} on {claim.get('host')} (heartbeat {age:.0f} s ago)"


class ClaimStore(Protocol):
    """Where the claims of one cache live: a local directory (``LocalClaims``) or an object-storage
    prefix (``cache_schema.writing.s3_claims.S3Claims``). An encode speaks only to this interface."""

    def claim(self, parts: list[str], owner: Owner, lease_s: float) -> tuple[list[str], dict]: ...

    def renew(self, parts: list[str], owner: Owner) -> list[str]: ...

    def owns(self, part: str, owner: Owner) -> bool: ...

    def release(self, part: str, owner: Owner) -> None: ...


@dataclass(frozen=True)
class LocalClaims:
    """The claims of a cache directory: lease files under its advisory lock (the functions above)."""

    cache_dir: Path

    def claim(self, parts: list[str], owner: Owner, lease_s: float) -> tuple[list[str], dict]:
        return claim(self.cache_dir, parts, owner, lease_s)

    def renew(self, parts: list[str], owner: Owner) -> list[str]:
        return renew(self.cache_dir, parts, owner)

    def owns(self, part: str, owner: Owner) -> bool:
        with cache_lock(self.cache_dir):
            return owns(self.cache_dir, part, owner)

    def release(self, part: str, owner: Owner) -> None:
        release(self.cache_dir, part, owner)


class Heartbeat:
    """Renews an owner's claims in ``store`` every ``interval`` seconds on a daemon thread; ``lost``
    collects parts that were taken over (the owner must then not commit them; commits check too)."""

    def __init__(self, store: ClaimStore, owner: Owner, interval: float):
        self.store, self.owner, self.interval = store, owner, interval
        self.parts: set[str] = set()
        self.lost: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="claim-heartbeat", daemon=True)
        self._thread.start()

    def add(self, parts: list[str]) -> None:
        with self._lock:
            self.parts.update(parts)

    def discard(self, part: str) -> None:
        with self._lock:
            self.parts.discard(part)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with self._lock:
                parts = sorted(self.parts)
            try:
                lost = self.store.renew(parts, self.owner)
            except (OSError, CacheError):
                continue  # a hiccup of the shared filesystem or the store; the lease leaves room for the next beat
            with self._lock:
                self.lost.update(lost)
                self.parts.difference_update(lost)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def owner_json(owner: Owner) -> dict:
    return asdict(owner)
