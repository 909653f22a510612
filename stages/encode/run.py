"""`repa encode`: run the encoders over a webdataset corpus once and write the feature cache.

One process per GPU (``accelerate launch -m pipeline encode ...``) or one process on CPU, and any
number of such jobs on the same cache. The main process plans the run (``plan``); the input shards
to encode are dealt out to processes (``work[rank::world]``) and each process claims its shards
before writing, so no two live processes ever write the same part. Each process decodes in
DataLoader workers, encodes on its device and writes on a background thread. Rerunning the same
command resumes: committed parts are skipped, parts cut short are redone from the start of their
input shard, and --redo / --repair encode named or damaged parts again.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from cache_schema import CacheError, cache_fields, field_from_json, new_manifest, read_manifest
from cache_schema.format.layout import MANIFEST_NAME
from cache_schema.operations.info import describe
from cache_schema.storage.object_store import cache_root, is_s3
from cache_schema.writing.claims import Heartbeat, Owner
from stages.core.encoders.features import EncoderSpec, FeatureEncoders, dino_preprocess_description
from stages.core.encoders.images import crop_name
from stages.core.encoders.load import ModelSource
from stages.core.encoders.tars import expand_source
from stages.core.options import check
from stages.core.runtime.threads import available_cores, set_threads

from .add_target import run_add_target
from .config import EncodeConfig
from .destination import destination, refuse_on_object_storage
from .dry_run import dry_run, samples_per_shard
from .duplicates import SeenKeys
from .part_sink import PartSink, SinkStats
from .plan import claim_shards, identify, make_plan
from .skeleton import DTYPE_NAMES, Pass, run_pass, this_process
from .source import ShardStream
from .summary import EncodeSummary


def encoder_spec(cfg: EncodeConfig) -> EncoderSpec:
    text = ModelSource(cfg.text_encoder, cfg.text_subfolder) if cfg.text_encoder else None
    return EncoderSpec(
        vae=ModelSource(cfg.vae, cfg.vae_subfolder),
        dino=ModelSource(cfg.dino),
        text=text,
        max_text_tokens=cfg.max_text_tokens,
        resolution=cfg.resolution,
        dino_pos_embed=cfg.dino_pos_embed,
        text_attention=cfg.text_attention,
        similarity=ModelSource(cfg.similarity_model) if cfg.similarity_model else None,
        class_tokens=cfg.class_tokens,
        flips=cfg.flips,
    )


def _settings(cfg: EncodeConfig, dtype_name: str, identity: dict) -> dict:
    return {
        "resolution": cfg.resolution,
        "crop": crop_name(cfg.jpeg_draft),
        "vae": identity["vae"],
        "dino": identity["dino"],
        "dino_preprocess": dino_preprocess_description(cfg.dino_pos_embed),
        "text_encoder": identity["text_encoder"],
        "max_text_tokens": cfg.max_text_tokens if cfg.text_encoder else None,
        "text_attention": cfg.text_attention if cfg.text_encoder else None,
        "dtype": dtype_name,
        "feature_codec": cfg.feature_codec,
        "shard_size": cfg.shard_size,
        "filters": cfg.filter_settings(),
        "similarity_model": identity["similarity_model"],
        "class_tokens": True if cfg.class_tokens else None,
        "flips": True if cfg.flips else None,
    }


def build_manifest(cfg: EncodeConfig, enc: FeatureEncoders):
    spec = enc.spec
    latent = {**enc.latent, "mean": None, "std": None}
    text = None
    if enc.text_info is not None:
        text = {"dim": enc.text_info["dim"], "kind": enc.text_info["kind"], "max_tokens": cfg.max_text_tokens,
                "attention": cfg.text_attention}
    fields = cache_fields(
        latent["channels"],
        latent["size"],
        enc.dino_info["tokens"],
        enc.dino_info["dim"],
        text["dim"] if text else None,
        cfg.feature_codec,
        similarity=enc.similarity is not None,
        class_tokens=1 + enc.dino_info["registers"] if cfg.class_tokens else 0,
        flips=cfg.flips,
    )
    encoders = {"vae": spec.vae.to_json(), "dino": spec.dino.to_json()}
    if spec.text is not None:
        encoders["text_encoder"] = spec.text.to_json()
    if spec.similarity is not None:
        encoders["similarity_model"] = spec.similarity.to_json()
    settings = _settings(cfg, DTYPE_NAMES[enc.dtype], enc.identity())
    return new_manifest(settings, latent, enc.dino_info, text, fields, encoders)


def _check_cache_dir(cache: Path) -> None:
    """Fail before loading any model when the cache directory cannot be written."""
    probe = cache if cache.exists() else next((p for p in cache.parents if p.exists()), Path("."))
    if cache.exists() and not cache.is_dir():
        raise CacheError(f"--cache {cache}: exists and is not a directory; choose another path")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise CacheError(f"--cache {cache}: {probe} is not writable; choose a writable directory")
    if cache.is_dir() and (cache / MANIFEST_NAME).exists() and not os.access(cache / MANIFEST_NAME, os.R_OK):
        raise CacheError(f"--cache {cache}: manifest is not readable; fix permissions or choose another directory")


def _default_workers(num_processes: int) -> int:
    return max(1, min(16, available_cores() // max(num_processes, 1)))


# -- the real thing ----------------------------------------------------------------------------
def _share(state, obj):
    """The main process's ``obj`` on every process."""
    if state.num_processes == 1:
        return obj
    from accelerate.utils import broadcast_object_list

    box = [obj]
    broadcast_object_list(box, from_process=0)
    return box[0]


def run_encode(cfg: EncodeConfig, log=print) -> EncodeSummary:
    check(cfg)
    # The field is typed as the command line parses it (a Path); from here on it holds the cache's root, an S3Path
    # on object storage, which everything below that is handed cfg reads.
    cfg.cache = cache_root(cfg.cache)  # type: ignore[assignment]
    refuse_on_object_storage(cfg)
    if cfg.add_target is not None:
        return run_add_target(cfg, log)
    owner = Owner.here()
    dest = destination(cfg, owner)
    try:
        return _run(cfg, dest, owner, log)
    finally:
        dest.close()


def _run(cfg: EncodeConfig, dest, owner: Owner, log) -> EncodeSummary:
    from accelerate.utils import gather_object

    urls = expand_source(cfg.source)
    if cfg.dry_run:
        return EncodeSummary(lines=dry_run(cfg, urls, encoder_spec(cfg)))
    if not is_s3(cfg.cache):
        _check_cache_dir(cfg.cache)

    process = this_process(cfg.dtype)
    state, device, main = process.state, process.device, process.main
    enc = FeatureEncoders(encoder_spec(cfg), device, process.dtype, compile=cfg.compile, batch_size=cfg.batch_size)
    template = build_manifest(cfg, enc)

    # -- what to do: made once, by the main process -------------------------------------------
    plan = None
    if main:
        shards = identify(urls)
        sources = {s.part: {"url": s.url, "id": s.source_id} for s in shards}
        unreadable: dict[str, str] = {}  # part -> why its record cannot be read: not committed, so encoded again
        manifest = dest.start(template, cfg, sources, unreadable)
        plan = make_plan(cfg.cache, manifest, shards, cfg.redo, cfg.repair, log, unreadable)
    plan = _share(state, plan)
    manifest = read_manifest(cfg.cache, unreadable={})
    if manifest.fingerprint != template.fingerprint:
        raise CacheError(f"{cfg.cache}: process {state.process_index} computed another fingerprint; "
                         "encoders differ between processes")
    work = plan.work
    # Read before claiming: at scale the keys take seconds, and a claim is kept alive from the heartbeat on.
    encoding = {s.part for s in work}
    seen = SeenKeys.of_cache(cfg.cache, [p["name"] for p in manifest.parts if p["name"] not in encoding])
    mine = claim_shards(dest, work[state.process_index :: state.num_processes], plan, owner,
                        cfg.lease_seconds, log)
    heartbeat = Heartbeat(dest.claims, owner, interval=cfg.lease_seconds / 4)
    heartbeat.add([s.part for s in mine])
    limit = None
    if cfg.max_samples is not None:
        limit = cfg.max_samples // state.num_processes + (state.process_index < cfg.max_samples % state.num_processes)
    workers = cfg.num_workers if cfg.num_workers is not None else _default_workers(state.num_processes)
    workers = min(workers, len(mine))
    threads = set_threads(cfg.threads, workers)
    if main:
        log(f"encode: {len(plan.shards)} input shards, {len(plan.done)} already committed, {len(plan.todo)} to do, "
            f"{len(plan.redo)} to redo, on {state.num_processes} process(es) x {workers} decode worker(s), "
            f"device {device}, {process.dtype_name}, {threads} torch thread(s)")

    # -- the loop: decode workers -> encoders -> background part sink -------------------------
    per_shard = samples_per_shard(work[0].url) if work else None
    total = per_shard * len(work) if per_shard else None
    if cfg.max_samples is not None:
        total = min(total or cfg.max_samples, cfg.max_samples)
    sink = PartSink(dest.writer_dir, _fields_of(manifest), cfg.shard_size, {s.url: s for s in mine},
                    dest.writer_owner(owner), heartbeat, min_similarity=cfg.min_similarity,
                    publish=lambda part: dest.publish(part, owner), seen=seen)

    def encode(batch):
        feats = enc.encode(torch.as_tensor(batch.images), batch.captions, cfg.feature_codec)
        host = {k: v.to("cpu", non_blocking=True) for k, v in feats.items()}
        ready = None
        if device.type == "cuda":
            ready = torch.cuda.Event()
            ready.record()
        return host, ready

    def release_mine() -> None:
        for s in mine:
            dest.claims.release(s.part, owner)

    done = run_pass(Pass(
        ShardStream([s.url for s in mine], cfg.batch_size, cfg.resolution, cfg.max_pixels, cfg.jpeg_draft, limit,
                    cfg.sample_filters()),
        workers, sink, heartbeat, release_mine, encode, total, "encode",
        processes=state.num_processes,
        postfix=lambda: {"skipped": sum(sink.stats.skipped.values()) * state.num_processes}), process)
    stats, elapsed = done.stats, done.seconds
    all_stats: list[SinkStats] = gather_object([stats]) if state.num_processes > 1 else [stats]
    state.wait_for_everyone()
    summary = EncodeSummary(seconds=elapsed)
    if done.steady_rate is not None:
        summary.steady_rate = done.steady_rate
    for s in all_stats:
        summary.encoded += s.encoded
        summary.parts += s.parts
        summary.skipped.update(s.skipped)
    unreadable = {}
    final = read_manifest(cfg.cache, unreadable)
    summary.cache_samples = final.num_samples
    summary.lines = _summary_lines(summary, final)
    if unreadable:  # parts of input shards this run was not given
        part, why = next(iter(unreadable.items()))
        summary.lines.insert(3, f"{len(unreadable)} part(s) with an unreadable record, not committed (e.g. {why}); "
                                "rerun with --source naming their input shards to encode them again")
    return summary


def _fields_of(manifest):
    return {name: field_from_json(name, spec) for name, spec in manifest.fields.items()}


def _summary_lines(s: EncodeSummary, manifest) -> list[str]:
    skipped = ", ".join(f"{r}={c}" for r, c in sorted(s.skipped.items())) or "none"
    per_sample = sum(manifest.bytes_per_sample().values())
    lines = [
        f"encoded {s.encoded} samples into {s.parts} part(s) in {s.seconds:.1f} s ({s.rate:.1f} img/s)",
        f"skipped {sum(s.skipped.values())}: {skipped}",
        f"cache is {manifest.completeness()}",
        f"cache now holds {manifest.num_samples} samples in {len(manifest.parts)} parts, "
        f"{per_sample / 1024:.1f} KiB/sample of features",
        "",
        *describe(manifest),
    ]
    return lines

