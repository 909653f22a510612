"""`repa import-checkpoint` on an RAE stage-2 file: a DiT-DH checkpoint as RAE's training writes it, with RAE's
stat.pt, becomes a run that `repa sample` decodes exactly as RAE's sampler would; the refusals."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from pipeline.cli import app
from stages.core.files.checkpoint import latest_checkpoint

from . import rae_reference as ref
from .test_checkpoint_format import COMMON
from .test_rae_ddt import _randomised
from .test_rae_time_shift import rae_ode_sample, rae_shift
from .test_rae_train import TARGET, rae_cache, reg_model, tiny_decoder_folder  # noqa: F401 (fixtures)

# the rae_cache target: 4x4 tokens of 32; 1000 classes and the null row, as RAE's ImageNet models
TINY = dict(input_size=4, in_channels=32, hidden_size=(32, 48), depth=(2, 1), num_heads=(2, 3), num_classes=1000)


def rae_file(path: Path, seed: int = 1, **shape) -> ref.DiTwDDTHead:
    """A DiT-DH checkpoint as RAE's ``save_checkpoint`` writes it (src/train.py:53-71 at bytetriper/RAE@a4d18c4):
    ``{"step", "epoch", "model", "ema", "optimizer", "scheduler"}``; the EMA and the weights differ."""
    torch.manual_seed(0)
    ema = _randomised(ref.DiTwDDTHead(patch_size=1, **{**TINY, **shape}), seed).eval()
    weights = _randomised(ref.DiTwDDTHead(patch_size=1, **{**TINY, **shape}), seed + 1)
    optimizer = torch.optim.AdamW(weights.parameters(), lr=2e-4)
    torch.save({"step": 7, "epoch": 1, "model": weights.state_dict(), "ema": ema.state_dict(),
                "optimizer": optimizer.state_dict(), "scheduler": None}, path)
    return ema


def rae_stats(path: Path, shape=(32, 4, 4)) -> tuple[torch.Tensor, torch.Tensor]:
    """stat.pt as RAE's calculate_stat.py:333-340 saves it: ``{"mean", "var"}`` of the latent's shape."""
    g = torch.Generator().manual_seed(5)
    mean, var = torch.randn(shape, generator=g), torch.rand(shape, generator=g) + 0.5
    torch.save({"mean": mean, "var": var}, path)
    return mean, var


def import_args(ckpt: Path, run: Path, cache: Path, *extra: str) -> list[str]:
    return ["import-checkpoint", str(ckpt), "--run-dir", str(run), "--cache", str(cache), *extra]


def test_an_imported_rae_model_samples_as_rae_s_sampler_and_decoder_would(rae_cache, tmp_path):  # noqa: F811
    from PIL import Image

    from stages.core.model.rae_decoder import DecoderConfig, load_decoder
    from stages.core.runtime.seeding import generator
    from stages.sample.config import SampleConfig
    from stages.sample.run import run_sample

    ema = rae_file(tmp_path / "ep-0000001.pt")
    mean, var = rae_stats(tmp_path / "stat.pt")
    run = tmp_path / "run"
    r = CliRunner().invoke(app, import_args(tmp_path / "ep-0000001.pt", run, rae_cache, "--diffuse", TARGET,
                                            "--diffuse-stats", str(tmp_path / "stat.pt")))
    assert r.exit_code == 0, r.output
    saved = torch.load(latest_checkpoint(run), weights_only=True)
    assert sorted(saved) == sorted(COMMON) and saved["step"] == 7 and saved["cond"] == "class"
    assert saved["model_config"]["arch"] == "dit-dh" and saved["model_config"]["num_classes"] == 1000
    assert all(torch.equal(saved["ema"][k], v) for k, v in ema.state_dict().items())
    assert saved["diffusion"]["target"] == TARGET and saved["diffusion"]["eps"] == 1e-5
    assert torch.equal(saved["diffusion"]["mean"], mean) and torch.equal(saved["diffusion"]["var"], var)
    assert "layernorm" in saved["diffusion"]  # the cache records the encoder's final LayerNorm: reference.png is RAE's

    folder = tiny_decoder_folder(tmp_path / "decoder")
    out = tmp_path / "samples"
    result = run_sample(SampleConfig(run_dir=run, out=out, rae_decoder=str(folder), classes="2,5", num_samples=2,
                                     steps=7, batch_size=2), log=lambda *_: None)
    image = np.asarray(Image.open(result.images[1]))
    assert (out / "reference.png").is_file()

    # RAE by hand: its own DiT-DH on the EMA weights, class 5, ode.sample on the 7-point grid shifted by
    # sqrt(C·h·w / 4096) (sample.py:36-41), then rae.py:98-105's de-normalisation and the decoder
    noise = torch.randn(32, 4, 4, generator=generator(0, 1))[None]
    with torch.no_grad():
        x = rae_ode_sample(noise, lambda x, t: ema(x, t, torch.tensor([5])), 7, rae_shift(32 * 4 * 4, 4096))[-1]
        tokens = (x * torch.sqrt(var + 1e-5) + mean).flatten(2).transpose(1, 2)
        decoder = load_decoder(folder / "model.pt", DecoderConfig(
            hidden_size=32, num_patches=16, patch_size=16, decoder_hidden_size=32, decoder_num_hidden_layers=1,
            decoder_num_attention_heads=2, decoder_intermediate_size=64))
        expected = (decoder.decode(tokens).clamp(0, 1) * 255).to(torch.uint8)[0].permute(1, 2, 0).numpy()
    assert image.std() > 0 and np.abs(image.astype(int) - expected.astype(int)).max() <= 1


def test_a_bare_state_dict_imports_as_weights_and_ema(rae_cache, tmp_path):  # noqa: F811
    ema = _randomised(ref.DiTwDDTHead(patch_size=1, **TINY), 3)
    torch.save(ema.state_dict(), tmp_path / "stage2_model.pt")
    rae_stats(tmp_path / "stat.pt")
    r = CliRunner().invoke(app, import_args(tmp_path / "stage2_model.pt", tmp_path / "run", rae_cache, "--diffuse",
                                            TARGET, "--diffuse-stats", str(tmp_path / "stat.pt")))
    assert r.exit_code == 0, r.output
    saved = torch.load(latest_checkpoint(tmp_path / "run"), weights_only=True)
    assert saved["step"] == 0 and all(torch.equal(saved["model"][k], v) and torch.equal(saved["ema"][k], v)
                                      for k, v in ema.state_dict().items())


@pytest.mark.parametrize("preset", ["DiTDH-S", "DiTDH-XL"])
def test_rae_s_presets_are_recognised_from_the_shapes_of_their_weights(preset, tmp_path):
    from stages.core.model.ddt_config import DDT_PRESETS
    from stages.sample.import_rae import ddt_model_config

    shape = DDT_PRESETS[preset]
    with torch.device("meta"):  # RAE's configs/stage2/training/ImageNet256/DiTDH-{S,XL}_DINOv2-B.yaml
        theirs = ref.DiTwDDTHead(input_size=16, patch_size=1, in_channels=768, hidden_size=shape["hidden_size"],
                                 depth=shape["depth"], num_heads=shape["num_heads"])
    mc = ddt_model_config(theirs.state_dict(), tmp_path / "stage2_model.pt", None)
    assert mc.preset == preset and (mc.in_channels, mc.input_size, mc.num_classes) == (768, 16, 1000)
    assert (mc.num_heads, mc.head_heads) == tuple(shape["num_heads"])


@pytest.mark.parametrize("case, message", [
    ("no-stats", "pass --diffuse-stats"),
    ("no-target", "pass --diffuse TARGET"),
    ("missing-stats", "stat.pt: no such file"),
    ("stats-shape", r"'mean' has shape \(32, 8, 8\)"),
    ("wrong-preset", "does not fit"),
    ("mis-shaped", "wrong shape blocks.0.attn.proj.weight"),
    ("grid", "holds 4x4 tokens of 32, the checkpoint generates 8x8 tokens of 32"),
    ("other-target", "holds no target 'siglip'"),
    ("num-heads", "leave --num-heads out"),
    ("sit-file", "--diffuse: .* holds no DiT-DH"),
])
def test_rae_imports_that_cannot_work_are_refused_in_one_line(rae_cache, tmp_path, case, message):  # noqa: F811
    ckpt, stats = tmp_path / "ep.pt", tmp_path / "stat.pt"
    rae_file(ckpt, **(dict(input_size=8) if case == "grid" else {}))
    rae_stats(stats, (32, 8, 8) if case == "stats-shape" else (32, 4, 4))
    extra = ["--diffuse", "siglip" if case == "other-target" else TARGET, "--diffuse-stats", str(stats)]
    if case == "no-stats":
        extra = extra[:2]
    elif case == "no-target":
        extra = extra[2:]
    elif case == "missing-stats":
        stats.unlink()
    elif case == "wrong-preset":
        extra += ["--model", "DiTDH-S"]
    elif case == "mis-shaped":
        contents = torch.load(ckpt, weights_only=True)
        contents["ema"]["blocks.0.attn.proj.weight"] = torch.zeros(32, 16)
        torch.save(contents, ckpt)
    elif case == "num-heads":
        extra += ["--num-heads", "2"]
    elif case == "sit-file":
        torch.save({"x_embedder.proj.weight": torch.zeros(8, 4, 2, 2)}, ckpt)
    r = CliRunner().invoke(app, import_args(ckpt, tmp_path / "run", rae_cache, *extra))
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.output, r.output
    assert re.search(message, lines[0]), lines[0]
    assert not (tmp_path / "run" / "checkpoints").exists()
