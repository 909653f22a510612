"""What an encode run does with each input shard: skip it (committed and sound), encode it (never
committed), or redo it (cut short, named with --redo, or failing the checks of --repair).

Shards are identified by content (``cache_schema.format.sources``), so the same tar reached by two spellings
of its path is one shard. The plan is made once (by the main process) and dealt out; each process
then claims its shards (``cache_schema.writing.claims``), so two jobs given overlapping lists never encode a
shard twice and never delete each other's work.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from cache_schema import Manifest, part_name
from cache_schema.format.integrity import check_part_files
from cache_schema.format.sources import source_id
from cache_schema.operations.verify import find_problems
from cache_schema.writing.claims import Owner, describe_holder
from stages.core.encoders.tars import SourceError
from stages.core.errors import UsageError


@dataclass(frozen=True)
class Shard:
    url: str  # as given on the command line
    source_id: str
    part: str


def identify(urls: list[str]) -> list[Shard]:
    """Each URL with its content identity and part name; two spellings of one file are refused."""
    shards: list[Shard] = []
    seen: dict[str, str] = {}
    for url in urls:
        sid = source_id(url)
        if sid in seen:
            raise SourceError(f"--source lists the same input shard twice: {seen[sid]} and {url} have the same "
                              "content; give each shard once")
        seen[sid] = url
        shards.append(Shard(url, sid, part_name(url, sid)))
    return shards


@dataclass
class Plan:
    done: list[Shard] = field(default_factory=list)
    todo: list[Shard] = field(default_factory=list)  # no committed part yet
    redo: dict[str, str] = field(default_factory=dict)  # part -> why it is encoded again
    shards: list[Shard] = field(default_factory=list)

    @property
    def work(self) -> list[Shard]:
        """What this run encodes, in source order."""
        return [s for s in self.shards if s in self.todo or s.part in self.redo]


def _matches(shard: Shard, name: str) -> bool:
    return name in (shard.part, shard.url) or os.path.basename(shard.url) == name


def make_plan(cache: Path, manifest: Manifest | None, shards: list[Shard], redo: list[str], repair: bool,
              log, unreadable: dict[str, str] | None = None) -> Plan:
    """``unreadable``: part -> why its record cannot be read; such a part is not committed and is encoded again."""
    records = {p["name"]: p for p in manifest.parts} if manifest is not None else {}
    unreadable = unreadable or {}
    unknown = [name for name in redo if not any(_matches(s, name) for s in shards)]
    if unknown:
        raise UsageError(f"--redo {unknown[0]}: not a part name or input shard of this --source; "
                         "`repa cache info CACHE` lists the parts")
    plan = Plan(shards=shards)
    for s in shards:
        rec = records.get(s.part)
        if rec is None and s.part in unreadable:
            plan.redo[s.part] = f"its record cannot be read, so it is not committed ({unreadable[s.part]})"
        elif rec is None:
            plan.todo.append(s)
        elif any(_matches(s, name) for name in redo):
            plan.redo[s.part] = "asked with --redo"
        elif not rec.get("complete", True):
            plan.redo[s.part] = "cut short last time (" + _break_reason(rec) + ")"
        else:
            try:
                check_part_files(cache, rec)
            except Exception as e:  # noqa: BLE001 - any damage means: encode it again
                plan.redo[s.part] = str(e)
            else:
                plan.done.append(s)
    if repair and plan.done:
        log(f"repair: checking {len(plan.done)} committed part(s) in full")
        problems = find_problems(cache, names=[s.part for s in plan.done], unreadable={})
        for s in list(plan.done):
            if s.part in problems:
                plan.redo[s.part] = problems[s.part]
                plan.done.remove(s)
    for part, why in plan.redo.items():
        log(f"redo {part}: {why}")
    return plan


def _break_reason(rec: dict) -> str:
    breaks = [s["reason"] for s in rec.get("skips", []) if s.get("key") is None]
    return breaks[-1].split(":")[0] if breaks else "incomplete"


def claim_shards(dest, mine: list[Shard], plan: Plan, owner: Owner, lease_s: float, log) -> list[Shard]:
    """Claim this process's shards in ``dest`` (a ``destination.LocalDestination`` or ``S3Destination``)
    and prepare each (``dest.prepare``). Returns the shards this process encodes."""
    got, held = dest.claims.claim([s.part for s in mine], owner, lease_s)
    if held:
        part, holder = next(iter(held.items()))
        log(f"{len(held)} input shard(s) are being encoded by other processes (e.g. {part} by "
            f"{describe_holder(holder)}); leaving them to them")
    claimed = set(got)
    out = []
    for s in mine:
        if s.part not in claimed:
            continue
        if not dest.prepare(s.part, s.part in plan.redo, owner, log):
            dest.claims.release(s.part, owner)
            continue
        out.append(s)
    return out
