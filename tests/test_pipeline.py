"""The CLI plumbing: presets parse into the stage configs, command-line options override them, docs are current."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline import cli
from pipeline.config import ConfigError, build, load_preset
from pipeline.sweep import expand_grid, load_sweep
from stages.encode.config import EncodeConfig
from stages.sample.config import SampleConfig
from stages.train.config import TrainConfig

ROOT = Path(__file__).resolve().parent.parent
PRESETS = sorted((ROOT / "configs").glob("*.toml"))


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_shipped_presets_build_valid_configs(preset):
    enc = load_preset(preset, "encode")
    if enc:
        build(EncodeConfig, {"source": "x.tar", **enc})
    train = load_preset(preset, "train")
    if load_preset(preset, "sweep"):  # a sweep file: every grid point must be a valid run
        for run in expand_grid(load_sweep(preset)):
            build(TrainConfig, run.train)
    elif train:
        build(TrainConfig, train)
    sample = load_preset(preset, "sample")
    if sample:
        build(SampleConfig, sample)


def test_command_line_overrides_the_preset_which_overrides_defaults(tmp_path, monkeypatch):
    seen = {}

    def fake_run(cfg, log=print):
        seen["cfg"] = cfg
        from stages.encode.run import EncodeSummary

        return EncodeSummary()

    monkeypatch.setattr("stages.encode.run.run_encode", fake_run)
    preset = tmp_path / "p.toml"
    preset.write_text('[encode]\nsource = "a.tar"\ncache = "c"\nresolution = 512\nbatch_size = 7\n'
                      'text_encoder = "none"\n')
    r = CliRunner().invoke(cli.app, ["encode", "--config", str(preset), "--batch-size", "9"])
    assert r.exit_code == 0, r.output
    cfg = seen["cfg"]
    assert (cfg.source, cfg.resolution, cfg.batch_size, cfg.text_encoder) == ("a.tar", 512, 9, None)
    assert cfg.dino == EncodeConfig().dino  # untouched default


def test_unknown_preset_key_is_a_one_line_error(tmp_path):
    preset = tmp_path / "p.toml"
    preset.write_text('[encode]\nsource = "a.tar"\nresolutoin = 512\n')
    r = CliRunner().invoke(cli.app, ["encode", "--config", str(preset)])
    assert r.exit_code == 2 and "unknown key 'resolutoin'" in r.output
    assert "did you mean 'resolution'?" in r.output and "valid keys" not in r.output  # the closest, not all of them
    with pytest.raises(ConfigError, match="no such file"):
        load_preset(tmp_path / "missing.toml", "encode")


def test_cli_reference_is_current():
    from pipeline.docs import END, PAGE, START, reference

    text = PAGE.read_text()
    block = text.split(START, 1)[1].split(END, 1)[0].strip()
    assert block == reference().strip(), "docs/cli.md is stale: run `python -m pipeline.docs --write`"


def test_stage_paths_have_no_demo_defaults():
    """Without the demo preset nothing points at demo paths: the cache and run directory must be given."""
    for args, flag in ((["train"], "--cache"), (["train", "--cache", "c"], "--run-dir"), (["sample"], "--run-dir"),
                       (["evaluate"], "--run-dir"), (["encode", "--source", "a.tar"], "--cache")):
        r = CliRunner().invoke(cli.app, args)
        lines = r.stderr.strip().splitlines()
        assert r.exit_code == 2 and len(lines) == 1 and lines[0].startswith(f"error: {flag} is required"), (args, lines)
    for cls in (EncodeConfig, TrainConfig, SampleConfig):
        assert "demo" not in repr(cls()), cls


@pytest.mark.parametrize("command, option, default", [
    ("train", "--num-classes", "max label + 1"), ("train", "--align-layer", "preset's: 8 for L/XL, 4 for B"),
    ("train", "--num-workers", "4"), ("encode", "--num-workers", "CPU cores / processes"),
    ("sample", "--guidance-scale", "1.0"),
])
def test_help_keeps_every_default_text(command, option, default):
    import re

    out = CliRunner().invoke(cli.app, [command, "--help"], terminal_width=400).output
    # an option's entry: from its line to the next line that starts another option
    entry = " ".join(re.split(r"\n\s+--", out.split(f"\n  {option}", 1)[1], maxsplit=1)[0].split())
    assert f"[default: {default}]" in entry or f"[default: ({default})]" in entry, entry


def test_a_bad_choice_lists_none_where_none_is_accepted(tmp_path):
    r = CliRunner().invoke(cli.app, ["train", "--cache", str(tmp_path), "--run-dir", str(tmp_path / "r"),
                                     "--model", "SiT-Z"])
    assert r.exit_code == 2 and "--model 'SiT-Z': choose one of SiT-B/" in r.output
    assert "repa-rf-w2048, " in r.output and r.output.rstrip().endswith(", or none")  # the last preset comes before
    r = CliRunner().invoke(cli.app, ["train", "--cache", str(tmp_path), "--run-dir", str(tmp_path / "r"),
                                     "--time-sampling", "beta"])
    assert r.exit_code == 2 and r.output.rstrip().endswith("uniform, logit-normal")  # no "none" where it is not one
