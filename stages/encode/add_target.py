"""`repa encode --add-target NAME --target-model ID`: one more alignment target for an existing cache.

Only the new encoder runs, over the samples the cache's parts hold: each committed part's input shard
is read again (found by content: the part records its shard's content identity), only the positions the
part stored are decoded, with the crop settings of the cache, and the target's tokens are written to
``targets/NAME/parts/<part>.zarr`` in the part's order. The VAE, the text encoder and every stored array
are left alone. Target parts are claimed and committed exactly as the cache's parts are (their own
claims, records and lock under ``targets/NAME``), so a run can be killed and rerun, or run as several
jobs. A target part records the cache part it was made for, so a part encoded again since is redone.
"""

from __future__ import annotations

from pathlib import Path
from typing import cast

import numpy as np
import torch
import zarr

from cache_schema import CacheError, PartWriter, field_to_json, read_manifest
from cache_schema.format.layout import FIRST_TARGET, PART_SUFFIX, PARTS_DIR, TARGET_NAME, flip_name, target_fields
from cache_schema.format.manifest import (
    Manifest,
    read_record,
    read_records,
    target_dir,
    target_fingerprint,
    target_part_problem,
)
from cache_schema.writing.claims import Heartbeat, LocalClaims, Owner, claim, describe_holder, release
from cache_schema.writing.writer import drop_part, settle_part, start_target
from stages.core.data.codec import quantize_int8
from stages.core.encoders.images import crop_name
from stages.core.encoders.load import ModelSource
from stages.core.encoders.targets import TargetEncoder
from stages.core.encoders.tars import expand_source, recorded_source
from stages.core.errors import UsageError
from stages.core.runtime.threads import set_threads

from .config import EncodeConfig
from .part_sink import PartSink
from .plan import Shard, identify
from .skeleton import Pass, run_pass, this_process
from .source import ShardEnd, ShardStream
from .summary import EncodeSummary


def check_target_name(name: str, manifest: Manifest) -> str:
    if not TARGET_NAME.match(name):
        raise UsageError(f"--add-target {name!r}: a target name is lower-case letters, digits, '.', '_' or '-' "
                         "(e.g. clip-l)")
    taken = set(manifest.fields) | {f for t, e in manifest.targets.items() if t != name for f in e["fields"]}
    mine = {name, f"{name}_scale", f"{name}_cls"}
    if name == FIRST_TARGET or taken & (mine | {flip_name(n) for n in mine}):
        raise UsageError(f"--add-target {name}: the cache already has a field of that name; choose another name")
    return name


def target_entry(name: str, enc: TargetEncoder, manifest: Manifest, dtype: str) -> dict:
    """The manifest entry of target ``name``: settings (in its fingerprint), geometry, fields, where from."""
    codec = manifest.codec
    settings = {"model": enc.identity(), "preprocess": enc.preprocess, "crop": manifest.settings["crop"],
                "resolution": manifest.settings["resolution"], "class_tokens": enc.class_tokens,
                "dtype": dtype, "feature_codec": codec, "cache": manifest.fingerprint}
    if manifest.flips:
        settings["flips"] = True
    fields = target_fields(name, enc.tokens, enc.dim, codec, enc.class_tokens, manifest.flips)
    entry = {"settings": settings, "fingerprint": target_fingerprint(settings), **enc.info(),
             "fields": {n: field_to_json(f) for n, f in fields.items()},
             "encoder": enc.src.to_json()}
    layernorm = enc.final_layernorm()
    if layernorm is not None:  # RAE's latent is DINOv2's tokens without this affine part (docs/rae.md)
        entry["layernorm"] = layernorm
    return entry


def locate_sources(cfg: EncodeConfig, parts: list[dict]) -> dict[str, Shard]:
    """The input shard of each part, found by content: in --source when given, else where the cache read it
    (``recorded_source``: a recorded command or URL is run only when given with --source)."""
    given = {s.source_id: s.url for s in identify(expand_source(cfg.source))} if cfg.source else {}
    out = {}
    for part in parts:
        want = part.get("source_id", "")
        if cfg.source and want not in given:
            raise UsageError(f"--add-target: no shard of --source {cfg.source} has the content of {part['source']}, "
                             f"the input shard of part {part['name']}; give the shards the cache was encoded from")
        url = recorded_source(part["source"], want, given, f"--add-target: the input shard of part {part['name']}")
        out[part["name"]] = Shard(url, want, part["name"])
    return out


class TargetSink(PartSink):
    """A part sink that must reproduce each cache part exactly: no sample may be left out, and a part is
    committed only when its keys are the cache part's keys, in order."""

    def __init__(self, *args, expected: dict[str, tuple[np.ndarray, dict]], target: str, **kw):
        super().__init__(*args, **kw)
        self.expected, self.target = expected, target

    def _skip(self, writer: PartWriter, key, index, reason: str) -> None:
        what = f"sample {key} (position {index})" if key is not None else f"the shard after position {index}"
        raise CacheError(f"--add-target {self.target}: {what} of {writer.source} was stored in part {writer.name} but "
                         f"now gives {reason}; the cache part cannot be matched (encode with --dtype fp32, or "
                         "restore the original input shard)")

    def _finish(self, writer: PartWriter, end: ShardEnd) -> None:
        keys, base = self.expected[writer.name]
        got = writer._plain["key"]
        if len(got) != len(keys) or any(a != b for a, b in zip(got, keys.tolist(), strict=True)):
            raise CacheError(f"--add-target {self.target}: part {writer.name} holds {len(keys)} samples but "
                             f"{writer.source} gave {len(got)} others; rerun after restoring the original input shard")
        writer.base = base


def _part_keys(cache: Path, part: dict) -> tuple[np.ndarray, np.ndarray]:
    group = zarr.open_group(str(cache / PARTS_DIR / f"{part['name']}{PART_SUFFIX}"), mode="r")
    keys, index = cast(zarr.Array, group["key"]), cast(zarr.Array, group["source_index"])
    return np.asarray(keys[:]), np.asarray(index[:])


def _target_features(enc: TargetEncoder, name: str, x: torch.Tensor, codec: str) -> dict:
    """The target's tokens of ``x`` (uint8, B, 3, res, res) as stored."""
    patches, cls = enc.encode(x)
    out = {}
    if codec == "int8":
        out[name], out[f"{name}_scale"] = quantize_int8(patches)
    else:
        out[name] = patches.to(torch.float16)
    if cls is not None:
        out[f"{name}_cls"] = cls.to(torch.float16)
    return out


def _encode_batch(enc: TargetEncoder, name: str, images: torch.Tensor, codec: str, flips: bool = False) -> dict:
    x = images.to(enc.device, non_blocking=True).permute(0, 3, 1, 2)
    out = _target_features(enc, name, x, codec)
    if flips:  # the cache's flipped features are of the same crop mirrored left-right: so are the target's
        out.update({flip_name(k): v for k, v in _target_features(enc, name, x.flip(3), codec).items()})
    bad = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    for t in out.values():
        bad |= ~torch.isfinite(t.float()).flatten(1).all(dim=1)
    out["nonfinite"] = bad.to(torch.uint8) * 2  # NONFINITE_BITS["dino"]: "dino" names the target's tokens
    return {k: v.cpu() for k, v in out.items()}


def run_add_target(cfg: EncodeConfig, log=print):
    # run_encode calls this for --add-target only, after check(cfg) refused --add-target without --target-model
    assert cfg.add_target is not None and cfg.target_model is not None
    cache = Path(cfg.cache)
    manifest = read_manifest(cache)
    name = check_target_name(cfg.add_target, manifest)
    if cfg.flips and not manifest.flips:
        raise UsageError(f"--add-target {name} --flips: {cache} was encoded without --flips; an added target stores "
                         "flipped tokens exactly when the cache does: drop --flips, or re-encode the cache with "
                         "--flips")
    if cfg.dry_run:
        return EncodeSummary(lines=[f"would add target {name} ({cfg.target_model}) to the {manifest.num_samples} "
                                    f"samples of {len(manifest.parts)} part(s) of {cache}"
                                    + (", with its tokens of the flipped crops (the cache has flips: twice the "
                                       "bytes)" if manifest.flips else "")])
    process = this_process(cfg.dtype)
    state, device, main, dtype_name = process.state, process.device, process.main, process.dtype_name
    enc = TargetEncoder(ModelSource(cfg.target_model), manifest.settings["resolution"], manifest.dino["grid"][0],
                        device, process.dtype, cfg.class_tokens, cfg.target_input_size, manifest.dino.get("pos_embed",
                                                                                                  "antialias-once"))
    entry = target_entry(name, enc, manifest, dtype_name)
    root = target_dir(cache, name)
    assert isinstance(root, Path)  # a local cache: refuse_on_object_storage turned --add-target on S3 away
    if main:
        start_target(cache, name, entry)
    state.wait_for_everyone()
    committed = {r["name"]: r for r in read_records(root, unreadable={})}  # an unreadable record: not committed
    todo = [p for p in manifest.parts if target_part_problem(p, committed.get(p["name"])) is not None]
    shards = locate_sources(cfg, todo)
    mine_parts = todo[state.process_index :: state.num_processes]
    owner = Owner.here()
    got, held = claim(root, [p["name"] for p in mine_parts], owner, cfg.lease_seconds)
    if held:
        part, holder = next(iter(held.items()))
        log(f"{len(held)} part(s) are being encoded by other processes (e.g. {part} by {describe_holder(holder)}); "
            "leaving them to them")
    mine = []
    for part in mine_parts:
        if part["name"] not in got:
            continue
        settle_part(root, part["name"], owner)  # restores a record a dead writer did not get to write
        if target_part_problem(part, read_record(root, part["name"])) is None:  # committed by another job since
            release(root, part["name"], owner)
            continue
        drop_part(root, part["name"])  # stale: made for an earlier encode of the cache part
        mine.append(part)
    if main:
        log(f"add target {name} ({enc.kind}, {enc.dim}-d, {enc.grid}x{enc.grid} tokens"
            f"{f', {enc.class_tokens} class token(s)' if enc.class_tokens else ''}): {len(manifest.parts)} part(s), "
            f"{len(manifest.parts) - len(todo)} already done, {len(todo)} to do, device {device}, {dtype_name}")
    expected, wanted = {}, {}
    for part in mine:
        keys, index = _part_keys(cache, part)
        expected[part["name"]] = (keys, {"writer": part["writer"], "num_samples": part["num_samples"]})
        wanted[shards[part["name"]].url] = frozenset(index.tolist())
    heartbeat = Heartbeat(LocalClaims(root), owner, interval=cfg.lease_seconds / 4)
    heartbeat.add([p["name"] for p in mine])
    workers = min(cfg.num_workers if cfg.num_workers is not None else 1, len(mine))
    set_threads(cfg.threads, workers)
    urls = [shards[p["name"]].url for p in mine]
    stream = ShardStream(urls, cfg.batch_size, manifest.settings["resolution"], cfg.max_pixels,
                         manifest.settings["crop"] == crop_name(True), wanted=wanted)
    fields = target_fields(name, enc.tokens, enc.dim, manifest.codec, enc.class_tokens, manifest.flips)
    by_url = {shards[p["name"]].url: shards[p["name"]] for p in mine}
    sink = TargetSink(root, fields, manifest.shard_size, by_url, owner, heartbeat, expected=expected, target=name)
    def release_mine() -> None:
        for p in mine:
            release(root, p["name"], owner)

    done = run_pass(Pass(
        stream, workers, sink, heartbeat, release_mine,
        lambda batch: (_encode_batch(enc, name, torch.as_tensor(batch.images), manifest.codec, manifest.flips), None),
        sum(p["num_samples"] for p in mine), f"add {name}"), process)
    stats, elapsed = done.stats, done.seconds
    state.wait_for_everyone()
    final = read_manifest(cache)
    records = {r["name"]: r for r in read_records(root, unreadable={})}
    missing = sum(target_part_problem(p, records.get(p["name"])) is not None for p in final.parts)
    per_sample = sum(fields[n].bytes_per_row for n in fields if fields[n].dtype != "str")
    summary = EncodeSummary(encoded=stats.encoded, parts=stats.parts, seconds=elapsed)
    summary.steady_rate = summary.rate
    summary.cache_samples = final.num_samples
    summary.lines = [
        f"added target {name} to {stats.encoded} samples in {stats.parts} part(s) in {elapsed:.1f} s "
        f"({summary.rate:.1f} img/s)",
        f"target {name}: {per_sample / 1024:.1f} KiB/sample; "
        + ("every part done" if not missing else f"{missing} part(s) still to do (rerun the same command)"),
    ]
    return summary
