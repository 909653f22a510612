"""Stage three, `repa sample`: files and sidecar, reproducibility, guidance interval, previews, errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from pipeline.cli import app
from stages.core.errors import UsageError
from stages.sample.config import SampleConfig
from stages.sample.run import (
    ClassConditions,
    ImageSampler,
    load_run,
    process_indices,
    run_sample,
)
from stages.train.loop import run_train

from .test_train import tiny_train

RESOLUTION = 64  # the train_cache fixture's


@pytest.fixture(scope="module")
def text_run(train_cache, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("sample") / "text"
    run_train(tiny_train(train_cache, run_dir, steps=4, val_every=4, ckpt_every=4, preview_every=2), log=lambda m: None)
    return run_dir


@pytest.fixture(scope="module")
def class_run(train_cache, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("sample") / "class"
    run_train(tiny_train(train_cache, run_dir, cond="class", steps=3, val_every=3), log=lambda m: None)
    return run_dir


def sample_cfg(run_dir: Path, out: Path, **kw) -> SampleConfig:
    base = dict(run_dir=run_dir, out=out, num_samples=4, steps=2, batch_size=4)
    base.update(kw)
    return SampleConfig(**base)


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def cli(*args: str):
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.stderr.strip().splitlines()


# -- what is written --------------------------------------------------------------------------------
def test_text_run_writes_one_png_per_image_a_grid_and_a_sidecar(text_run, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\na blue square on the left\n")
    result = run_sample(sample_cfg(text_run, tmp_path / "out", prompts=prompts, num_samples=5, batch_size=2,
                                   guidance_scale=2.0))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [f"{i:06d}.png" for i in range(5)] + [
        "grid.png", "reference.png", "samples.json"]
    assert all(Image.open(p).size == (RESOLUTION, RESOLUTION) for p in result.images)
    # captioned: images enlarged to a readable cell, a band of text below each row
    grid = np.asarray(Image.open(result.grid).convert("RGB"))
    assert grid.shape[1] > 3 * 128 and grid.shape[0] > 2 * 128 + 2 * 11
    # the reference grid: real held-out images of the cache through the same VAE, with their captions
    reference = np.asarray(Image.open(result.reference).convert("RGB"))
    assert reference.shape[1] > 128 and reference.std() > 5
    entries = json.loads(result.sidecar.read_text())["images"]
    assert [e["prompt"] for e in entries] == ["a red circle", "a blue square on the left"] * 2 + ["a red circle"]
    assert entries[3] == {
        "file": "000003.png", "index": 3, "prompt": "a blue square on the left", "seed": 0, "sampler": "euler",
        "steps": 2, "cfg": 2.0, "interval": [0.0, 1.0], "checkpoint": str(text_run / "checkpoints" / "step-0000004.pt"),
        "step": 4, "ema": True,
    }
    # what a teammate needs to read: the files written through temporary files get the umask's mode, not 0600
    from cache_schema.storage.fsutil import file_mode

    records = (p for p in Path(load_run(text_run).cache).rglob("*.json") if "claims" not in p.parts)
    for path in (result.sidecar, text_run / "config.json", text_run / "checkpoints" / "step-0000004.pt",
                 result.images[0], *records):
        assert (path.stat().st_mode & 0o777) == file_mode(), path


def test_class_run_cycles_the_given_classes(class_run, tmp_path):
    result = run_sample(sample_cfg(class_run, tmp_path / "out", classes="1,2,3", num_samples=5, ema=False,
                                   sampler="heun"))
    entries = json.loads(result.sidecar.read_text())["images"]
    assert [e["class"] for e in entries] == [1, 2, 3, 1, 2]
    assert {(e["sampler"], e["steps"], e["ema"]) for e in entries} == {("heun", 2, False)}
    assert len(list((tmp_path / "out").glob("0*.png"))) == 5
    assert not np.array_equal(pixels(result.images[0]), pixels(result.images[1]))  # different noise per index


def test_held_out_conditions_pair_each_sample_with_its_real_image(class_run, tmp_path):
    from cache_schema import CacheReader
    from stages.core.data.split import split_ids
    from stages.core.files.run_files import read_run_config

    result = run_sample(sample_cfg(class_run, tmp_path / "out", held_out=True, num_samples=4))
    entries = json.loads(result.sidecar.read_text())["images"]
    train = read_run_config(class_run)["config"]
    reader = CacheReader(train["cache"])
    _, held = split_ids(reader.keys, float(train["val_fraction"]))
    assert [e["class"] for e in entries] == [int(reader.sample(int(i))["label"]) for i in held[:4]]
    assert result.reference.exists()
    with pytest.raises(UsageError, match="--held-out takes its conditions from the held-out samples"):
        run_sample(sample_cfg(class_run, tmp_path / "b", held_out=True, classes="1"))


# -- reproducibility ----------------------------------------------------------------------------------
@pytest.mark.parametrize("sampler", ["euler", "sde"])
def test_image_depends_on_seed_and_index_not_on_batch_size(class_run, tmp_path, sampler):
    kw = dict(classes="7", sampler=sampler, steps=3)
    one = run_sample(sample_cfg(class_run, tmp_path / "b1", num_samples=3, batch_size=1, seed=5, **kw))
    three = run_sample(sample_cfg(class_run, tmp_path / "b3", num_samples=3, batch_size=3, seed=5, **kw))
    other = run_sample(sample_cfg(class_run, tmp_path / "s6", num_samples=1, seed=6, **kw))
    for a, b in zip(one.images, three.images, strict=True):
        assert np.abs(pixels(a) - pixels(b)).max() <= 1  # float rounding of batched matmuls at most
    assert np.abs(pixels(one.images[0]) - pixels(other.images[0])).max() > 10


def test_processes_split_indices_without_overlap():
    shares = [process_indices(10, r, 3) for r in range(3)]
    assert shares == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]


# -- guidance -----------------------------------------------------------------------------------------
def test_guidance_applies_only_inside_its_interval(class_run):
    run = load_run(class_run, ema=False)
    with torch.no_grad():  # three training steps leave the labels almost without effect; make them matter
        run.model.y_embedder.embedding_table.weight.normal_(0, 3.0, generator=torch.Generator().manual_seed(0))
    conditions = ClassConditions([3, 5], run.model, torch.device("cpu"))

    def latents(**kw):
        opts = sample_cfg(class_run, None, steps=4, **kw)
        return ImageSampler(run, opts, conditions, torch.device("cpu")).latents([0, 1])

    plain = latents(guidance_scale=1.0)
    # Euler with 4 steps evaluates t = 1, 0.75, 0.5, 0.25: none lies in [0.6, 0.7]
    assert torch.equal(latents(guidance_scale=4.0, guidance_low=0.6, guidance_high=0.7), plain)
    assert not torch.allclose(latents(guidance_scale=4.0), plain, atol=1e-4)
    assert not torch.allclose(latents(guidance_scale=4.0, guidance_low=0.0, guidance_high=0.3),
                              latents(guidance_scale=4.0), atol=1e-4)


# -- previews -----------------------------------------------------------------------------------------
def test_decode_previews_writes_one_grid_per_preview_step(text_run):
    code, _ = cli("decode-previews", str(text_run))
    assert code == 0
    previews = text_run / "previews"
    # one captioned grid per step, and the same held-out samples, real, through the same VAE
    assert sorted(p.name for p in previews.glob("*.png")) == ["reference.png", "step-0000002.png", "step-0000004.png"]
    assert Image.open(previews / "reference.png").size == Image.open(previews / "step-0000004.png").size
    side = json.loads((previews / "step-0000004.json").read_text())
    assert side["step"] == 4 and len(side["images"]) == 8 and all(e["caption"] for e in side["images"])
    assert Image.open(previews / "step-0000004.png").size[0] > 2 * RESOLUTION


# -- overwriting and errors ---------------------------------------------------------------------------
def test_nothing_is_overwritten_without_overwrite(class_run, tmp_path):
    out = tmp_path / "out"
    first = run_sample(sample_cfg(class_run, out, classes="1", num_samples=3))
    before = pixels(first.images[0])
    with pytest.raises(UsageError, match=r"000000\.png exists .*--overwrite"):
        run_sample(sample_cfg(class_run, out, classes="2", num_samples=2))
    assert np.array_equal(pixels(first.images[0]), before)
    again = run_sample(sample_cfg(class_run, out, classes="2", num_samples=2, overwrite=True))
    assert sorted(p.name for p in out.glob("0*.png")) == ["000000.png", "000001.png"]  # no stale third image
    assert [e["class"] for e in json.loads(again.sidecar.read_text())["images"]] == [2, 2]


def test_cli_errors_are_one_line_with_exit_status_2(class_run, tmp_path):
    (tmp_path / "empty-run").mkdir()
    cases = {
        ("--run-dir", str(tmp_path / "empty-run")): "no checkpoint",
        ("--run-dir", str(class_run), "--guidance-low", "0.8", "--guidance-high", "0.2"):
            "--guidance-high 0.2 is below",
        ("--run-dir", str(class_run), "--steps", "0"): "--steps 0",
        ("--run-dir", str(class_run), "--prompt", "a cat", "--out", str(tmp_path / "o")): "not a text one",
    }
    for args, message in cases.items():
        code, lines = cli("sample", *args)
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (args, lines)


def test_conditioning_must_match_the_run(text_run, class_run, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    with pytest.raises(UsageError, match="class-conditioned run, not a text one"):
        run_sample(sample_cfg(class_run, tmp_path / "a", prompts=prompts))
    with pytest.raises(UsageError, match="--classes: .* text-conditioned run"):
        run_sample(sample_cfg(text_run, tmp_path / "b", classes="1,2"))
    with pytest.raises(UsageError, match="text-conditioned run: pass --prompts"):
        run_sample(sample_cfg(text_run, tmp_path / "c"))
    with pytest.raises(UsageError, match=r"ids must lie in \[0, 40\)"):
        run_sample(sample_cfg(class_run, tmp_path / "d", classes="3,40"))


def test_a_vae_that_cannot_be_loaded_is_a_usage_error(class_run, train_cache, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(train_cache, cache)
    manifest = json.loads((cache / "manifest.json").read_text())
    manifest["encoders"]["vae"]["id"] = str(tmp_path / "gone-vae")
    (cache / "manifest.json").write_text(json.dumps(manifest))
    code, lines = cli("sample", "--run-dir", str(class_run), "--cache", str(cache), "--out", str(tmp_path / "o"))
    assert code == 2 and len(lines) == 1 and "cannot load VAE" in lines[0] and "gone-vae" in lines[0]


def test_two_processes_write_the_same_images_as_one(class_run, tmp_path):
    import subprocess
    import sys

    from .encode_helpers import ROOT, env

    args = ["sample", "--run-dir", str(class_run), "--classes", "4,9", "--num-samples", "5", "--batch-size", "2",
            "--steps", "2", "--cfg", "1.5"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29547",
           "-m", "pipeline", *args, "--out", str(tmp_path / "two")]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env(), cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    code, _ = cli(*args, "--out", str(tmp_path / "one"))
    assert code == 0
    for i in range(5):
        assert np.abs(pixels(tmp_path / "one" / f"{i:06d}.png") - pixels(tmp_path / "two" / f"{i:06d}.png")).max() <= 1
    assert (tmp_path / "one" / "samples.json").read_text() == (tmp_path / "two" / "samples.json").read_text()


def test_prompts_are_encoded_as_the_cache_stored_captions(train_cache):
    from cache_schema import CacheReader
    from stages.sample.run import TextEncoder

    reader = CacheReader(train_cache)
    stored = reader.sample(3)
    hidden, mask = TextEncoder(reader.manifest, torch.device("cpu"))([stored["caption"], "a"])
    assert int(mask[0].sum()) == len(stored["text"])
    # same tokens and encoder; only float rounding differs (other batch, other padding length)
    np.testing.assert_allclose(hidden[0, : len(stored["text"])].numpy(), stored["text"].astype(np.float32),
                               rtol=1e-2, atol=1e-3)
    assert not hidden[0, int(mask[0].sum()):].any()  # padding is zero
