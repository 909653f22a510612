"""Planning estimates: docs/planning.md is what the estimate functions give, the dry run prints the same
figures, and the bytes per sample are the bytes the writer stores."""

from __future__ import annotations

import numpy as np
from typer.testing import CliRunner

from cache_schema import CacheReader
from cache_schema.format.sizes import sample_bytes
from pipeline.cli import app
from pipeline.planning import PAGE, render
from stages.core.planning import Geometry, encode_lines


def test_the_planning_page_is_current():
    assert PAGE.read_text() == render(), "docs/planning.md is stale: run `python -m pipeline.planning --write`"
    assert "## `imagenet256`" in PAGE.read_text() and "## `repa-rf`" in PAGE.read_text()


def test_bytes_per_sample_are_the_stored_arrays_bytes(tmp_path, tiny_models, demo_shards):
    runner = CliRunner()
    for codec in ("fp16", "int8"):
        cache = tmp_path / codec
        r = runner.invoke(app, ["encode", "--source", str(demo_shards[0]), "--cache", str(cache), "--resolution", "64",
                                "--vae", str(tiny_models["vae"]), "--dino", str(tiny_models["dino"]), "--text-encoder",
                                "none", "--num-workers", "0", "--feature-codec", codec, "--flips"])
        assert r.exit_code == 0, r.output
        reader = CacheReader(cache)
        part = reader.manifest.parts[0]["name"]
        arrays = {name: reader.read(part, name) for name in reader.fields}
        rows = len(arrays["moments"])
        stored = {"moments": arrays["moments"].nbytes,
                  "dino": arrays["dino"].nbytes + (arrays["dino_scale"].nbytes if codec == "int8" else 0)}
        stored["flips"] = sum(a.nbytes for n, a in arrays.items() if n.endswith("_flip"))
        man = reader.manifest
        want = sample_bytes(man.latent["channels"], man.latent["size"], man.dino["tokens"], man.dino["dim"], codec,
                            flips=True)
        assert {k: v // rows for k, v in stored.items()} == want

        dry = runner.invoke(app, ["encode", "--source", str(demo_shards[0]), "--cache", str(tmp_path / "new"),
                                  "--resolution", "64", "--vae", str(tiny_models["vae"]),
                                  "--dino", str(tiny_models["dino"]), "--text-encoder", "none",
                                  "--feature-codec", codec, "--flips", "--dry-run"])
        assert dry.exit_code == 0, dry.output
        total = sum(want.values())
        assert f"bytes/sample   {'total':<8}{total / 1024:10.1f} KiB" in dry.output


def test_the_dry_run_prints_the_planning_encode_estimate(monkeypatch, tmp_path, tiny_models, demo_shards):
    # the tiny encoders' shapes with the rates of SD-VAE and DINOv2-B, so both print a measured estimate
    from stages.core import planning

    monkeypatch.setitem(planning.VAE_RATES, (4, False), (100.0, "test VAE"))
    monkeypatch.setitem(planning.DINO_RATES, 32, (400.0, "test DINOv2"))
    r = CliRunner().invoke(app, ["encode", "--source", str(demo_shards[0]), "--cache", str(tmp_path / "c"),
                                 "--resolution", "64", "--vae", str(tiny_models["vae"]),
                                 "--dino", str(tiny_models["dino"]), "--text-encoder", "none", "--dry-run"])
    assert r.exit_code == 0, r.output
    samples = int(r.output.split("samples        ~")[1].split()[0])
    rows = dict((w, (v, b)) for w, v, b in encode_lines(Geometry(4, 8, 16, 32), samples, "fp16", False, False))
    value, basis = rows["encode"]
    assert f"encode time    {value} on H100s (estimated from {basis})" in r.output
    assert np.isclose(float(value.split()[0]), round(samples / 80.0 / 3600, 1))  # 1 / (1/100 + 1/400) = 80 img/s


def test_every_real_run_preset_is_planned():
    from pipeline.planning import PRESETS, ROOT

    presets = {p.stem for p in (ROOT / "configs").glob("*.toml")
               if "[train]" in p.read_text() and "[sweep]" not in p.read_text() and "demo" not in p.stem}
    assert presets == {name for name, _, _ in PRESETS}
