"""Webdataset tar shards: expanding a --source pattern into shard URLs and reading samples from a shard.

Used by encode (every sample) and by evaluate (the held-out images again, for FID references).
A source a cache records is found again through ``recorded_source`` only, by every command.
"""

from __future__ import annotations

import glob
import os
import re
import tarfile
from collections.abc import Iterator

from braceexpand import braceexpand
from webdataset.gopen import gopen
from webdataset.tariterators import base_plus_ext

from cache_schema import CacheError
from cache_schema.format.sources import is_remote, source_id

from ..errors import UsageError

_META = r"__[^/]*__($|/)"  # webdataset's pattern for meta entries, which carry no sample


class SourceError(UsageError):
    """The --source pattern cannot be used; the message says why and how to fix it."""


def recorded_source(url: str, sid: str, given: dict[str, str], what: str, also: str = "") -> str:
    """Where to read now the input shard a cache records as ``url`` with content identity ``sid``.

    ``given`` maps the content identity of each shard given with --source on this command line to
    where it is given. A shard given there is read there; a recorded local tar is read where it was if
    its content is unchanged; a recorded ``pipe:`` command or URL is never run on the cache's word,
    since whoever can write a cache's records could otherwise run any command on every reader's machine.
    ``what`` names the shard in the message (e.g. "the input shard of part X"), ``also`` adds a
    command's other way out.
    """
    if sid in given:
        return given[sid]
    if is_remote(url):
        raise SourceError(f"{what} is {url!r}, a command or URL the cache records; a recorded source is run only "
                          f"when given here: pass --source '{url}' explicitly (or the local shards){also}")
    try:
        found = source_id(url)
    except CacheError:  # gone or unreadable: not where the cache read it
        raise SourceError(f"{what}, {url}, is gone; pass --source with where the cache's input shards are "
                          f"now{also}") from None
    if found != sid:
        raise SourceError(f"{what}, {url}, changed since the cache was encoded (other content); pass --source "
                          f"with the original shards{also}")
    return url


def expand_source(pattern: str) -> list[str]:
    """Brace- and glob-expand a source pattern into shard URLs, in a stable order.

    Local files must exist; ``pipe:`` and other URLs are passed to webdataset's gopen as they are.
    """
    urls: list[str] = []
    for piece in pattern.split("::"):
        for url in braceexpand(piece.strip()):
            if is_remote(url):
                urls.append(url)
            elif any(c in url for c in "*?["):
                urls.extend(sorted(glob.glob(url)))
            else:
                urls.append(url)
    if not urls:
        raise SourceError(f"--source {pattern!r} matches no input shards; check the path or brace pattern")
    missing = [u for u in urls if not is_remote(u) and not os.path.isfile(u)]
    if len(missing) == len(urls):
        raise SourceError(f"--source {pattern!r} matches no existing file (first: {missing[0]}); check the path")
    if missing:
        raise SourceError(
            f"--source {pattern!r}: {len(missing)} of {len(urls)} shards do not exist (first: {missing[0]}); "
            "fix the pattern so it lists only shards you have"
        )
    dupes = len(urls) - len(set(urls))
    if dupes:
        raise SourceError(f"--source {pattern!r} lists {dupes} shard(s) twice; each input shard may appear once")
    return urls


def iter_tar(url: str) -> Iterator[dict]:
    """Samples of one tar shard as webdataset dicts (``__key__`` plus one bytes entry per extension).

    Written here rather than taken from webdataset's ``tar_file_expander`` + ``group_by_keys`` because
    of what happens at a break: when the stream fails inside a file of the *next* sample, the sample
    before it is known complete and is yielded before the error propagates (webdataset drops it).
    webdataset's ``gopen`` opens the stream and its ``base_plus_ext`` splits member names.
    """
    current: dict | None = None
    with gopen(url) as stream, tarfile.open(fileobj=stream, mode="r|*") as tf:
        for info in tf:
            if not info.isreg():
                continue
            prefix, suffix = base_plus_ext(info.name)
            if prefix is None or re.match(_META, info.name):
                continue
            if current is not None and prefix != current["__key__"]:
                yield current
                current = None
            member = tf.extractfile(info)
            if member is None:  # only for non-regular members, which were skipped above
                continue
            data = member.read()
            if current is None:
                current = {"__key__": prefix, "__url__": url}
            suffix = suffix.lower()
            if suffix in current:
                current.setdefault("__duplicate__", suffix)
            current[suffix] = data
            # typeshed's TarFile omits the `members` list that CPython's TarFile keeps (and appends every header to)
            tf.members = []  # type: ignore[attr-defined]  # do not accumulate member headers over a whole shard
        if current is not None:
            yield current
