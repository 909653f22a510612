"""`repa train --diffuse TARGET` (RAE on cached tokens): the variable, statistics, draws, resume, refusals."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from cache_schema import FastReader, read_manifest
from stages.core.errors import UsageError
from stages.encode.run import run_encode
from stages.train.config import TrainConfig
from stages.train.loop import run_train

from .encode_helpers import tiny_config

TARGET = "dinov2-reg"


@pytest.fixture(scope="module")
def reg_model(tmp_path_factory, tiny_models) -> Path:
    """The tiny DINOv2-with-registers with a final LayerNorm that is not the identity (weights of both signs)."""
    from transformers import Dinov2WithRegistersModel

    out = tmp_path_factory.mktemp("reg-model") / "dino-reg"
    model = Dinov2WithRegistersModel.from_pretrained(tiny_models["dino-reg"])
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        dim = model.layernorm.weight.shape[0]
        sign = torch.where(torch.rand(dim, generator=g) < 0.25, -1.0, 1.0)
        model.layernorm.weight.copy_(sign * (0.5 + torch.rand(dim, generator=g)))
        model.layernorm.bias.copy_(0.3 * torch.randn(dim, generator=g))
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def rae_cache(tmp_path_factory, tiny_models, labelled_shards, reg_model) -> Path:
    """96 labelled samples at 64 px with flips, and a DINOv2-with-registers target (4x4 tokens of 32)."""
    cache = tmp_path_factory.mktemp("rae-cache") / "cache"
    source = str(labelled_shards[0].parent / "cc12m-train-{0000..0001}.tar")
    cfg = tiny_config(tiny_models, source, cache, text_encoder=None, flips=True, shard_size=48)
    run_encode(cfg)
    run_encode(tiny_config(tiny_models, source, cache, text_encoder=None, flips=True, add_target=TARGET,
                           target_model=str(reg_model)))
    return cache


def rae_train(cache: Path, run_dir: Path, **kw) -> TrainConfig:
    base = dict(cache=cache, run_dir=run_dir, diffuse=TARGET, method="sit", model=None, arch="dit-dh", width=32,
                depth=2, head_dim=16, head_width=48, head_depth=1, batch_size=8, lr=1e-3, steps=6, val_fraction=0.1,
                num_workers=0, log_every=2, val_every=3, ckpt_every=3, report_to="none", ema_decay=0.9, cond="class")
    base.update(kw)
    return TrainConfig(**base)


def test_the_added_target_records_the_encoders_final_layernorm(rae_cache, reg_model):
    from transformers import Dinov2WithRegistersModel

    norm = Dinov2WithRegistersModel.from_pretrained(reg_model).layernorm
    record = read_manifest(rae_cache).targets[TARGET]["layernorm"]
    assert torch.equal(torch.tensor(record["weight"]), norm.weight.detach())
    assert torch.equal(torch.tensor(record["bias"]), norm.bias.detach())


def cached_latents(cache: Path, ids, flipped: bool, weight, bias) -> np.ndarray:
    """(N, D, h, w) float64 affine-free latents of ``ids``, by hand: (y - bias) / weight, tokens row-major."""
    field = f"{TARGET}_flip" if flipped else TARGET
    tokens = FastReader(cache).read_many(np.asarray(ids), {field: None})[field].astype(np.float64)
    free = (tokens - np.asarray(bias, np.float64)) / np.asarray(weight, np.float64)
    n, count, dim = free.shape
    side = math.isqrt(count)
    return free.reshape(n, side, side, dim).transpose(0, 3, 1, 2)


def test_statistics_are_rae_s_mean_and_variance_of_affine_free_tokens_over_both_views(rae_cache, tmp_path):
    from stages.core.data.split import split_cache
    from stages.core.diffusion.token_stats import load_stats

    cfg = rae_train(rae_cache, tmp_path / "run", flip=True, steps=1, ckpt_every=1)
    run_train(cfg, log=lambda *_: None)
    stats = load_stats(tmp_path / "run" / "stat.pt")
    record = read_manifest(rae_cache).targets[TARGET]["layernorm"]
    train_ids, _ = split_cache(FastReader(rae_cache), 0.1)
    both = np.concatenate([cached_latents(rae_cache, train_ids, flipped, record["weight"], record["bias"])
                           for flipped in (False, True)])
    assert stats.mean.shape == (32, 4, 4) and len(both) == 2 * len(train_ids)
    # RAE's statistics layer at momentum 1 on the whole set: the population mean and (biased) variance per element
    np.testing.assert_allclose(stats.mean.numpy(), both.mean(axis=0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(stats.var.numpy(), both.var(axis=0), rtol=1e-4, atol=1e-6)


def test_a_step_trains_on_normalised_tokens_at_rae_s_shifted_times(rae_cache):
    from stages.core.diffusion.diffusion_variable import LayerNormAffine, TargetTokens
    from stages.core.diffusion.token_stats import LatentStats
    from stages.core.model.conditioning import Conditioner
    from stages.core.model.model_config import ModelConfig
    from stages.core.model.network import build_model
    from stages.train.data import CacheBatchDataset
    from stages.train.draws import draw_step, step_generator
    from stages.train.loop import micro_step

    record = read_manifest(rae_cache).targets[TARGET]
    g = torch.Generator().manual_seed(0)
    stats = LatentStats(torch.randn(32, 4, 4, generator=g), torch.rand(32, 4, 4, generator=g) + 0.5)
    variable = TargetTokens(TARGET, 32, 4, stats, LayerNormAffine.from_record(record["layernorm"]))
    model = build_model(ModelConfig(arch="dit-dh", width=32, depth=1, num_heads=2, head_width=32, head_depth=1,
                                    head_heads=2, patch_size=1, in_channels=32, input_size=4, num_classes=1000))
    conditioner = Conditioner("class", model, 0.1)
    draws = draw_step(5, 3, 4, 1, {"channels": 32, "size": 4}, "uniform", conditioner, torch.device("cpu"),
                      posterior=False, time_shift=variable.shift)
    # RAE: t ~ U[0, 0.999), then s t / (1 + (s - 1) t), s = sqrt(32*4*4 / 4096); the first draws of the step
    s = math.sqrt(32 * 4 * 4 / 4096)
    u = torch.rand(4, generator=step_generator(5, 3)) * (1 - 1 / 1000)
    assert draws.latent_noise is None and torch.allclose(draws.t, s * u / (1 + (s - 1) * u))

    batch = CacheBatchDataset(rae_cache, need_moments=False, targets=[TARGET]).__getitems__([0, 1, 2, 3])
    seen = {}

    def forward(x_t, t, y):
        seen["x_t"], seen["t"] = x_t, t
        return model(x_t, t, y)

    micro_step(forward, conditioner, batch, draws, 0.0, variable)
    free = torch.from_numpy(cached_latents(rae_cache, [0, 1, 2, 3], False, record["layernorm"]["weight"],
                                           record["layernorm"]["bias"])).float()
    x = (free - stats.mean) / torch.sqrt(stats.var + 1e-5)
    tt = draws.t.view(-1, 1, 1, 1)
    assert torch.allclose(seen["x_t"], (1 - tt) * x + tt * draws.noise, atol=1e-5)
    assert torch.equal(seen["t"], draws.t)


def test_token_training_with_flips_resumes_exactly_and_validates_by_t(rae_cache, tmp_path):
    from stages.train.metrics import read_metrics

    common = dict(flip=True, steps=6, ckpt_every=3, keep_checkpoints=0)
    run_train(rae_train(rae_cache, tmp_path / "straight", **common), log=lambda *_: None)
    run_train(rae_train(rae_cache, tmp_path / "split", **{**common, "steps": 3}), log=lambda *_: None)
    logs = []
    run_train(rae_train(rae_cache, tmp_path / "split", **common), log=logs.append)
    assert any("resumed from" in line for line in logs)
    a = torch.load(tmp_path / "straight" / "checkpoints" / "step-0000006.pt", weights_only=True)
    b = torch.load(tmp_path / "split" / "checkpoints" / "step-0000006.pt", weights_only=True)
    assert a["model_config"]["arch"] == "dit-dh" and a["diffusion"]["target"] == TARGET
    for part in ("model", "ema"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k} differs after resume"
    val = [r for r in read_metrics(tmp_path / "straight") if r["kind"] == "val"]
    assert [r["step"] for r in val] == [0, 3, 6] and all(math.isfinite(r["denoise"]) for r in val)
    assert len(val[-1]["denoise_bins"]) == 10 and "repa_cos" not in val[-1]


@pytest.mark.parametrize("change, message", [
    (dict(diffuse="siglip"), "holds no target 'siglip'"),
    (dict(method="repa"), "pass --method sit"),
    (dict(diffuse=None, diffuse_stats="x.pt"), "--diffuse-stats normalises"),
    (dict(preview_every=2), "--preview-every 0"),
])
def test_token_runs_that_cannot_work_are_refused_in_one_line(rae_cache, tmp_path, change, message):
    with pytest.raises(UsageError, match=message) as e:
        run_train(rae_train(rae_cache, tmp_path / "run", **change), log=lambda *_: None)
    assert "\n" not in str(e.value)
    if change.get("diffuse") == "siglip":
        assert f"repa encode --cache {rae_cache} --add-target siglip" in str(e.value)


def test_statistics_of_another_grid_and_int8_tokens_are_refused(rae_cache, tmp_path):
    from stages.core.diffusion.token_stats import LatentStats, save_stats
    from tests.test_fast_reader import write_cache

    save_stats(tmp_path / "stat.pt", LatentStats(torch.zeros(32, 8, 8), torch.ones(32, 8, 8)))
    with pytest.raises(UsageError, match=r"'mean' has shape \(32, 8, 8\)"):
        run_train(rae_train(rae_cache, tmp_path / "run", diffuse_stats=tmp_path / "stat.pt"), log=lambda *_: None)
    root = tmp_path / "int8"
    write_cache(root, "int8")
    with pytest.raises(UsageError, match="stores its tokens as int8") as e:
        run_train(rae_train(root, tmp_path / "run8", diffuse="dino", cond="auto", val_fraction=0.0),
                  log=lambda *_: None)
    assert "--add-target dino" in str(e.value) and "\n" not in str(e.value)


def test_rae_s_lr_schedule_is_constant_then_linear_then_constant():
    from stages.train.optim import lr_factor

    cfg = TrainConfig(cache=Path("c"), run_dir=Path("r"), lr=2e-4, final_lr=2e-5, lr_schedule="linear-decay",
                      lr_decay_start=40, lr_decay_end=800, steps=1400)
    f = lr_factor(cfg)
    ratio = 2e-5 / 2e-4
    # utils/optim_utils.py (RAE@a4d18c4) build_scheduler, linear without warm-up from zero
    for step in (0, 39, 40):
        assert f(step) == 1.0
    assert f(420) == pytest.approx(1 - (1 - ratio) * (420 - 40) / (800 - 40))
    assert f(800) == pytest.approx(ratio) and f(1399) == pytest.approx(ratio)


def test_the_rae_presets_build_rae_s_networks():
    from stages.core.model.ddt import DiTwDDTHead
    from stages.core.model.ddt_config import DDTConfig, LightningDiTConfig
    from stages.core.model.lightning_dit_model import LightningDiT
    from stages.core.model.model_config import ModelConfig
    from stages.core.model.network import build_model

    with torch.device("meta"):
        ours = build_model(ModelConfig.from_preset("DiTDH-XL", in_channels=768, input_size=16))
        theirs = DiTwDDTHead(DDTConfig.from_preset("DiTDH-XL"))
        lightning = build_model(ModelConfig.from_preset("LightningDiT-XL/1", in_channels=768, input_size=16))
        reference = LightningDiT(LightningDiTConfig())
    for a, b in ((ours, theirs), (lightning, reference)):
        assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}
    x, t, y = torch.randn(2, 8, 4, 4), torch.rand(2), torch.tensor([1, 3])
    tiny = ModelConfig(arch="dit-dh", width=32, depth=1, num_heads=2, head_width=48, head_depth=1, head_heads=3,
                       patch_size=1, in_channels=8, input_size=4, num_classes=4)
    torch.manual_seed(0)
    net = build_model(tiny)
    velocity, projected = net(x, t, y)
    plain = DiTwDDTHead(tiny.rae_config())
    plain.load_state_dict(net.state_dict())
    assert projected == [] and torch.equal(velocity, plain.velocity(x, t, y))


@pytest.mark.parametrize("arch", ["dit-dh", "lightning-dit"])
def test_rae_networks_are_called_as_training_networks_and_keep_raes_names(arch):
    """forward(x, t, y) is (velocity(x, t, y), []); without y (cond none) every label is the table's only row 0;
    the empty projector list adds no state-dict entry."""
    from stages.core.model.model_config import ModelConfig
    from stages.core.model.network import build_model

    shape = dict(width=32, depth=1, num_heads=2, patch_size=1, in_channels=8, input_size=4)
    head = dict(head_width=48, head_depth=1, head_heads=3) if arch == "dit-dh" else {}
    torch.manual_seed(0)
    net = build_model(ModelConfig(arch=arch, cond="none", **shape, **head)).eval()
    for p in net.parameters():  # a fresh network predicts 0 (adaLN-Zero): give it weights that show the labels
        torch.nn.init.normal_(p, std=0.2)
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 8, 4, 4, generator=g), torch.rand(2, generator=g)
    with torch.no_grad():
        velocity, projected = net(x, t)
        assert projected == [] and torch.equal(velocity, net.velocity(x, t, torch.zeros(2, dtype=torch.long)))
        labelled = build_model(ModelConfig(arch=arch, cond="class", num_classes=3, **shape, **head)).eval()
        for p in labelled.parameters():
            torch.nn.init.normal_(p, std=0.2)
        y = torch.tensor([0, 2])
        assert torch.equal(labelled(x, t, y)[0], labelled.velocity(x, t, y))
        assert not torch.equal(labelled.velocity(x, t, y), labelled.velocity(x, t, torch.tensor([1, 1])))
    assert not any(k.startswith("projectors") for k in net.state_dict())


@pytest.fixture(scope="module")
def token_run(rae_cache, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("token-run") / "run"
    run_train(rae_train(rae_cache, run, steps=4, ckpt_every=4), log=lambda *_: None)
    return run


def tiny_decoder_folder(root: Path) -> Path:
    """A random-init RAE decoder of the run's token size and grid, saved as RAE releases one: model.pt (bare
    state dict) beside RAE's config.json."""
    import json

    from stages.core.model.rae_decoder import DecoderConfig, RAEDecoder

    shape = dict(decoder_hidden_size=32, decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
                 decoder_intermediate_size=64)
    torch.manual_seed(4)
    decoder = RAEDecoder(DecoderConfig(hidden_size=32, num_patches=16, patch_size=16, **shape))
    with torch.no_grad():
        for p in decoder.parameters():
            p.normal_(0, 0.3)
    root.mkdir(parents=True, exist_ok=True)
    torch.save(decoder.state_dict(), root / "model.pt")
    (root / "config.json").write_text(json.dumps({**shape, "hidden_size": 768, "patch_size": "SHOULD BE RELOADED",
                                                  "layer_norm_eps": 1e-12, "qkv_bias": True, "num_channels": 3}))
    return root


def test_sampling_a_token_run_decodes_the_shifted_euler_ode_through_the_rae_decoder(token_run, tmp_path):
    from PIL import Image

    from stages.core.diffusion.diffusion_variable import TargetTokens
    from stages.core.diffusion.time_shift import shifted_euler_ode
    from stages.core.model.model_config import ModelConfig
    from stages.core.model.network import build_model
    from stages.core.model.rae_decoder import DecoderConfig, load_decoder
    from stages.core.runtime.seeding import generator
    from stages.sample.config import SampleConfig
    from stages.sample.run import run_sample

    folder = tiny_decoder_folder(tmp_path / "decoder")
    out = tmp_path / "samples"
    result = run_sample(SampleConfig(run_dir=token_run, out=out, rae_decoder=str(folder), classes="2,5",
                                     num_samples=2, steps=7, batch_size=2), log=lambda *_: None)
    image = np.asarray(Image.open(result.images[1]))
    assert image.shape == (64, 64, 3) and image.std() > 0
    assert (out / "reference.png").is_file() and (out / "grid.png").is_file()

    # by hand: image 1 from noise seeded (0, 1), class 5, RAE's 7-point shifted grid, de-normalised, decoded
    ckpt = torch.load(next((token_run / "checkpoints").iterdir()), weights_only=True)
    model = build_model(ModelConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["ema"])
    model.eval()
    variable = TargetTokens.from_record(ckpt["diffusion"])
    noise = torch.randn(variable.shape, generator=generator(0, 1))[None]
    x = shifted_euler_ode(lambda x, t: model(x, t, torch.tensor([5]))[0], noise, math.sqrt(32 * 16 / 4096), 7)
    tokens = (x * torch.sqrt(variable.stats.var + 1e-5) + variable.stats.mean).flatten(2).transpose(1, 2)
    decoder = load_decoder(folder / "model.pt", DecoderConfig(hidden_size=32, num_patches=16, patch_size=16,
                                                              decoder_hidden_size=32, decoder_num_hidden_layers=1,
                                                              decoder_num_attention_heads=2,
                                                              decoder_intermediate_size=64))
    expected = (decoder.decode(tokens).clamp(0, 1) * 255).to(torch.uint8)[0].permute(1, 2, 0).numpy()
    assert np.abs(image.astype(int) - expected.astype(int)).max() <= 1


def test_sampling_a_token_run_without_a_decoder_or_with_another_sampler_is_refused(token_run, tmp_path):
    from stages.sample.config import SampleConfig
    from stages.sample.run import run_sample

    with pytest.raises(UsageError, match="pass --rae-decoder"):
        run_sample(SampleConfig(run_dir=token_run, out=tmp_path / "a", num_samples=1), log=lambda *_: None)
    folder = tiny_decoder_folder(tmp_path / "decoder")
    with pytest.raises(UsageError, match="pass --sampler euler"):
        run_sample(SampleConfig(run_dir=token_run, out=tmp_path / "b", num_samples=1, sampler="sde",
                                rae_decoder=str(folder)), log=lambda *_: None)
    with pytest.raises(UsageError, match="not a loadable"):
        (tmp_path / "bad.pt").write_bytes(b"not a torch file")
        run_sample(SampleConfig(run_dir=token_run, out=tmp_path / "c", num_samples=1,
                                rae_decoder=str(tmp_path / "bad.pt"), rae_decoder_config=str(folder / "config.json")),
                   log=lambda *_: None)
