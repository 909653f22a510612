"""`repa train --method`: each of REPA's successors is an option set over the same cache, expanded to its published
settings, overridable option by option, refused in one line when the cache lacks what it reads."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from stages.core.errors import UsageError
from stages.core.options import check
from stages.train.config import TrainConfig, resume_differences
from stages.train.loop import run_train
from stages.train.methods import METHODS, NEUTRAL

from . import reference_family as ref
from .test_train import tiny_train


@pytest.fixture(scope="module")
def cls_cache(tmp_path_factory, tiny_models, labelled_shards) -> Path:
    """48 labelled samples at 64 px with DINOv2's class token stored (`repa encode --class-tokens`)."""
    from stages.encode.config import EncodeConfig
    from stages.encode.run import run_encode

    cache = tmp_path_factory.mktemp("cls-cache") / "cache"
    run_encode(EncodeConfig(source=str(labelled_shards[0]), cache=cache, resolution=64, vae=str(tiny_models["vae"]),
                            dino=str(tiny_models["dino"]), batch_size=16, num_workers=0, class_tokens=True))
    return cache


def cfg_of(**kw) -> TrainConfig:
    return TrainConfig(cache=Path("c"), run_dir=Path("r"), **kw)


# -- expansion ---------------------------------------------------------------------------------------------
def test_each_method_expands_to_its_published_settings():
    assert cfg_of().method == "repa" and cfg_of().repa_lambda == 0.5 and cfg_of().projector == "mlp"
    sit = cfg_of(method="sit")
    assert sit.repa_lambda == 0 and sit.dispersive_lambda == 0 and sit.class_token_weight == 0
    reg = cfg_of(method="reg")  # Martinser/REG train.sh: --proj-coeff 0.5 --cls 0.03
    assert (reg.repa_lambda, reg.class_token_weight) == (0.5, 0.03)
    irepa = cfg_of(method="irepa")  # ldm/configs/irepa.yaml over ldm/train.py's defaults
    assert (irepa.repa_lambda, irepa.projector, irepa.projector_kernel, irepa.target_norm, irepa.zscore_alpha) == \
        (1.0, "conv", 1, "zscore", 0.6)
    disp = cfg_of(method="dispersive")  # the PyTorch code: 0.25 * disp_loss(act[-1]), SiT without REPA
    assert (disp.repa_lambda, disp.dispersive_lambda, disp.dispersive_tau, disp.dispersive_layer) == (0, 0.25, 1.0, 28)
    assert cfg_of(method="dispersive", model=None, width=64, depth=5).dispersive_layer == 5
    haste = cfg_of(method="haste")  # HASTE scripts/run.sh: --early-stop-point 250000
    assert (haste.repa_lambda, haste.align_stop) == (0.5, 250_000)
    for name in METHODS:  # every setting a method implies is concrete in config.json
        assert all(cfg_of(method=name).to_json()[k] is not None for k in NEUTRAL)


def test_options_given_override_the_method_and_methods_compose():
    assert cfg_of(method="irepa", repa_lambda=0.5, projector_kernel=3).to_json() == \
        {**cfg_of(method="irepa").to_json(), "repa_lambda": 0.5, "projector_kernel": 3}
    both = cfg_of(method="reg+irepa")
    assert (both.class_token_weight, both.projector, both.target_norm, both.repa_lambda) == \
        (0.03, "conv", "zscore", 1.0)
    both = cfg_of(method="repa+dispersive")
    assert (both.repa_lambda, both.dispersive_lambda) == (0.5, 0.25)


@pytest.mark.parametrize("method, message", [("regg", "unknown method 'regg'"), ("sit+reg", "without alignment"),
                                             ("reg+reg", "once")])
def test_a_bad_method_is_refused_in_one_line(method, message):
    with pytest.raises(UsageError, match=message):
        check(cfg_of(method=method))


def test_haste_stops_aligning_after_its_step():
    cfg = cfg_of(method="haste", align_stop=5)
    for step in range(1, 10):  # our step s is the update made after s - 1 completed steps
        assert cfg.family(step).align == ref.haste_aligns(step - 1, 5)
    assert cfg.family().align and all(cfg_of(method="repa").family(s).align for s in (1, 10**7))


def test_runs_made_before_methods_resume_as_repa():
    old = {k: v for k, v in cfg_of().to_json().items() if k not in ("method", *NEUTRAL) or k == "repa_lambda"}
    assert resume_differences(old, cfg_of().to_json()) == []
    assert resume_differences(old, cfg_of(method="reg").to_json())


# -- the cache must hold what a method reads --------------------------------------------------------------
def test_reg_without_class_tokens_is_refused_naming_the_encode_option(train_cache, tmp_path):
    r = CliRunner().invoke(app, ["train", "--cache", str(train_cache), "--run-dir", str(tmp_path / "run"),
                                 "--method", "reg", "--model", "none", "--width", "32", "--depth", "2",
                                 "--head-dim", "16", "--align-layer", "1", "--steps", "1", "--report-to", "none"])
    assert r.exit_code != 0
    lines = [line for line in r.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "--class-tokens" in lines[0] and "class token" in lines[0], r.output
    assert "Traceback" not in r.output


def test_conv_projector_on_a_non_square_grid_is_refused(monkeypatch, cls_cache, tmp_path):
    from cache_schema import read_manifest
    from stages.train import methods

    manifest = read_manifest(cls_cache)
    dino = dict(manifest.dino, grid=[2, 8])
    monkeypatch.setattr(type(manifest), "target", lambda self, name: {**dino, "fields": {}})
    cfg = tiny_train(cls_cache, tmp_path / "run", method="irepa")
    with pytest.raises(UsageError, match="square.*--target-input-size"):
        methods.family_model_fields(cfg, manifest, repa=True)


# -- training -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["reg", "irepa", "dispersive", "reg+irepa"])
def test_each_method_trains_and_records_its_settings(cls_cache, tmp_path, method):
    cfg = tiny_train(cls_cache, tmp_path / "run", method=method, steps=2, val_every=2, ckpt_every=2, log_every=1,
                     val_fraction=0.2, cond="class")
    if "irepa" in method:
        cfg.projector_kernel = 3
    result = run_train(cfg)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["config"]["method"] == method
    assert saved["config"]["class_token_weight"] == (0.03 if "reg" in method else 0)
    assert saved["model_config"]["class_token_dim"] == (saved["model_config"]["repa_dims"][0] if "reg" in method else 0)
    assert saved["model_config"]["projector_type"] == ("conv" if "irepa" in method else "mlp")
    assert saved["model_config"]["hidden_layer"] == (3 if method == "dispersive" else 0)
    assert math.isfinite(result.final_val["denoise"])


# -- presets: their command, option by option -----------------------------------------------------------------
ROOT = Path(__file__).resolve().parent.parent
COMMON = dict(model="SiT-XL/2", cond="class", num_classes=1000, batch_size=256, lr=1e-4, lr_schedule="constant",
              adam_betas=(0.9, 0.999), weight_decay=0.0, ema_decay=0.9999, cond_dropout=0.1, time_sampling="uniform",
              val_fraction=0.0)
# Martinser/REG @ 021ea2e train.sh: --model SiT-XL/2 --enc-type dinov2-vit-b --proj-coeff 0.5 --encoder-depth 8
# --batch-size 256 --mixed-precision fp16 --cls 0.03; train.py: lr 1e-4, betas (0.9, 0.999), wd 0, max-grad-norm 1,
# cfg-prob 0.1; the released weights: 4M iterations
REG_RUN = dict(COMMON, method="reg", repa_lambda=0.5, align_layer=8, class_token_weight=0.03, projector="mlp",
               projector_dim=2048, grad_clip=1.0, mixed_precision="fp16", steps=4_000_000, target_norm="none")
# End2End-Diffusion/iREPA @ 99ad4ac ldm/configs/irepa.yaml: projection_layer_type conv, proj_coeff "1.0",
# spnorm_method zscore; ldm/train.py defaults: --proj-kwargs-kernel-size 1, --zscore-alpha 0.6, --encoder-depth 8,
# --batch-size 256, --max-train-steps 400000, fp16, lr 1e-4, --max-grad-norm 1.0, --cfg-prob 0.1
IREPA_RUN = dict(COMMON, method="irepa", repa_lambda=1.0, projector="conv", projector_kernel=1, target_norm="zscore",
                 zscore_alpha=0.6, align_layer=8, grad_clip=1.0, mixed_precision="fp16", steps=400_000,
                 class_token_weight=0.0)
# Dispersive loss: willisma/SiT train.py defaults (SiT-XL/2, global batch 256, AdamW lr 1e-4 wd 0, no clipping, fp32,
# EMA 0.9999) + --disp: 0.25 * disp_loss(act[-1]) (tau 1); 80 epochs of ImageNet at batch 256 = 400k steps
DISPERSIVE_RUN = dict(COMMON, method="dispersive", repa_lambda=0.0, dispersive_lambda=0.25, dispersive_tau=1.0,
                      dispersive_layer=28, grad_clip=0.0, mixed_precision="no", steps=400_000)


@pytest.mark.parametrize("preset, want", [("reg-sit-xl", REG_RUN), ("irepa-sit-xl", IREPA_RUN),
                                          ("dispersive-sit-xl", DISPERSIVE_RUN)])
def test_the_method_presets_are_the_official_runs(preset, want):
    from pipeline.config import build, load_preset

    values = load_preset(ROOT / "configs" / f"{preset}.toml", "train")
    cfg = build(TrainConfig, values)
    assert {k: getattr(cfg, k) for k in want} == want
    # the preset says nothing its method would not: the same run from --method alone
    bare = build(TrainConfig, {k: v for k, v in values.items() if k not in NEUTRAL})
    assert {k: getattr(bare, k) for k in want} == want


def test_the_reg_preset_encodes_the_class_token():
    from pipeline.config import load_preset

    enc = load_preset(ROOT / "configs" / "reg-sit-xl.toml", "encode")
    assert enc["class_tokens"] is True and enc["dino"] == "facebook/dinov2-base" and enc["resolution"] == 256
    # eval.sh: --mode sde --num-steps 250 --cfg-scale 2.3 --cls-cfg-scale 2.3 --guidance-high 0.85
    sample = load_preset(ROOT / "configs" / "reg-sit-xl.toml", "sample")
    assert (sample["sampler"], sample["steps"], sample["guidance_scale"], sample["guidance_high"]) == \
        ("sde", 250, 2.3, 0.85)


# End2End-Diffusion/REPA-E @ 3ad8046 README.md:154-176 (stage 2, train_ldm_only.py): --max-train-steps=4000000
# --mixed-precision="fp16" --batch-size=256 --weighting="uniform" --model="SiT-XL/1" --vae="f16d32"
# --learning-rate=1e-4 --enc-type="dinov2-vit-b" --proj-coeff=0.5 --encoder-depth=8; train_ldm_only.py:465-470
# (betas 0.9/0.999, weight decay 0, max-grad-norm 1.0), :481 --cfg-prob 0.1, :76 EMA 0.9999; models/sit.py:187
# projector_dim 2048
REPA_E_RUN = dict(COMMON, model="SiT-XL/1", method="repa", repa_lambda=0.5, align_layer=8, projector_dim=2048,
                  grad_clip=1.0, mixed_precision="fp16", steps=4_000_000)


def test_the_repa_e_preset_is_their_stage_2_run():
    from pipeline.config import build, load_preset
    from stages.core.model.model_config import ModelConfig

    values = load_preset(ROOT / "configs" / "repa-e-sit-xl.toml", "train")
    cfg = build(TrainConfig, values)
    assert {k: getattr(cfg, k) for k in REPA_E_RUN} == REPA_E_RUN
    # f16 latents at 256 px are 16x16; patch 1 gives DINOv2-B's 16x16 grid at 224 px (README.md:109, SiT-XL/1)
    model = ModelConfig.from_preset("SiT-XL/1", in_channels=32, input_size=256 // 16, repa_dims=(768,))
    assert (model.patch_size, model.depth, model.width, model.num_patches) == (1, 28, 1152, (224 // 14) ** 2)
    enc = load_preset(ROOT / "configs" / "repa-e-sit-xl.toml", "encode")
    assert (enc["vae"], enc["dino"], enc["resolution"]) == ("REPA-E/e2e-vavae-hf", "facebook/dinov2-base", 256)
    # README.md:249 (FID 1.26): --cfg-scale=2.5 --guidance-low=0.0 --guidance-high=0.75; generate.py sde, 250 steps
    sample = load_preset(ROOT / "configs" / "repa-e-sit-xl.toml", "sample")
    assert (sample["sampler"], sample["steps"], sample["guidance_scale"], sample["guidance_high"]) == \
        ("sde", 250, 2.5, 0.75)


# -- the methods sweep over one cache ------------------------------------------------------------------------
def test_the_methods_sweep_trains_each_method_and_the_report_lists_them(cls_cache, tmp_path):
    import tomllib

    from pipeline.sweep import MANAGED_KEYS, to_toml

    from .test_sweep import repa

    grid = tomllib.loads((ROOT / "configs" / "sweep-methods.toml").read_text())["sweep"]["grid"]
    assert {"sit", "repa", "reg", "irepa", "dispersive"} <= set(grid["method"])
    out = tmp_path / "sweep"
    # the tiny training of test_train, the options a method sets left to the method as in sweep-methods.toml
    cfg = tiny_train(cls_cache, out, steps=2, val_every=2, ckpt_every=2, val_fraction=0.2, log_every=1)
    base = {k: v for k, v in cfg.to_json().items()
            if v is not None and k not in MANAGED_KEYS and k not in NEUTRAL and k != "method"}
    base["model"] = "none"
    sweep = tmp_path / "sweep.toml"
    sweep.write_text(to_toml(base, "train") + to_toml({"out": str(out)}, "sweep") + to_toml(grid, "sweep.grid"))
    r = repa("sweep", sweep, "--parallel", "2")
    assert r.exit_code == 0, r.output
    data = json.loads(repa("report", out, "--json").stdout)
    assert sorted(d["settings"]["method"] for d in data) == sorted(grid["method"])
    assert all(d["finished"] and math.isfinite(d["final_val"]) for d in data)
    by_method = {d["settings"]["method"]: d for d in data}
    assert by_method["sit"]["targets"] == "none" and by_method["dispersive"]["targets"] == "none"
    assert by_method["reg"]["settings"]["class_token_weight"] == 0.03
    assert by_method["irepa"]["settings"]["projector"] == "conv"
    table = repa("report", out).stdout
    assert "method settings" in table and "reg: repa_lambda 0.5, class_token_weight 0.03" in table


def test_a_reg_run_previews_and_samples_its_class_token_with_the_latents(cls_cache, tmp_path):
    import torch

    from stages.core.diffusion.family import JointState
    from stages.core.model.model_config import ModelConfig
    from stages.core.model.network import build_model

    cfg = tiny_train(cls_cache, tmp_path / "run", method="reg", steps=2, val_every=2, ckpt_every=2, preview_every=2,
                     cond="class", val_fraction=0.2)
    run_train(cfg)
    assert (tmp_path / "run" / "previews" / "step-0000002.pt").exists()
    r = CliRunner().invoke(app, ["sample", "--run-dir", str(tmp_path / "run"), "--out", str(tmp_path / "s"),
                                 "--num-samples", "2", "--steps", "2", "--sampler", "sde", "--guidance-scale", "2"])
    assert r.exit_code == 0, r.output
    assert len(list((tmp_path / "s").glob("0*.png"))) == 2
    # the packed velocity is the model's two velocities
    model = build_model(ModelConfig(width=32, depth=2, num_heads=2, input_size=8, num_classes=4, repa_dims=(16,),
                                    align_layer=1, class_token_dim=16))
    joint = JointState((4, 8, 8), 16)
    x, cls, t, y = torch.randn(2, 4, 8, 8), torch.randn(2, 16), torch.rand(2), torch.tensor([0, 3])
    v, _, extra = model(x, t, y, cls_token=cls)
    got_v, got_cls = joint.unpack(joint.velocity(model, joint.pack(x, cls), t, {"y": y}))
    assert torch.equal(got_v, v) and torch.equal(got_cls, extra["cls"])


# -- released checkpoints: REG's and iREPA's SiT import ------------------------------------------------------
TINY_SIT = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, decoder_hidden_size=64, encoder_depth=2,
                depth=3, num_heads=4, num_classes=10, z_dims=[16], projector_dim=32)


def import_and_load(ckpt: Path, cache: Path, run: Path):
    import torch

    from stages.core.model.model_config import ModelConfig
    from stages.core.model.network import build_model

    r = CliRunner().invoke(app, ["import-checkpoint", str(ckpt), "--run-dir", str(run), "--cache", str(cache),
                                 "--num-heads", "4"])
    assert r.exit_code == 0, r.output
    imported = torch.load(next((run / "checkpoints").glob("*.pt")), weights_only=True)
    ours = build_model(ModelConfig(**imported["model_config"]))
    ours.load_state_dict(imported["ema"])
    return ours.eval(), imported


def test_a_reg_checkpoint_imports_and_gives_regs_outputs(train_cache, tmp_path):
    import argparse

    import torch

    from .test_recipes import randomise

    torch.manual_seed(0)
    ema = randomise(ref.RegSiT(**TINY_SIT), 1).eval()
    ckpt = tmp_path / "0000005.pt"
    torch.save({"model": ema.state_dict(), "ema": ema.state_dict(), "opt": {}, "steps": 5,  # REG's train.py L341-347
                "args": argparse.Namespace(model="SiT-T/2", encoder_depth=2, cls=0.03, proj_coeff=0.5)}, ckpt)
    ours, imported = import_and_load(ckpt, train_cache, tmp_path / "run")
    assert imported["model_config"]["class_token_dim"] == 16 and imported["config"]["method"] == "reg"
    g = torch.Generator().manual_seed(2)
    x, t, y, cls = torch.randn(3, 4, 8, 8, generator=g), torch.rand(3, generator=g), torch.tensor([1, 4, 10]), \
        torch.randn(3, 16, generator=g)
    with torch.no_grad():
        v_theirs, zs_theirs, c_theirs = ema(x, t, y, cls_token=cls)
        v_ours, zs_ours, extra = ours(x, t, y, cls_token=cls)
    torch.testing.assert_close(v_ours, v_theirs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(zs_ours[0], zs_theirs[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(extra["cls"], c_theirs, atol=1e-5, rtol=1e-5)
    r = CliRunner().invoke(app, ["sample", "--run-dir", str(tmp_path / "run"), "--classes", "1,4", "--num-samples",
                                 "2", "--steps", "2", "--out", str(tmp_path / "s")])
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("kind, kernel", [("conv", 1), ("conv", 3), ("mlp", 1)])
def test_an_irepa_checkpoint_imports_and_gives_irepas_outputs(train_cache, tmp_path, kind, kernel):
    import argparse

    import torch

    from .test_recipes import randomise

    torch.manual_seed(0)
    ema = randomise(ref.irepa_sit(kind, kernel, **TINY_SIT), 3).eval()
    ckpt = tmp_path / "0000004.pt"
    torch.save({"model": ema.state_dict(), "ema": ema.state_dict(), "opt": {}, "steps": 4,
                "args": argparse.Namespace(model="SiT-T/2", encoder_depth=2, projection_layer_type=kind,
                                           proj_kwargs_kernel_size=kernel)}, ckpt)
    ours, imported = import_and_load(ckpt, train_cache, tmp_path / "run")
    assert imported["model_config"]["projector_type"] == kind
    assert imported["model_config"]["projector_kernel"] == (kernel if kind == "conv" else 1)
    g = torch.Generator().manual_seed(4)
    x, t, y = torch.randn(3, 4, 8, 8, generator=g), torch.rand(3, generator=g), torch.tensor([1, 4, 10])
    with torch.no_grad():
        (v_theirs, zs_theirs), (v_ours, zs_ours) = ref.irepa_forward(ema, x, t, y), ours(x, t, y)
    torch.testing.assert_close(v_ours, v_theirs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(zs_ours[0], zs_theirs[0], atol=1e-5, rtol=1e-5)


def test_training_applies_the_alignment_only_up_to_the_stop_step(monkeypatch, cls_cache, tmp_path):
    from stages.train import loop

    seen = []
    real = loop.batch_loss_terms

    def spy(*args, **kwargs):
        seen.append(args[7].align)  # family, as micro_step passes it
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "batch_loss_terms", spy)
    run_train(tiny_train(cls_cache, tmp_path / "run", method="haste", align_stop=2, steps=4, val_fraction=0.0,
                         cond="class"))
    assert seen == [ref.haste_aligns(s - 1, 2) for s in range(1, 5)] == [True, True, False, False]
