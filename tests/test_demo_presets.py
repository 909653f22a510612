"""The demo preset end to end through the CLI, as `make encode`, `make train` and `make sample` run it,
on a smaller corpus and with fewer steps (paths overridden on the command line)."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from pipeline.cli import app

ROOT = Path(__file__).resolve().parent.parent
DEMO = str(ROOT / "configs" / "demo.toml")


def test_demo_preset_encode_train_sample(tmp_path, tiny_models):
    runner = CliRunner()
    r = runner.invoke(app, ["data", "demo", "--out", str(tmp_path / "data"), "--shards", "2", "--samples-per-shard", "24"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["encode", "--config", DEMO, "--source", str(tmp_path / "data" / "cc12m-train-{0000..0001}.tar"),
                            "--cache", str(tmp_path / "cache"), "--vae", str(tiny_models["vae"]),
                            "--dino", str(tiny_models["dino"]), "--text-encoder", str(tiny_models["text"]), "--num-workers", "0"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["train", "--config", DEMO, "--cache", str(tmp_path / "cache"), "--run-dir", str(tmp_path / "run"),
                            "--steps", "4", "--batch-size", "8", "--num-workers", "0", "--val-every", "2",
                            "--ckpt-every", "4", "--preview-every", "4", "--report-to", "none"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["sample", "--config", DEMO, "--run-dir", str(tmp_path / "run"), "--out", str(tmp_path / "samples"),
                            "--num-samples", "3", "--steps", "2"])
    assert r.exit_code == 0, r.output
    sidecar = json.loads((tmp_path / "samples" / "samples.json").read_text())
    prompts = (ROOT / "configs" / "demo-prompts.txt").read_text().splitlines()
    assert [im["prompt"] for im in sidecar["images"]] == prompts[:3]
    assert (tmp_path / "samples" / "grid.png").exists() and len(list((tmp_path / "samples").glob("0*.png"))) == 3
    r = runner.invoke(app, ["decode-previews", str(tmp_path / "run")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "run" / "previews" / "step-0000004.png").exists()
