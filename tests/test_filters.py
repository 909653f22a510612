"""Encode-time filters (--keep, --min-size, --min-similarity): exactly the failing samples are skipped and
named, the similarity is stored per sample, and the filters are part of what identifies a cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from cache_schema import CacheError, CacheReader, read_manifest, verify_cache
from cache_schema.operations.info import describe
from stages.core.data.sample_filters import SampleFilters, parse_keep
from stages.core.encoders.images import Prepared, prepare_sample
from stages.core.errors import UsageError
from stages.encode.run import run_encode

from .encode_helpers import tiny_config, write_filter_corpus


def test_keep_rules_are_parsed_not_evaluated_and_name_what_failed():
    rule = parse_keep(" aesthetic_score >= 3.0 ")
    assert (rule.field, rule.op, rule.value, rule.text) == ("aesthetic_score", ">=", 3.0, "aesthetic_score>=3")
    assert rule.reject({"aesthetic_score": 3}) is None
    assert rule.reject({"aesthetic_score": 2.9}) == "filter-keep: aesthetic_score=2.9 fails --keep 'aesthetic_score>=3'"
    assert "no aesthetic_score" in rule.reject({})
    assert "not a number" in rule.reject({"aesthetic_score": True})
    assert parse_keep("meta.score<0.5").reject({"meta": {"score": 0.25}}) is None
    for bad in ("__import__('os').system('x')>1", "score>", "score=>3", "score>3 or 1", "score>abc"):
        with pytest.raises(UsageError, match="--keep .*FIELD OP NUMBER"):
            parse_keep(bad)


def test_filters_apply_before_decoding_in_order(tmp_path):
    shard, expected, passing = write_filter_corpus(tmp_path)
    filters = SampleFilters.from_options(["aesthetic_score>3"], 100)
    got = {}
    for sample in wds.WebDataset(str(shard), shardshuffle=False):
        out = prepare_sample(sample, 64, 10**9, True, filters)
        got[sample["__key__"]] = "kept" if isinstance(out, Prepared) else out.reason.split(":")[0]
    assert got == {**expected, **{k: "kept" for k in passing}}
    unfiltered = [prepare_sample(s, 64, 10**9, True) for s in wds.WebDataset(str(shard), shardshuffle=False)]
    assert all(isinstance(o, Prepared) for o in unfiltered)  # every skip above is the filters' doing


def _reference_similarity(model_dir, shard, keys) -> dict[str, float]:
    """The tiny SigLIP's cosine for each sample, computed with transformers' own processor on the encode crop."""
    from transformers import AutoTokenizer, SiglipImageProcessor, SiglipModel

    model = SiglipModel.from_pretrained(model_dir).eval()
    processor = SiglipImageProcessor.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    out = {}
    for sample in wds.WebDataset(str(shard), shardshuffle=False):
        if sample["__key__"] not in keys:
            continue
        prep = prepare_sample(sample, 64, 10**9, True)
        pixels = processor(images=[Image.fromarray(prep.image)], return_tensors="pt")["pixel_values"]
        ids = tokenizer([prep.caption], padding="max_length", max_length=64, truncation=True, return_tensors="pt")
        with torch.no_grad():
            o = model(pixel_values=pixels, input_ids=ids["input_ids"])
        out[prep.key] = float((o.image_embeds * o.text_embeds).sum())
    return out


@pytest.fixture(scope="module")
def filtered(tmp_path_factory, tiny_models):
    """A cache encoded with all three filters, the threshold splitting the passing samples in two."""
    root = tmp_path_factory.mktemp("filters")
    shard, expected, passing = write_filter_corpus(root / "data")
    ref = _reference_similarity(tiny_models["siglip"], shard, set(passing))
    ordered = sorted(ref.values())
    gaps = [(b - a, (a + b) / 2) for a, b in zip(ordered[1:-2], ordered[2:-1], strict=True)]  # keep 2+ on each side
    threshold = round(max(gaps)[1], 6)
    cfg = tiny_config(tiny_models, str(shard), root / "cache", keep=["aesthetic_score>3"], min_size=100,
                      similarity_model=str(tiny_models["siglip"]), min_similarity=threshold)
    summary = run_encode(cfg)
    return cfg, summary, expected, passing, ref, threshold


def test_exactly_the_failing_samples_are_skipped_and_named(filtered):
    cfg, summary, expected, passing, ref, threshold = filtered
    low = {k for k in passing if ref[k] < threshold}
    assert 2 <= len(low) <= len(passing) - 2
    reader = CacheReader(cfg.cache)
    assert sorted(reader.keys.tolist()) == sorted(set(passing) - low)
    skips = {s["key"]: s["reason"] for s in reader.manifest.skipped}
    assert {k: r.split(":")[0] for k, r in skips.items()} == {**expected, **{k: "filter-min-similarity" for k in low}}
    assert "aesthetic_score=3 fails --keep 'aesthetic_score>3'" in skips["k000"]
    assert skips["s000"].startswith("filter-min-size: 99x300")
    assert f"below --min-similarity {threshold}" in skips[next(iter(low))]
    assert summary.skipped == {"filter-keep": 4, "filter-min-size": 2, "filter-min-similarity": len(low)}
    assert verify_cache(cfg.cache) == len(passing) - len(low)


def test_similarity_is_stored_per_sample_and_declared(filtered):
    cfg, _, _, _, ref, threshold = filtered
    reader = CacheReader(cfg.cache)
    man = reader.manifest
    assert man.fields["similarity"]["dtype"] == "float32" and man.fields["similarity"]["per_sample"]
    assert man.settings["filters"] == {"keep": ["aesthetic_score>3"], "min_size": 100, "min_similarity": threshold}
    assert man.settings["similarity_model"]["class"] == "SiglipModel"
    stored = np.concatenate([reader.read(p["name"], "similarity") for p in reader.parts])
    want = np.array([ref[k] for k in reader.keys.tolist()])
    np.testing.assert_allclose(stored, want, atol=1e-2)
    assert (stored >= threshold).all()
    # a reader that knows nothing of the field reads the rest as before
    sample = reader.sample(0)
    assert set(sample) >= {"key", "moments", "dino", "text"} and "similarity" not in sample


def test_cache_info_shows_what_each_filter_removed(filtered):
    cfg, _, _, passing, ref, threshold = filtered
    low = sum(ref[k] < threshold for k in passing)
    lines = describe(read_manifest(cfg.cache))
    line = next(x for x in lines if x.startswith("filters"))
    assert ("--keep 'aesthetic_score>3' removed 4" in line and "--min-size 100 removed 2" in line
            and f"--min-similarity {threshold} removed {low}" in line)
    assert any(x.startswith("similarity ") and "siglip" in x for x in lines)


def test_other_filters_make_another_cache(filtered, tiny_models):
    cfg, *_ = filtered
    other = tiny_config(tiny_models, cfg.source, cfg.cache, keep=["aesthetic_score>4"], min_size=100,
                        similarity_model=cfg.similarity_model, min_similarity=cfg.min_similarity)
    with pytest.raises(CacheError, match="filters: .*aesthetic_score>3.*aesthetic_score>4"):
        run_encode(other)
    assert read_manifest(cfg.cache).settings["filters"]["keep"] == ["aesthetic_score>3"]


def test_min_similarity_needs_a_similarity_model(tiny_models, tmp_path):
    cfg = tiny_config(tiny_models, "x.tar", tmp_path / "c", min_similarity=0.1)
    with pytest.raises(UsageError, match="--min-similarity 0.1 needs --similarity-model"):
        run_encode(cfg)


def test_dry_run_estimates_what_each_filter_removes_from_the_first_shard(tmp_path, tiny_models):
    shard, expected, passing = write_filter_corpus(tmp_path / "data")
    scores = sorted(_reference_similarity(tiny_models["siglip"], shard, set(passing)).values())
    threshold = (scores[1] + scores[2]) / 2  # between two scores: the two lowest of the kept samples fall below
    cfg = tiny_config(tiny_models, str(shard), tmp_path / "never", keep=["aesthetic_score>3"], min_size=100,
                      similarity_model=str(tiny_models["siglip"]), min_similarity=threshold, dry_run=True)
    lines = run_encode(cfg).lines
    n = len(expected) + len(passing)
    line = next(x for x in lines if x.startswith("filters") and "--keep" in x)
    assert f"of the first {n} samples" in line
    assert "--keep 'aesthetic_score>3' removes 4 (33.3%)" in line and "--min-size 100 removes 2 (16.7%)" in line
    sim = next(x for x in lines if "--min-similarity" in x)
    assert f"of the first {len(passing)} samples the other filters keep" in sim and "removes 2 (" in sim
    assert any(x.startswith(f"samples        ~{len(passing) - 2} (") for x in lines)
    assert not (tmp_path / "never").exists()


def test_unset_filters_keep_the_fingerprint_of_caches_made_before_them():
    from cache_schema import fingerprint, settings_diff

    old = {"schema_version": 2, "resolution": 256, "crop": "adm-center", "dtype": "bf16", "feature_codec": "fp16"}
    unset = {**old, "filters": None, "similarity_model": None}
    keep = {**old, "filters": {"keep": ["aesthetic_score>3"]}, "similarity_model": None}
    assert fingerprint(unset) == fingerprint(old)
    assert fingerprint(keep) != fingerprint(old)
    assert settings_diff(old, keep) == ['filters: null -> {"keep": ["aesthetic_score>3"]}']
