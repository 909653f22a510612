"""`repa data fetch`: download a webdataset corpus from the Hub, check it, and say how to encode it.

The repository is listed once at one commit; files already fetched and checked are skipped, the others
are downloaded ``workers`` at a time (a partial file resumes where it stopped). Each finished file is
checked against the size and, for LFS files, the sha256 the Hub lists; a file that fails is deleted and
fetched once more, and one that fails again is named and the command exits non-zero. What was checked is remembered in
``OUT/.cache/repa-fetch.json`` (size, mtime, sha256), so a rerun does not hash the corpus again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

from stages.core.options import check
from stages.core.runtime.progress import progress_bar

from .config import FetchConfig
from .hub import FetchError, RemoteFile, download, list_files
from .patterns import brace_patterns

CHECKED_FILE = ".cache/repa-fetch.json"
PARTIAL_DIR = ".cache/huggingface/download"  # where huggingface_hub keeps ``*.incomplete`` parts in local_dir mode
DISK_MARGIN = 1.02  # filesystems round up; refuse a fetch that would fill the disk to the last byte


@dataclass
class FetchSummary:
    fetched: list[str] = field(default_factory=list)
    present: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # path -> why
    lines: list[str] = field(default_factory=list)


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


class CheckedFiles:
    """Files already checked against the listing: path -> {size, mtime_ns, sha256}. Thread-safe."""

    def __init__(self, out: Path):
        self.path = out / CHECKED_FILE
        self.lock = threading.Lock()
        try:
            self.entries = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.entries = {}

    def holds(self, f: RemoteFile, local: Path) -> bool:
        entry = self.entries.get(f.path)
        try:
            st = local.stat()
        except OSError:
            return False
        return (entry is not None and entry["size"] == st.st_size == f.size and entry["mtime_ns"] == st.st_mtime_ns
                and entry["sha256"] == f.sha256)

    def add(self, f: RemoteFile, local: Path) -> None:
        with self.lock:
            st = local.stat()
            self.entries[f.path] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": f.sha256}
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(f".tmp-{os.getpid()}")
            tmp.write_text(json.dumps(self.entries, indent=0, sort_keys=True))
            os.replace(tmp, self.path)


def file_problem(f: RemoteFile, local: Path) -> str | None:
    """Why the local copy is not the listed file (size, then sha256 where the Hub gives it), or None."""
    size = local.stat().st_size
    if size != f.size:
        return f"size {size} bytes, the Hub lists {f.size}"
    if f.sha256:
        h = hashlib.sha256()
        with open(local, "rb") as fh:
            while chunk := fh.read(1 << 22):
                h.update(chunk)
        if h.hexdigest() != f.sha256:
            return f"sha256 {h.hexdigest()[:16]}..., the Hub lists {f.sha256[:16]}..."
    return None


def _partial_bytes(out: Path) -> int:
    total = 0
    for p in (out / PARTIAL_DIR).rglob("*.incomplete"):
        try:
            total += p.stat().st_size
        except OSError:  # finished and renamed meanwhile
            pass
    return total


class ByteProgress:
    """One bar for the whole fetch (bytes, rate, ETA): finished files plus the growing partial ones."""

    def __init__(self, out: Path, total: int, done: int):
        self.out, self.finished = out, done
        self.bar = progress_bar(total=total, initial=done + _partial_bytes(out), unit="B", unit_scale=True,
                        unit_divisor=1024, desc="fetch", dynamic_ncols=True, smoothing=0.1)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()

    def file_done(self, size: int) -> None:
        self.finished += size

    def _refresh(self) -> None:
        self.bar.update(self.finished + _partial_bytes(self.out) - self.bar.n)

    def _poll(self) -> None:
        while not self.stop.wait(0.5):
            self._refresh()

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        self._refresh()
        self.bar.close()


def _free(out: Path) -> int:
    return shutil.disk_usage(next(p for p in (out, *out.parents) if p.exists())).free


def _check_disk(out: Path, need: int) -> None:
    free = _free(out)
    if need * DISK_MARGIN > free:
        raise FetchError(f"--out {out}: the files still to fetch need {_gib(need)} and only {_gib(free)} are free; "
                         "free space or choose another --out (files already fetched are kept)")


def run_fetch(cfg: FetchConfig, log=print) -> FetchSummary:
    check(cfg)
    out = Path(cfg.out)
    listing = list_files(cfg.repo, cfg.repo_type, cfg.revision, cfg.patterns(), cfg.endpoint)
    if not listing.files:
        raise FetchError(f"--include {' '.join(cfg.patterns())}: matches no file of {cfg.repo} at {cfg.revision}; "
                         "check the patterns (globs over paths in the repository)")
    checked = CheckedFiles(out)
    todo = [f for f in listing.files if not checked.holds(f, out / f.path)]
    pending = {f.path for f in todo}
    summary = FetchSummary(present=[f.path for f in listing.files if f.path not in pending])
    total = sum(f.size for f in listing.files)
    need = sum(f.size for f in todo) - _partial_bytes(out)
    log(f"fetch: {len(listing.files)} files ({_gib(total)}) of {cfg.repo} at {listing.commit[:12]}; "
        f"{len(summary.present)} already here and checked, {len(todo)} to fetch ({_gib(need)})")
    if cfg.dry_run:
        summary.lines = [f"{f.size:>14,d}  {f.path}" for f in listing.files] + [
            f"dry run: {len(todo)} of {len(listing.files)} files to fetch, {_gib(need)} needed, "
            f"{_gib(_free(out))} free in {out}; nothing was downloaded"]
        return summary
    out.mkdir(parents=True, exist_ok=True)
    _check_disk(out, need)

    progress = ByteProgress(out, total, sum(f.size for f in listing.files if f.path not in pending))

    def fetch_one(f: RemoteFile) -> str | None:
        # A copy that fails its check is deleted and fetched once more: it may be a damaged local copy.
        for _ in range(2):
            local = download(cfg.repo, cfg.repo_type, listing.commit, f.path, out, cfg.endpoint)
            problem = file_problem(f, local)
            if problem is None:
                checked.add(f, local)
                progress.file_done(f.size)
                return None
            local.unlink(missing_ok=True)
        return problem

    try:
        with ThreadPoolExecutor(max_workers=min(cfg.workers, max(len(todo), 1))) as pool:
            futures = {pool.submit(fetch_one, f): f for f in todo}
            try:
                for future in as_completed(futures):
                    f = futures[future]
                    problem = future.result()  # a FetchError (network, auth, disk) ends the fetch here
                    if problem is None:
                        summary.fetched.append(f.path)
                    else:
                        summary.failed[f.path] = problem
                        log(f"error: {out / f.path}: {problem} (twice); deleted")
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)  # files in flight finish or keep their partial part
                raise
    finally:
        progress.close()
    order = {f.path: i for i, f in enumerate(todo)}  # report in the listing's order, not the finishing order
    summary.fetched.sort(key=order.__getitem__)
    summary.failed = dict(sorted(summary.failed.items(), key=lambda item: order[item[0]]))
    summary.lines = _summary_lines(cfg, out, listing.files, summary)
    if summary.failed:
        first = next(iter(summary.failed))
        raise FetchError(f"{len(summary.failed)} file(s) failed their check (first: {out / first}: "
                         f"{summary.failed[first]}); rerun the same command to fetch them again")
    return summary


def _summary_lines(cfg: FetchConfig, out: Path, files: list[RemoteFile], s: FetchSummary) -> list[str]:
    with_sha = sum(1 for f in files if f.sha256)
    lines = [f"fetched {len(s.fetched)} file(s), {len(s.present)} already here; all {len(files)} match the Hub's "
             f"sizes" + (f" and sha256 ({with_sha} LFS files)" if with_sha else "") + f", in {out}"]
    shards = [str(out / f.path) for f in files if f.path.endswith((".tar", ".tgz", ".tar.gz"))]
    if shards:
        lines.append("encode them with:")
        lines += [f"  make encode SOURCE='{pattern}'" for pattern in brace_patterns(shards)]
    return lines
