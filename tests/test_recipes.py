"""Faithful recipes: official REPA's SiT and sampler, and repa-rf's DiT and optimiser, compared with
transcriptions of their code (tests/reference_repa.py, tests/reference_repa_rf.py) on identical tensors; the
presets named after them hold their settings."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import build, load_preset
from pipeline.sweep import expand_grid, load_sweep
from stages.core.diffusion.samplers import guided, heun_ode
from stages.core.model.model_config import ModelConfig
from stages.core.model.network import build_model, count_parameters
from stages.sample.decode import to_pixels
from stages.train.config import TrainConfig, resume_differences
from stages.train.optim import lr_factor, parameter_table

from . import reference_repa as repa
from . import reference_repa_rf as seed

ROOT = Path(__file__).resolve().parent.parent
TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, decoder_hidden_size=64, encoder_depth=2,
            depth=3, num_heads=4, num_classes=10, z_dims=[16], projector_dim=32)


def randomise(model: torch.nn.Module, seed_: int) -> torch.nn.Module:
    """Random values everywhere (zero-initialised layers included), so every path of the network counts."""
    g = torch.Generator().manual_seed(seed_)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


# -- official REPA's SiT ---------------------------------------------------------------------------------
def test_sit_xl2_has_the_state_dict_of_official_repa():
    with torch.device("meta"):
        theirs = repa.SiT(**dict(TINY, input_size=32, hidden_size=1152, decoder_hidden_size=1152, depth=28,
                                 num_heads=16, num_classes=1000, z_dims=[768], projector_dim=2048, encoder_depth=8))
        ours = build_model(ModelConfig.from_preset("SiT-XL/2", repa_dims=(768,), num_classes=1000))
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    assert len(theirs.state_dict()) == 298


def test_sit_embeds_time_and_positions_as_official_repa():
    theirs = repa.SiT(**TINY)
    ours = build_model(ModelConfig(width=64, depth=3, num_heads=4, input_size=8, num_classes=10, repa_dims=(16,),
                                   align_layer=2, projector_dim=32))
    torch.testing.assert_close(ours.pos_embed, theirs.pos_embed.data, atol=1e-7, rtol=0)
    ours.t_embedder.load_state_dict(theirs.t_embedder.state_dict())
    t = torch.tensor([0.0, 0.013, 0.5, 0.97, 1.0])
    torch.testing.assert_close(ours.t_embedder(t), theirs.t_embedder(t))  # raw t, not t * 1000


def test_an_official_repa_checkpoint_imports_samples_and_gives_the_same_outputs(train_cache, tmp_path):
    torch.manual_seed(0)
    model, ema = randomise(repa.SiT(**TINY), 1), randomise(repa.SiT(**TINY), 2)
    ckpt = tmp_path / "0000007.pt"
    torch.save(repa.train_checkpoint(model, ema, 7, model="SiT-T/2", encoder_depth=2, num_classes=10, proj_coeff=0.5),
               ckpt)
    r = CliRunner().invoke(app, ["import-checkpoint", str(ckpt), "--run-dir", str(tmp_path / "run"), "--cache",
                                 str(train_cache), "--num-heads", "4"])
    assert r.exit_code == 0, r.output
    imported = torch.load(tmp_path / "run" / "checkpoints" / "step-0000007.pt", weights_only=True)
    ours = build_model(ModelConfig(**imported["model_config"]))
    ours.load_state_dict(imported["ema"])
    ema.eval(), ours.eval()
    g = torch.Generator().manual_seed(3)
    x, t, y = torch.randn(5, 4, 8, 8, generator=g), torch.rand(5, generator=g), torch.tensor([0, 3, 9, 10, 2])
    with torch.no_grad():
        (v_theirs, zs_theirs), (v_ours, zs_ours) = ema(x, t, y), ours(x, t, y=y)
    torch.testing.assert_close(v_ours, v_theirs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(zs_ours[0], zs_theirs[0], atol=1e-5, rtol=1e-5)
    r = CliRunner().invoke(app, ["sample", "--run-dir", str(tmp_path / "run"), "--classes", "1,4", "--num-samples", "2",
                                 "--steps", "2", "--sampler", "heun", "--out", str(tmp_path / "s")])
    assert r.exit_code == 0, r.output
    assert len(list((tmp_path / "s").glob("0*.png"))) == 2


def test_heun_with_a_guidance_interval_and_the_pixels_are_official_repas():
    torch.manual_seed(0)
    theirs = randomise(repa.SiT(**TINY), 4).eval()
    ours = build_model(ModelConfig(width=64, depth=3, num_heads=4, input_size=8, num_classes=10, repa_dims=(16,),
                                   align_layer=2, projector_dim=32))
    ours.load_state_dict(theirs.state_dict())
    ours.eval()
    noise, y = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(5)), torch.tensor([1, 5, 7])
    with torch.no_grad():
        want = repa.euler_sampler(theirs, noise, y, num_steps=6, heun=True, cfg_scale=3.0, guidance_low=0.3,
                                  guidance_high=0.6, null_class=10)
        velocity = guided(lambda x, t, c: ours(x.float(), t.float(), **c)[0].double(), {"y": y},
                          {"y": torch.tensor([10])}, 3.0, 0.3, 0.6)
        got = heun_ode(velocity, noise.double(), steps=6)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    images = torch.linspace(-1.05, 1.05, 3 * 4 * 4 * 100).reshape(100, 3, 4, 4)
    assert torch.equal(to_pixels(images).permute(0, 2, 3, 1), repa.to_uint8(images))


# -- repa-rf's DiT and optimiser ----------------------------------------------------------------
def seed_config(width: int, depth: int = 9, head_dim: int = 64, text_dim: int = 4096, repa_dim: int = 1536,
                input_size: int = 32, align_layer: int = 7) -> ModelConfig:
    return ModelConfig(arch="repa-rf", width=width, depth=depth, head_dim=head_dim, patch_size=2, in_channels=16,
                       input_size=input_size, cond="text", text_dim=text_dim, text_mask=False, repa_dims=(repa_dim,),
                       align_layer=align_layer)


@pytest.mark.parametrize("width, without, total", [(512, 95_334_464, 96_385_088), (1024, 304_439_360, 307_063_360),
                                                    (2048, 1_063_960_640, 1_071_304_256)])
def test_the_seed_dit_has_the_seeds_parameters(width, without, total):
    with torch.device("meta"):
        theirs = seed.seed_dit(width)
        ours = build_model(seed_config(width))
    assert count_parameters(ours) == without and count_parameters(ours, include_projector=True) == total
    assert sum(p.numel() for p in theirs.parameters()) == total  # what repa-rf logs as model_parameters
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in theirs.state_dict().items()}


def test_the_seed_dit_gives_the_seeds_outputs():
    torch.manual_seed(0)
    theirs = randomise(seed.DiT(in_channels=16, patch_size=2, depth=3, num_heads=4, hidden_size=64,
                                cross_attn_input_size=12, repa_target_layers=[1], repa_target_dim=8), 6)
    ours = build_model(seed_config(64, depth=3, head_dim=16, text_dim=12, repa_dim=8, input_size=8, align_layer=2))
    ours.load_state_dict(theirs.state_dict())
    g = torch.Generator().manual_seed(7)
    x, t, text = torch.randn(3, 16, 8, 8, generator=g), torch.rand(3, generator=g), torch.randn(3, 5, 12, generator=g)
    with torch.no_grad():
        (v_theirs, f_theirs), (v_ours, f_ours) = theirs(x, text, t), ours(x, t, text=text)
    torch.testing.assert_close(v_ours, v_theirs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(f_ours[0], f_theirs[0], atol=1e-5, rtol=1e-5)


def test_repa_rf_mup_groups_match_the_seeds_get_mup_setup():
    with torch.device("meta"):
        theirs = seed.seed_dit(512)
        ours = build_model(seed_config(512))
    lr = 2.0**-6
    expected = {}
    for group in theirs.get_mup_setup(lr, 1e-3, seed.CONSTANT_PARAM_NAMES):
        ids = {id(p) for p in group["params"]}
        for name, p in theirs.named_parameters():
            if id(p) in ids:
                expected[name] = (group["lr"], group["weight_decay"])
    table = parameter_table(ours, "repa-rf-mup", lr, 1e-3)
    assert {r["name"]: (r["lr"], r["weight_decay"]) for r in table} == expected
    sizes = {}
    for r in table:
        sizes[(r["lr"], r["weight_decay"])] = sizes.get((r["lr"], r["weight_decay"]), 0) + 1
    assert sorted(sizes.values(), reverse=True) == [100, 59, 10]


def test_repa_rf_cosine_is_transformers_cosine_schedule_with_warmup():
    from transformers import get_cosine_schedule_with_warmup

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    hf = get_cosine_schedule_with_warmup(opt, 500, 5000).lr_lambdas[0]
    ours = lr_factor(TrainConfig(lr_schedule="repa-rf-cosine", steps=5000))
    for step in (0, 1, 250, 499, 500, 501, 2750, 4999, 5000):
        assert ours(step) == pytest.approx(hf(step), abs=1e-12)


def test_the_old_spellings_of_repa_rfs_options_still_load_and_resume():
    old = build(TrainConfig, {"cache": "c", "run_dir": "r", "param_groups": "seed-mup", "lr_schedule": "seed-cosine"})
    assert (old.param_groups, old.lr_schedule) == ("repa-rf-mup", "repa-rf-cosine")
    saved = {**old.to_json(), "param_groups": "seed-mup", "lr_schedule": "seed-cosine"}  # a config.json of before
    assert resume_differences(saved, old.to_json()) == []
    assert resume_differences({**saved, "lr_schedule": "cosine"}, old.to_json()) != []


def _relative_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("pixels", [224, 256])
def test_per_call_dino_table_is_the_seeds_interpolation_on_a_dinov2_g_table(pixels):
    from types import SimpleNamespace

    from transformers import Dinov2Config
    from transformers.models.dinov2.modeling_dinov2 import Dinov2Embeddings

    from stages.core.encoders.load import resample_position_embedding

    config = Dinov2Config(hidden_size=1536, image_size=518, patch_size=14)  # DINOv2-G: a 37x37 table
    table = torch.randn(1, 1 + 37 * 37, 1536, generator=torch.Generator().manual_seed(pixels))
    model = SimpleNamespace(embeddings=Dinov2Embeddings(config), config=config)
    model.embeddings.position_embeddings = torch.nn.Parameter(table.clone())
    grid = pixels // 14
    resample_position_embedding(model, [grid, grid], "bicubic-per-call")
    ours = model.embeddings.position_embeddings.detach()

    theirs = seed.seed_interpolate_pos_encoding(table, pixels, pixels)
    assert ours.shape == theirs.shape == (1, 1 + grid * grid, 1536)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-6)
    # The comparison has teeth: transformers' own per-call table (this version's) and the offset-free
    # resize are other tables.
    fresh = Dinov2Embeddings(config)
    fresh.position_embeddings = torch.nn.Parameter(table.clone())
    with torch.no_grad():
        installed = fresh.interpolate_pos_encoding(torch.zeros(1, 1 + grid * grid, 1536), pixels, pixels)
    assert _relative_l2(installed, theirs) > 1e-2
    plain = torch.nn.functional.interpolate(table[:, 1:].reshape(1, 37, 37, -1).permute(0, 3, 1, 2), size=(grid, grid),
                                            mode="bicubic", align_corners=False)
    assert _relative_l2(plain.permute(0, 2, 3, 1).reshape(1, -1, 1536), theirs[:, 1:]) > 1e-3


def test_batch_multiplicity_tiles_each_sample_with_its_own_noise(train_cache, tmp_path):
    from stages.train.loop import run_train, tile

    batch = {"moments": torch.arange(6.0).reshape(3, 2), "label": torch.tensor([4, 5, 6])}
    tiled = tile(batch, 4)
    assert tiled["label"].tolist() == [4, 5, 6] * 4 and torch.equal(tiled["moments"][3:6], batch["moments"])
    from .test_train import tiny_train

    run_train(tiny_train(train_cache, tmp_path / "run", batch_size=8, batch_multiplicity=4, steps=2, val_every=2),
              log=lambda m: None)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["config"]["batch_multiplicity"] == 4


def test_batch_multiplicity_samples_one_latent_per_image_and_gives_each_copy_its_own_t_and_noise(
        train_cache, tmp_path, monkeypatch):
    """The seed samples the VAE posterior once per image and then repeats the batch 4x, each copy with its own t
    and noise (cloneofsimo/repa-rf@666492b trainer.py: ``latent_dist.sample()`` ~line 68, before the
    ``.repeat`` ~line 81). Checked on the real training step, fed a batch with known moments."""
    from cache_schema import read_manifest
    from stages.train import loop
    from stages.train.data import CacheBatchDataset
    from stages.train.setup import build_model_config

    from .test_train import tiny_train

    cfg = tiny_train(train_cache, tmp_path / "run", batch_size=8, batch_multiplicity=4, cond="class", cond_dropout=0.5)
    manifest = read_manifest(train_cache)
    dataset = CacheBatchDataset(train_cache, need_label=True)
    labels = dataset.reader.index_arrays()["label"]
    trainer = loop.build_trainer(cfg, loop.make_accelerator(cfg), build_model_config(cfg, manifest, "class", labels),
                                 "class", manifest.latent)
    batch = dataset.__getitems__([3, 7])
    c, size = manifest.latent["channels"], manifest.latent["size"]
    mean = torch.tensor([-1.0, 2.0]).view(2, 1, 1, 1).expand(2, c, size, size)
    batch["moments"] = torch.cat([mean, torch.full_like(mean, 0.5)], dim=1).half()  # std 0.5: a real posterior
    seen = []

    def recording(forward, batch, x, noise, t, cond, *args, **kw):
        seen.append((x, noise, t, cond["y"]))
        return terms(forward, batch, x, noise, t, cond, *args, **kw)

    terms = loop.batch_loss_terms
    monkeypatch.setattr(loop, "batch_loss_terms", recording)
    before = [p.detach().clone() for p in trainer.raw_model.parameters()]
    trainer.step(1, iter([batch]))
    (x, noise, t, y), = seen
    assert x.shape == noise.shape == (8, c, size, size)
    copies = x.view(4, 2, c, size, size)
    assert all(torch.equal(copies[k], copies[0]) for k in range(4))  # one latent per image, in every copy
    scale, shift = manifest.latent["scaling_factor"], manifest.latent["shift_factor"]
    eps = copies[0] / scale + shift - mean  # the posterior noise times std: drawn, so neither zero nor shared
    assert eps.abs().min(dim=0).values.max() > 0.1 and not torch.allclose(eps[0], eps[1])
    assert len(set(t.tolist())) == 8  # its own t per copy
    assert all(not torch.allclose(noise[i], noise[j]) for i in range(8) for j in range(i))  # and its own noise
    kept = y != trainer.raw_model.null_class  # each copy its own dropout coin; the rest keep their image's label
    assert torch.equal(y[kept], batch["label"].repeat(4)[kept]) and 0 < int(kept.sum()) < 8
    # the step trained
    assert any(not torch.equal(a, p) for a, p in zip(before, trainer.raw_model.parameters(), strict=True))


def test_batch_multiplicity_resumes_exactly(train_cache, tmp_path):
    from stages.train.loop import run_train

    from .test_train import tiny_train

    kw = dict(batch_size=8, batch_multiplicity=4, val_every=100, ckpt_every=2, keep_checkpoints=0)
    run_train(tiny_train(train_cache, tmp_path / "straight", steps=4, **kw), log=lambda m: None)
    run_train(tiny_train(train_cache, tmp_path / "resumed", steps=2, **kw), log=lambda m: None)
    run_train(tiny_train(train_cache, tmp_path / "resumed", steps=4, resume=True, **kw), log=lambda m: None)
    a, b = (torch.load(tmp_path / run / "checkpoints" / "step-0000004.pt", weights_only=True)
            for run in ("straight", "resumed"))
    assert all(torch.equal(a[part][k], b[part][k]) for part in ("model", "ema") for k in a[part])


def test_validation_from_a_separate_cache_of_the_same_encoding(train_cache, tmp_path):
    import shutil

    from stages.core.errors import UsageError
    from stages.train.loop import run_train

    from .test_train import tiny_train

    shutil.copytree(train_cache, tmp_path / "val")
    run_train(tiny_train(train_cache, tmp_path / "run", val_fraction=0.0, val_cache=tmp_path / "val", steps=2,
                         val_every=2), log=lambda m: None)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["train_samples"] == 96 and config["val_samples"] == 96
    assert config["val_cache"] == str(tmp_path / "val")
    manifest = json.loads((tmp_path / "val" / "manifest.json").read_text())
    manifest["fingerprint"], manifest["settings"]["resolution"] = "0" * 16, 128
    (tmp_path / "val" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UsageError, match="--val-cache .* other settings .*resolution"):
        run_train(tiny_train(train_cache, tmp_path / "run2", val_fraction=0.0, val_cache=tmp_path / "val"))


# -- JPEG decoding ----------------------------------------------------------------------------------------------
def test_encode_decodes_jpegs_at_full_size_unless_draft_is_asked_and_draft_caches_keep_reading(
    tiny_models, demo_shards, tmp_path
):
    from cache_schema import CacheReader
    from stages.encode.config import EncodeConfig
    from stages.encode.run import run_encode
    from stages.train.loop import run_train

    from .encode_helpers import tiny_config
    from .test_train import tiny_train

    assert EncodeConfig(source="x.tar", cache=tmp_path / "c").jpeg_draft is False  # official REPA: full decode
    def preset(name: str) -> EncodeConfig:
        return build(EncodeConfig, {"source": "x.tar", **load_preset(ROOT / "configs" / f"{name}.toml", "encode")})

    assert preset("cc12m").jpeg_draft is True  # speed asked for explicitly
    assert [preset(name).jpeg_draft for name in ("imagenet256", "repa-rf", "demo")] == [False] * 3
    quiet = lambda *a: None  # noqa: E731
    full, draft = tmp_path / "full", tmp_path / "draft"
    run_encode(tiny_config(tiny_models, str(demo_shards[0]), full, text_encoder=None), log=quiet)
    run_encode(tiny_config(tiny_models, str(demo_shards[0]), draft, text_encoder=None,
                           jpeg_draft=True), log=quiet)
    a, b = CacheReader(full), CacheReader(draft)
    assert (a.manifest.settings["crop"], b.manifest.settings["crop"]) == ("adm-center", "adm-center+jpeg-draft")
    assert a.manifest.fingerprint != b.manifest.fingerprint
    # the demo shards hold large JPEGs, so the two decodes stored other latents for some samples
    idx = {k: i for i, k in enumerate(b.keys.tolist())}
    gaps = [abs(a.sample(i)["moments"].astype(float) - b.sample(idx[k])["moments"].astype(float)).max()
            for i, k in enumerate(a.keys.tolist())]
    assert max(gaps) > 1e-2
    # a draft cache (as every cache made before the default changed) trains as before
    result = run_train(tiny_train(draft, tmp_path / "run", steps=2, val_every=2, ckpt_every=2, val_fraction=0.0))
    assert result.steps == 2


# -- presets -----------------------------------------------------------------------------------------------
# official REPA train.py defaults (and README: SiT-XL/2, --enc-type dinov2-vit-b, 400k steps)
REPA_TRAIN = dict(model="SiT-XL/2", batch_size=256, lr=1e-4, lr_schedule="constant", adam_betas=(0.9, 0.999),
                  weight_decay=0.0, grad_clip=1.0, ema_decay=0.9999, repa_lambda=0.5, align_layer=8, projector_dim=2048,
                  time_sampling="uniform", cond="class", num_classes=1000, cond_dropout=0.1, mixed_precision="fp16",
                  steps=400_000, val_fraction=0.0, batch_multiplicity=1, param_groups="uniform")


def test_the_imagenet_preset_is_official_repas_run():
    cfg = build(TrainConfig, load_preset(ROOT / "configs" / "imagenet256.toml", "train"))
    assert {k: getattr(cfg, k) for k in REPA_TRAIN} == REPA_TRAIN
    enc = load_preset(ROOT / "configs" / "imagenet256.toml", "encode")
    assert (enc["vae"], enc["dino"], enc["dino_pos_embed"], enc["jpeg_draft"], enc["resolution"]) == \
        ("stabilityai/sd-vae-ft-mse", "facebook/dinov2-base", "antialias-once", False, 256)


SEED_TRAIN = dict(model="repa-rf-w512", head_dim=32, batch_size=512, batch_multiplicity=4, lr=1e-4, steps=5000,
                  val_every=1000, repa_lambda=0.5, align_layer=7, time_sampling="logit-normal",
                  param_groups="repa-rf-mup", weight_decay=1e-3, adam_betas=(0.9, 0.95), lr_schedule="repa-rf-cosine",
                  grad_clip=0.0, ema_decay=0.0, cond_dropout=0.0, text_mask=False, mixed_precision="bf16",
                  val_fraction=0.0)


def test_the_seed_presets_are_the_seeds_command_and_sweep():
    cfg = build(TrainConfig, load_preset(ROOT / "configs" / "repa-rf.toml", "train"))
    assert {k: getattr(cfg, k) for k in SEED_TRAIN} == SEED_TRAIN
    enc = load_preset(ROOT / "configs" / "repa-rf.toml", "encode")
    assert (enc["max_text_tokens"], enc["text_attention"], enc["dino"], enc["dino_pos_embed"]) == \
        (512, "unmasked", "facebook/dinov2-giant", "bicubic-per-call")
    runs = expand_grid(load_sweep(ROOT / "configs" / "repa-rf-sweep.toml"))
    grid = {(r.train["model"], r.train["lr"], r.train["repa_lambda"]) for r in runs}
    assert len(runs) == 24 and grid == {(f"repa-rf-w{w}", 2.0**e, lam) for w in (512, 1024, 2048)
                                        for e in (-8, -6, -4, -2) for lam in (0.0, 1.0)}
    assert {r.train["cache"] for r in runs} == {"cache/repa-rf"}  # one cache for the whole ablation
    assert all(build(TrainConfig, r.train).steps == 5000 for r in runs)


def test_a_run_records_every_setting_that_defines_it(train_cache, tmp_path):
    from stages.train.loop import run_train

    from .test_train import tiny_train

    run_train(tiny_train(train_cache, tmp_path / "run", steps=2, val_every=2, param_groups="repa-rf-mup",
                         lr_schedule="repa-rf-cosine", adam_betas=(0.9, 0.95)), log=lambda m: None)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["config"]["param_groups"] == "repa-rf-mup" and config["config"]["adam_betas"] == [0.9, 0.95]
    assert config["model_config"]["arch"] == "sit" and config["model_config"]["text_mask"] is True
    table = (tmp_path / "run" / "param_groups.tsv").read_text().splitlines()
    assert table[0] == "name\tshape\tlr\tweight_decay" and len(table) > 10
    rebuilt = asdict(ModelConfig(**config["model_config"]))  # the recorded shape rebuilds the same model
    assert json.loads(json.dumps(rebuilt)) == config["model_config"]
