"""`repa data pack`: an image-folder tree (ILSVRC2012 ``train/``, one folder per class) or a flat folder with a
label list (ILSVRC2012 ``val/``) as webdataset shards that `repa encode` reads.

Labels are numbered as torchvision's ``ImageFolder`` and official REPA number them: class folders in sorted
order, 0, 1, ...; files in sorted order within each class (a flat folder: sorted by name). Each sample is
``KEY.jpg`` (or ``.png``/``.webp``: the original bytes, never re-encoded), ``KEY.cls`` and ``KEY.json`` (class
name and the file's path relative to the source), the key being the file name without its extension. Sample
``i`` goes to shard ``i // shard_size``, and a shard is written under a temporary name and renamed when whole,
so a rerun of the same command writes only the shards that are missing; ``pack.json`` records what the
shards were made from and a rerun with other inputs is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from cache_schema.storage.fsutil import atomic_write_json
from stages.core.errors import UsageError
from stages.core.runtime.progress import progress_bar

from .patterns import brace_patterns

# What `repa encode` decodes (stages/core/encoders/images.py), keyed by the extension the shard stores.
PACKED_EXTENSIONS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}
RECORD_FILE = "pack.json"
NUMBER_WIDTH = 6


@dataclass(frozen=True)
class Item:
    path: Path  # the image file
    key: str
    label: int
    class_name: str | None


@dataclass
class PackSummary:
    shards: int
    written: int  # shards written by this run (the others were there)
    samples: int
    skipped: list[str]  # files that are not images of a kind encode reads
    pattern: str
    classes: int


def _key(path: Path) -> str:
    # webdataset splits a member name at its first dot: the key keeps none.
    return path.name[: -len(path.suffix)].replace(".", "_") if path.suffix else path.name.replace(".", "_")


def _files(folder: Path) -> list[Path]:
    """Every file under ``folder``, sorted by relative path (symlinks followed, as ImageFolder does)."""
    out: list[Path] = []
    for root, dirs, names in os.walk(folder, followlinks=True):
        dirs.sort()
        out.extend(Path(root) / n for n in sorted(names) if not n.startswith("."))
    return out


def class_folders(src: Path) -> list[str]:
    """The class names of an image-folder tree: its sub-folders, sorted (ImageFolder's ``find_classes``)."""
    return sorted(e.name for e in os.scandir(src) if e.is_dir() and not e.name.startswith("."))


def read_labels(labels: Path, classes: dict[str, int]) -> dict[str, int]:
    """``NAME CLASS`` per line (whitespace or comma separated; NAME with or without its extension; CLASS a
    number, or a class folder name of ``classes``): file key -> label. A first line that names no class is a
    header and skipped."""
    out: dict[str, int] = {}
    try:
        lines = labels.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--labels {labels}: cannot read it ({e}); pass a text file of `NAME CLASS` lines") from None
    for number, line in enumerate(lines, 1):
        fields = [f for f in re.split(r"[\s,]+", line.strip()) if f]
        if not fields or fields[0].startswith("#"):
            continue
        label = None
        if len(fields) >= 2:
            label = int(fields[1]) if fields[1].isdigit() else classes.get(fields[1])
        if label is None:
            if number == 1 and not out:
                continue  # a header such as "ImageId,PredictionString"
            known = ("a class id or one of the class folders of --classes" if classes
                     else "a class id (or pass --classes)")
            raise UsageError(f"--labels {labels}:{number}: {line.strip()[:80]!r} is not `NAME CLASS` with CLASS "
                             f"{known}")
        out[_key(Path(fields[0]))] = label
    return out


def list_items(src: Path, labels: Path | None, classes_from: Path | None) -> tuple[list[Item], list[str], int]:
    """(samples in pack order, files skipped as not images encode reads, number of classes)."""
    if not src.is_dir():
        raise UsageError(f"{src}: not a folder; pass an image-folder tree (one folder per class) or, with --labels, "
                         "a folder of images")
    skipped: list[str] = []

    def images(files: list[Path]) -> list[Path]:
        kept = [f for f in files if f.suffix.lower() in PACKED_EXTENSIONS]
        skipped.extend(str(f.relative_to(src)) for f in files if f.suffix.lower() not in PACKED_EXTENSIONS)
        return kept

    if labels is None:
        names = class_folders(src)
        if not names:
            raise UsageError(f"{src}: holds no class folders; pass a tree with one folder per class, or a flat folder "
                             "with --labels FILE")
        items = [Item(f, _key(f), label, name) for label, name in enumerate(names) for f in images(_files(src / name))]
        count = len(names)
    else:
        names = class_folders(classes_from) if classes_from is not None else []
        by_key = read_labels(labels, {n: i for i, n in enumerate(names)})
        files = images([f for f in _files(src) if f.parent == src])
        missing = [f.name for f in files if _key(f) not in by_key]
        if missing:
            raise UsageError(f"--labels {labels}: no label for {len(missing)} image(s) of {src} (first: {missing[0]}); "
                             "pass the label list of this folder")
        items = [Item(f, _key(f), by_key[_key(f)], names[by_key[_key(f)]] if by_key[_key(f)] < len(names) else None)
                 for f in files]
        count = len(names) or len({i.label for i in items})
    seen: dict[str, Path] = {}
    for item in items:
        if item.key in seen:
            raise UsageError(f"{seen[item.key]} and {item.path} would share the sample key {item.key!r}; rename one, "
                             "or pack their folders separately")
        seen[item.key] = item.path
    if not items:
        raise UsageError(f"{src}: no jpg, png or webp image found")
    return items, skipped, count


def _identity(src: Path, items: list[Item], shard_size: int, prefix: str) -> dict:
    """What the shards are made from: a rerun with anything else would mix two packings."""
    h = hashlib.sha256()
    for item in items:
        h.update(f"{item.path.relative_to(src)}\t{item.label}\n".encode())
    return {"source": str(src.resolve()), "samples": len(items), "shard_size": shard_size, "prefix": prefix,
            "files_and_labels_sha256": h.hexdigest()}


def _write_shard(path: Path, items: list[Item], src: Path) -> None:
    import webdataset as wds

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        # A fixed time stamp: the same inputs give the same bytes, whichever run wrote the shard.
        with open(tmp, "wb") as stream, wds.TarWriter(stream, mtime=0.0) as tar:
            for item in items:
                sample = {"__key__": item.key, PACKED_EXTENSIONS[item.path.suffix.lower()]: item.path.read_bytes(),
                          "cls": str(item.label).encode(),
                          "json": json.dumps({"class": item.class_name,
                                              "path": str(item.path.relative_to(src))}).encode()}
                tar.write(sample)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def pack_folder(src: Path, out: Path, shard_size: int = 1000, prefix: str | None = None, labels: Path | None = None,
                classes_from: Path | None = None, workers: int = 4, log=print) -> PackSummary:
    if shard_size < 1:
        raise UsageError(f"--shard-size {shard_size}: must be at least 1")
    items, skipped, classes = list_items(src, labels, classes_from)
    prefix = prefix or src.resolve().name
    count = -(-len(items) // shard_size)
    identity = _identity(src, items, shard_size, prefix)
    out.mkdir(parents=True, exist_ok=True)
    record = out / RECORD_FILE
    if record.exists():
        try:
            before = json.loads(record.read_text())
        except ValueError:
            before = None
        if before != identity:
            raise UsageError(f"{out} holds shards packed from other files or settings ({record}); pack into another "
                             "--out, or delete that folder first")
    atomic_write_json(record, identity)
    paths = [out / f"{prefix}-{i:0{NUMBER_WIDTH}d}.tar" for i in range(count)]
    todo = [i for i, p in enumerate(paths) if not p.exists()]
    done = len(items) - sum(len(items[i * shard_size : (i + 1) * shard_size]) for i in todo)
    bar = progress_bar(total=len(items), initial=done, unit="img", desc="pack", dynamic_ncols=True)
    if skipped:
        log(f"pack: skipping {len(skipped)} file(s) that are not jpg, png or webp (first: {skipped[0]})")

    def write(i: int) -> None:
        chunk = items[i * shard_size : (i + 1) * shard_size]
        _write_shard(paths[i], chunk, src)
        bar.update(len(chunk))

    try:
        with ThreadPoolExecutor(max(workers, 1)) as pool:
            for _ in pool.map(write, todo):
                pass
    except OSError as e:
        raise UsageError(f"pack: cannot write a shard into {out}: {e.strerror or e}; the shards already written are "
                         "kept, rerun the same command to write the rest") from None
    finally:
        bar.close()
    pattern = brace_patterns([str(p) for p in paths])[0]
    return PackSummary(count, len(todo), len(items), skipped, pattern, classes)
