"""Stage three, `repa evaluate`: FID/IS plumbing with a tiny stand-in Inception network, reference
statistics, CLIP score, eval.jsonl and errors. Values are meaningless here; the plumbing is not."""

from __future__ import annotations

import json
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from typer.testing import CliRunner

from pipeline.cli import app
from stages.core.errors import UsageError
from stages.core.files.run_files import EVAL_FILE
from stages.sample.config import EvaluateConfig
from stages.sample.evaluate import (
    fid_metric,
    inception_file,
    load_inception,
    run_evaluate,
)
from stages.sample.reference import FeatureStats
from stages.train.loop import run_train

from .test_train import tiny_train


class TinyInception(nn.Module):
    """The call interface of NVIDIA's inception-2015-12-05.pt with 32 features and 10 classes."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, stride=2)
        self.fc = nn.Linear(32, 10)

    def forward(self, img: Tensor, return_features: bool = False, use_fp16: bool = False,
                no_output_bias: bool = False) -> Tensor:
        x = F.interpolate(img.float() / 127.5 - 1, size=[29, 29], mode="bilinear", align_corners=False)
        h = torch.relu(self.conv(x))
        features = torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)
        if return_features:
            return features
        logits = F.linear(features, self.fc.weight, None if no_output_bias else self.fc.bias)
        return torch.softmax(logits, dim=1)


@pytest.fixture(scope="module")
def inception(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("inception") / "tiny-inception.pt"
    torch.jit.save(torch.jit.script(TinyInception()), str(path))
    return path


@pytest.fixture(scope="module")
def text_run(train_cache, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("evaluate") / "text"
    run_train(tiny_train(train_cache, run_dir, steps=3, val_every=3), log=lambda m: None)
    return run_dir


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    """A random-init CLIPModel with a CLIPProcessor (32-px images, the tiny word-level tokenizer)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from stages.demo.tiny_encoders import CLIP_MAX_LENGTH, clip_tokenizer

    tok = clip_tokenizer()
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=CLIP_MAX_LENGTH, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("clip") / "clip"
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(path)
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=images, tokenizer=tok).save_pretrained(path)
    return path


def eval_cfg(run_dir: Path, inception: Path, **kw) -> EvaluateConfig:
    base = dict(run_dir=run_dir, inception_weights=inception, num_samples=6, steps=2, batch_size=4)
    base.update(kw)
    return EvaluateConfig(**base)


def random_images(seed: int, n: int = 24, low: int = 0, high: int = 256) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, high, (n, 3, 48, 48), generator=g, dtype=torch.uint8)


# -- metric plumbing ------------------------------------------------------------------------------
def test_fid_is_zero_for_identical_sets_and_positive_for_different_ones(inception, tmp_path):
    net = load_inception(inception, torch.device("cpu"))
    real = fid_metric(net, torch.device("cpu"))
    real.update(random_images(0), real=True)
    stats = FeatureStats.from_fid(real)
    assert stats.n == 24 and stats.mu.shape == (32,) and stats.sigma.shape == (32, 32)

    def fid_against(reference: FeatureStats, images: Tensor) -> float:
        metric = fid_metric(net, torch.device("cpu"))
        reference.load_into(metric, main=True)
        metric.update(images, real=False)
        return float(metric.compute())

    different = fid_against(stats, random_images(1, low=100, high=200))
    assert abs(fid_against(stats, random_images(0))) < 1e-4 * different
    assert different > 0
    stats.save(tmp_path / "ref.npz")
    got = fid_against(FeatureStats.load(tmp_path / "ref.npz"), random_images(1, low=100, high=200))
    assert got == pytest.approx(different)
    # statistics made by another tool: only mu and sigma
    np.savez(tmp_path / "other.npz", mu=stats.mu, sigma=stats.sigma)
    other = FeatureStats.load(tmp_path / "other.npz")
    assert other.n is None
    assert fid_against(other, random_images(1, low=100, high=200)) == pytest.approx(different, rel=1e-6)


# -- `repa evaluate` --------------------------------------------------------------------------------
def test_make_reference_then_reference_matches_on_the_fly_and_eval_jsonl_grows(text_run, inception, tmp_path):
    on_the_fly = run_evaluate(eval_cfg(text_run, inception))
    ref = tmp_path / "held-out.npz"
    assert run_evaluate(eval_cfg(text_run, inception, make_reference=ref)) == ref
    with pytest.raises(UsageError, match="held-out.npz exists"):
        run_evaluate(eval_cfg(text_run, inception, make_reference=ref))
    from_file = run_evaluate(eval_cfg(text_run, inception, reference=ref))
    assert from_file["fid"] == pytest.approx(on_the_fly["fid"], rel=1e-6) and on_the_fly["fid"] > 0
    assert from_file["reference_n"] == on_the_fly["reference_n"] == FeatureStats.load(ref).n > 1

    lines = [json.loads(line) for line in (text_run / EVAL_FILE).read_text().splitlines()]
    assert len(lines) == 2  # --make-reference evaluates nothing
    assert [r["reference"] for r in lines] == [f"held-out:{tiny_cache(text_run)}", str(ref)]
    record = lines[0]
    assert {k: record[k] for k in ("step", "ema", "n", "sampler", "steps", "cfg", "interval")} == {
        "step": 3, "ema": True, "n": 6, "sampler": "euler", "steps": 2, "cfg": 1.0, "interval": [0.0, 1.0]}
    assert record["checkpoint"].endswith("step-0000003.pt")
    assert record["is_mean"] >= 1.0 - 1e-6 and record["is_std"] >= 0  # IS >= 1, up to rounding
    assert "clip_score" not in record


def tiny_cache(run_dir: Path) -> str:
    return json.loads((run_dir / "config.json").read_text())["config"]["cache"]


def test_clip_score_for_captioned_data(text_run, inception, tiny_clip):
    record = run_evaluate(eval_cfg(text_run, inception, num_samples=4, clip_model=str(tiny_clip)))
    assert 0.0 <= record["clip_score"] <= 100.0 and record["clip_model"] == str(tiny_clip)
    last = json.loads((text_run / EVAL_FILE).read_text().splitlines()[-1])
    assert last["clip_score"] == record["clip_score"]


# -- errors ---------------------------------------------------------------------------------------
def test_offline_download_failure_names_the_inception_option(monkeypatch, tmp_path):
    def offline(url, dst, *args, **kwargs):
        raise URLError("no network")

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(UsageError, match="pass --inception-weights FILE"):
        inception_file(None)
    cached = tmp_path / "hub" / "checkpoints" / "inception-2015-12-05.pt"
    cached.write_bytes(b"x")  # once there, the cached file is used without a download
    assert inception_file(None) == cached


def test_evaluate_cli_errors_are_one_line_with_exit_status_2(text_run, inception, tmp_path):
    np.savez(tmp_path / "bad.npz", mean=np.zeros(3))
    cases = {
        ("--inception-weights", str(tmp_path / "missing.pt")): "--inception-weights",
        ("--inception-weights", str(inception), "--reference", str(tmp_path / "bad.npz")): "no mu and sigma",
        ("--inception-weights", str(inception), "--guidance-low", "0.5", "--guidance-high", "0.1"):
            "below --guidance-low",
    }
    for args, message in cases.items():
        result = CliRunner().invoke(app, ["evaluate", "--run-dir", str(text_run), "--num-samples", "4", *args])
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == 2 and len(lines) == 1 and message in lines[0], (args, lines)


def test_reference_images_are_read_in_parallel_in_shard_order_with_progress(text_run, capsys):
    from cache_schema import read_manifest
    from stages.sample.reference import held_out, source_images, source_locations

    cache = Path(tiny_cache(text_run))
    held = held_out(cache, json.loads((text_run / "config.json").read_text())["config"]["val_fraction"])
    where, urls = source_locations(held, None), sorted(set(held.sources))
    assert len(urls) > 1
    serial = list(source_images(held, urls, read_manifest(cache), where, workers=1))
    parallel = list(source_images(held, urls, read_manifest(cache), where, workers=len(urls), progress=True))
    assert len(serial) == len(held) and all(np.array_equal(a, b) for a, b in zip(serial, parallel, strict=True))
    err = capsys.readouterr().err
    assert "reference images: 100%" in err and f"{len(held)}/{len(held)} [" in err and "img/s" in err
