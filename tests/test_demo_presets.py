"""The demo preset end to end through the CLI, as `make encode`, `make train` and `make sample` run it,
on a smaller corpus and with fewer steps (paths overridden on the command line)."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import load_preset

ROOT = Path(__file__).resolve().parent.parent
DEMO = str(ROOT / "configs" / "demo.toml")


def test_demo_preset_encode_train_sample(tmp_path, tiny_models):
    runner = CliRunner()
    r = runner.invoke(app, ["data", "demo", "--out", str(tmp_path / "data"), "--shards", "2",
                            "--samples-per-shard", "24"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["encode", "--config", DEMO,
                            "--source", str(tmp_path / "data" / "cc12m-train-{0000..0001}.tar"),
                            "--cache", str(tmp_path / "cache"), "--vae", str(tiny_models["vae"]),
                            "--dino", str(tiny_models["dino"]), "--text-encoder", str(tiny_models["text"]),
                            "--num-workers", "0"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["train", "--config", DEMO, "--cache", str(tmp_path / "cache"),
                            "--run-dir", str(tmp_path / "run"), "--steps", "4", "--batch-size", "8",
                            "--num-workers", "0", "--val-every", "2", "--ckpt-every", "4", "--preview-every", "4",
                            "--report-to", "none"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["sample", "--config", DEMO, "--run-dir", str(tmp_path / "run"),
                            "--out", str(tmp_path / "samples"), "--num-samples", "3", "--steps", "2"])
    assert r.exit_code == 0, r.output
    sidecar = json.loads((tmp_path / "samples" / "samples.json").read_text())
    # the held-out captions, in the order reference.png shows their real images
    from cache_schema import CacheReader
    from stages.core.data.split import split_ids

    reader = CacheReader(tmp_path / "cache")
    _, held = split_ids(reader.keys, load_preset(ROOT / "configs" / "demo.toml", "train")["val_fraction"])
    assert [im["prompt"] for im in sidecar["images"]] == [reader.sample(int(i))["caption"] for i in held[:3]]
    assert (tmp_path / "samples" / "reference.png").exists()
    assert (tmp_path / "samples" / "grid.png").exists() and len(list((tmp_path / "samples").glob("0*.png"))) == 3
    r = runner.invoke(app, ["decode-previews", str(tmp_path / "run")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "run" / "previews" / "step-0000004.png").exists()


def test_make_add_targets_commands_fit_the_demo_geometry(tmp_path, tiny_models, demo_shards):
    """The Makefile's add-targets lines, as make would run them, against a cache of the demo preset's geometry:
    each target must see the demo cache's token grid, so the Makefile and the demo preset cannot drift apart."""
    import shlex
    import subprocess

    from cache_schema import read_manifest

    runner = CliRunner()
    cache = tmp_path / "cache"
    r = runner.invoke(app, ["encode", "--config", DEMO, "--source", str(demo_shards[0]), "--cache", str(cache),
                            "--vae", str(tiny_models["vae"]), "--dino", str(tiny_models["dino"]),
                            "--text-encoder", str(tiny_models["text"]), "--num-workers", "0"])
    assert r.exit_code == 0, r.output
    dry = subprocess.run(["make", "-n", "--no-print-directory", "-o", ".venv/.installed",
                          "-o", f"{cache}/manifest.json", "add-targets", f"DEMO_CACHE={cache}",
                          f"TINY={tiny_models['dino'].parent}"],
                         cwd=ROOT, capture_output=True, text=True, check=True)
    commands = [shlex.split(line) for line in dry.stdout.splitlines() if " encode " in line]
    assert len(commands) == 2
    for args in commands:
        r = runner.invoke(app, args[1:])  # without the launcher: `repa encode ...`
        assert r.exit_code == 0, f"{shlex.join(args)}: {r.output}"
    targets = read_manifest(cache).targets
    assert sorted(targets) == ["dino-reg", "siglip"]
    assert all(t["grid"] == read_manifest(cache).dino["grid"] for t in targets.values())


def test_rae_demo_preset_encode_train_sample(tmp_path, tiny_models):
    """configs/rae-demo.toml as `make encode/train/sample PRESET=rae-demo` run it after the demo's encode: the
    target added to the demo cache, a DiT-DH on its tokens, samples through a fitted tiny decoder."""
    import numpy as np
    from PIL import Image

    rae = str(ROOT / "configs" / "rae-demo.toml")
    runner = CliRunner()
    data = tmp_path / "data" / "cc12m-train-{0000..0001}.tar"
    r = runner.invoke(app, ["data", "demo", "--out", str(tmp_path / "data"), "--shards", "2",
                            "--samples-per-shard", "24"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["encode", "--config", DEMO, "--source", str(data), "--cache", str(tmp_path / "cache"),
                            "--vae", str(tiny_models["vae"]), "--dino", str(tiny_models["dino"]),
                            "--text-encoder", str(tiny_models["text"]), "--num-workers", "0"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["encode", "--config", rae, "--cache", str(tmp_path / "cache"),
                            "--target-model", str(tiny_models["dino-reg"]), "--num-workers", "0"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["encoders", "fit-rae-decoder", "--source", str(data),
                            "--dino", str(tiny_models["dino-reg"]), "--out", str(tmp_path / "decoder"), "--steps", "3"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["train", "--config", rae, "--cache", str(tmp_path / "cache"),
                            "--run-dir", str(tmp_path / "run"), "--steps", "4", "--batch-size", "8",
                            "--num-workers", "0", "--val-every", "2", "--ckpt-every", "4", "--report-to", "none"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "run" / "stat.pt").is_file()
    r = runner.invoke(app, ["sample", "--config", rae, "--run-dir", str(tmp_path / "run"),
                            "--out", str(tmp_path / "samples"), "--rae-decoder", str(tmp_path / "decoder"),
                            "--num-samples", "3", "--steps", "3"])
    assert r.exit_code == 0, r.output
    grid = np.asarray(Image.open(tmp_path / "samples" / "grid.png"))
    assert grid.ndim == 3 and grid.std() > 0 and (tmp_path / "samples" / "reference.png").exists()
    assert len(list((tmp_path / "samples").glob("0*.png"))) == 3
