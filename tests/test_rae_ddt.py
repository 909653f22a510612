"""DiT-DH and its LightningDiT blocks against the transcription in tests/rae_reference.py
(bytetriper/RAE@a4d18c4 src/stage2/models/DDT.py, model_utils.py)."""

from __future__ import annotations

import pytest
import torch

from stages.core.errors import UsageError
from stages.core.model.ddt import DiTwDDTHead, count_ddt_parameters
from stages.core.model.ddt_config import DDT_PRESETS, DDTConfig
from stages.core.model.lightning_dit import VisionRotaryEmbeddingFast
from tests import rae_reference as ref

TINY = dict(input_size=4, in_channels=6, hidden_size=(32, 48), depth=(2, 2), num_heads=(2, 4), num_classes=5)


def _reference(**kw):
    return ref.DiTwDDTHead(patch_size=1, **kw)


def _randomised(model, seed):
    """Every weight drawn at random (the zero-initialised adaLN and output layers would hide the blocks)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("pos_embed", "t_embedder.W")):
                continue  # fixed tables, compared as built
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def _pair(seed=0, **overrides):
    kw = {**TINY, **overrides}
    torch.manual_seed(seed)
    theirs = _randomised(_reference(**kw), seed + 1)
    ours = DiTwDDTHead(DDTConfig(**kw))
    ours.load_state_dict(theirs.state_dict(), strict=True)  # RAE's names, every key used
    return theirs.eval(), ours.eval()


def _inputs(seed=2, batch=3, channels=6, side=4, num_classes=5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, side, side, generator=g)
    t = torch.rand(batch, generator=g)
    y = torch.tensor([0, num_classes - 1, num_classes])[:batch]  # the last is the null class
    return x, t, y


def _meta_counts(**kw):
    with torch.device("meta"):
        theirs = _reference(**kw)
        ours = DiTwDDTHead(DDTConfig(**kw))
    return theirs, ours


def test_xl_parameter_count_is_raes():
    theirs, ours = _meta_counts(input_size=16, in_channels=768, **DDT_PRESETS["DiTDH-XL"])
    rae_all = sum(p.numel() for p in theirs.parameters())
    rae_trainable = sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    assert count_ddt_parameters(ours) == rae_all
    assert count_ddt_parameters(ours, frozen=False) == rae_trainable
    assert round(rae_all / 1e6, 1) == 838.7  # the 838.7 M of DESIGN.md section 8, as RAE's model counts it
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}


def test_s_preset_has_raes_names_and_shapes():
    theirs, ours = _meta_counts(input_size=16, in_channels=768, **DDT_PRESETS["DiTDH-S"])
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}


@pytest.mark.parametrize("overrides", [
    {},
    {"use_qknorm": True},
    {"use_swiglu": False},
    {"use_rmsnorm": False},
    {"hidden_size": (32, 32), "num_heads": (2, 2)},  # equal widths: s_projector is the identity
])
def test_forward_matches_rae_on_the_same_weights(overrides):
    theirs, ours = _pair(**overrides)
    x, t, y = _inputs()
    with torch.no_grad():
        expected = theirs(x, t, y)
        got = ours.velocity(x, t, y)
    assert got.shape == x.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_fixed_tables_match_rae():
    theirs, ours = _pair()
    torch.testing.assert_close(ours.pos_embed, theirs.pos_embed.data, rtol=0, atol=1e-7)
    for name in ("enc_feat_rope", "dec_feat_rope"):
        for table in ("freqs_cos", "freqs_sin"):
            torch.testing.assert_close(getattr(getattr(ours, name), table), getattr(getattr(theirs, name), table),
                                       rtol=0, atol=0)
    rope_xl, ref_xl = VisionRotaryEmbeddingFast(1152 // 16 // 2, 16), ref.VisionRotaryEmbeddingFast(36, 16)
    torch.testing.assert_close(rope_xl.freqs_cos, ref_xl.freqs_cos, rtol=0, atol=0)
    q = torch.randn(2, 3, 256, 72, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(rope_xl(q), ref_xl(q), rtol=0, atol=0)


def test_label_dropout_by_the_caller_matches_raes_training_forward():
    """RAE drops labels inside its training forward with the global RNG; the caller's null ids, drawn from the
    same numbers, give the same output."""
    theirs, ours = _pair(seed=3)
    theirs.train()
    ours.train()
    x, t, _ = _inputs(seed=4, batch=3)
    y = torch.tensor([1, 2, 3])
    torch.manual_seed(11)
    with torch.no_grad():
        expected = theirs(x, t, y)
    torch.manual_seed(11)
    drop = torch.rand(3) < 0.1  # model_utils.py:427, the draw RAE's token_drop makes
    with torch.no_grad():
        got = ours.velocity(x, t, torch.where(drop, ours.null_class, y))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_fresh_model_is_initialised_as_rae():
    """Zeroed adaLN and output layers: the untrained model predicts zero velocity, as RAE's does."""
    torch.manual_seed(0)
    model = DiTwDDTHead(DDTConfig(**TINY)).eval()
    x, t, y = _inputs()
    with torch.no_grad():
        assert bool((model.velocity(x, t, y) == 0).all())
    assert not any(n.endswith(("pos_embed", "W")) for n, _ in model.named_parameters())


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="patch size 1"):
        DDTConfig(patch_size=2)
    with pytest.raises(ValueError, match="multiple of 4"):
        DDTConfig(hidden_size=(30, 48), num_heads=(3, 4))
    with pytest.raises(ValueError, match="unknown DiT-DH preset"):
        DDTConfig.from_preset("DiTDH-Q")
    with pytest.raises(ValueError, match="no null class"):
        _ = DiTwDDTHead(DDTConfig(**{**TINY, "class_dropout_prob": 0.0})).null_class


def test_released_checkpoints_load(tmp_path):
    """The bare state dict, and a training checkpoint as src/train.py:62-69 writes it, whose EMA is taken
    (src/utils/model_utils.py:24-25); both with RAE's strict loading."""
    from stages.core.model.ddt import load_ddt

    theirs, _ = _pair(seed=5)
    x, t, y = _inputs()
    with torch.no_grad():
        expected = theirs(x, t, y)
    bare = tmp_path / "stage2_model.pt"
    torch.save(theirs.state_dict(), bare)
    opt = torch.optim.AdamW(theirs.parameters(), lr=2e-4)
    ckpt = tmp_path / "ep-0000010.pt"
    torch.save({"step": 10, "epoch": 1, "model": {k: torch.zeros_like(v) for k, v in theirs.state_dict().items()},
                "ema": theirs.state_dict(), "optimizer": opt.state_dict(), "scheduler": None}, ckpt)
    for path in (bare, ckpt):
        with torch.no_grad():
            got = load_ddt(path, DDTConfig(**TINY)).velocity(x, t, y)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(UsageError) as err:
        load_ddt(bare, DDTConfig(**{**TINY, "depth": (3, 2)}))
    assert "missing blocks.4." in str(err.value) and "unexpected" not in str(err.value) and "\n" not in str(err.value)
