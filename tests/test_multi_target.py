"""Training against several alignment targets: one projector each, REPA's loss averaged over them."""

from __future__ import annotations

import shutil

import pytest
import torch

from stages.core.diffusion.objective import loss_terms
from stages.core.errors import UsageError
from stages.core.files.checkpoint import latest_checkpoint
from stages.core.model.model_config import ModelConfig
from stages.core.model.sit import SiT
from stages.encode.run import run_encode
from stages.train.loop import run_train
from stages.train.report import compare_runs, format_table

from .encode_helpers import tiny_config
from .test_train import tiny_train


def _sit(dims: tuple[int, ...], **kw) -> SiT:
    torch.manual_seed(0)
    return SiT(ModelConfig(**{**dict(width=32, depth=3, head_dim=16, patch_size=2, in_channels=4, input_size=8,
                                     cond="none", repa_dims=dims, align_layer=2, projector_dim=16), **kw}))


def test_two_target_loss_is_the_mean_of_the_single_target_losses_on_the_same_tensors():
    two = _sit((24, 40))
    singles = []
    for k, dim in enumerate((24, 40)):
        one = _sit((dim,))
        state = {n: p for n, p in two.state_dict().items() if not n.startswith("projectors.")}
        state.update({n.replace(f"projectors.{k}.", "projectors.0.", 1): p for n, p in two.state_dict().items()
                      if n.startswith(f"projectors.{k}.")})
        one.load_state_dict(state)
        singles.append(one)
    g = torch.Generator().manual_seed(1)
    x, noise, t = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g), torch.rand(3, generator=g)
    targets = [torch.randn(3, 16, 24, generator=g), torch.randn(3, 16, 40, generator=g)]
    both = loss_terms(two, x, noise, t, {}, targets)
    each = [loss_terms(m, x, noise, t, {}, [tgt]) for m, tgt in zip(singles, targets, strict=True)]
    torch.testing.assert_close(both.repa, (each[0].repa + each[1].repa) / 2)
    torch.testing.assert_close(both.denoise, each[0].denoise)
    torch.testing.assert_close(both.total(0.5), each[0].denoise.mean() + 0.5 * (each[0].repa + each[1].repa).mean() / 2)
    weighted = both.total(0.5, [0.2, 1.0])
    torch.testing.assert_close(weighted, each[0].denoise.mean() + (0.2 * each[0].repa.mean() + each[1].repa.mean()) / 2)
    assert both.repa.shape == (3,) and not torch.allclose(each[0].repa, each[1].repa)


def test_each_projector_reads_the_block_given_for_its_target():
    model = _sit((24, 40), align_layers=(1, 3))
    outputs = []
    for block in model.blocks:
        block.register_forward_hook(lambda mod, args, out: outputs.append(out))
    g = torch.Generator().manual_seed(2)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.rand(2, generator=g)
    _, projected = model(x, t)
    torch.testing.assert_close(projected[0], model.projectors[0](outputs[0]))
    torch.testing.assert_close(projected[1], model.projectors[1](outputs[2]))
    # the first target's REPA gradient stops at its block: nothing after block 1 receives any
    projected[0].sum().backward()
    assert all(p.grad is None or not p.grad.any() for p in model.blocks[1].parameters())
    assert any(p.grad is not None and p.grad.any() for p in model.blocks[0].parameters())
    with pytest.raises(ValueError, match="one block per alignment target"):
        _sit((24, 40), align_layers=(1,))


@pytest.fixture(scope="module")
def two_target_cache(train_cache, tiny_models, tmp_path_factory):
    cache = tmp_path_factory.mktemp("two-targets") / "cache"
    shutil.copytree(train_cache, cache)
    cfg = tiny_config(tiny_models, "", cache, add_target="siglip", target_model=str(tiny_models["siglip"]))
    run_encode(cfg)
    return cache


def test_two_target_training_runs_with_one_projector_per_target(two_target_cache, tmp_path):
    cfg = tiny_train(two_target_cache, tmp_path / "run", targets="dino,siglip", align_layers="1,2", steps=3,
                     val_every=3, ckpt_every=3)
    result = run_train(cfg)
    assert result.steps == 3 and "repa_cos" in result.final_val
    ckpt = torch.load(latest_checkpoint(tmp_path / "run"), weights_only=True)
    assert tuple(ckpt["model_config"]["repa_dims"]) == (32, 32)
    assert tuple(ckpt["model_config"]["align_layers"]) == (1, 2)
    assert {k.split(".")[1] for k in ckpt["model"] if k.startswith("projectors.")} == {"0", "1"}
    reports, _ = compare_runs([tmp_path / "run"])
    assert reports[0].targets == "dino,siglip" and "dino,siglip" in format_table(reports, [])


def test_unknown_targets_and_mismatched_weights_are_refused(two_target_cache, tmp_path):
    with pytest.raises(UsageError, match="has no target 'clip-l'; it has dino, siglip"):
        run_train(tiny_train(two_target_cache, tmp_path / "a", targets="dino,clip-l"))
    with pytest.raises(UsageError, match="one non-negative weight per target"):
        run_train(tiny_train(two_target_cache, tmp_path / "b", targets="dino,siglip", target_lambdas="0.5"))
    with pytest.raises(UsageError, match="--align-layers 1: one block per target"):
        run_train(tiny_train(two_target_cache, tmp_path / "c", targets="dino,siglip", align_layers="1"))


def test_the_target_sweep_trains_each_target_and_a_pair():
    from pathlib import Path

    from pipeline.sweep import expand_grid, load_sweep

    runs = expand_grid(load_sweep(Path(__file__).resolve().parent.parent / "configs" / "sweep-targets.toml"))
    assert [r.varied["targets"] for r in runs] == ["dino", "dino-reg", "siglip", "dino,siglip"]


def test_checkpoints_written_before_per_target_blocks_still_resume():
    from dataclasses import asdict

    from stages.train.setup import _saved_model_config

    config = ModelConfig(width=32, depth=3, head_dim=16, repa_dims=(24,), align_layer=2, projector_dim=16)
    old = {k: v for k, v in asdict(config).items() if k != "align_layers"}  # as saved before the field existed
    assert _saved_model_config(old) == asdict(config)
    assert _saved_model_config({**old, "align_layer": 3}) != asdict(config)
