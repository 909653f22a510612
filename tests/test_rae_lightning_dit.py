"""LightningDiT as a model of its own, against the transcription of bytetriper/RAE@a4d18c4
src/stage2/models/lightningDiT.py in tests/rae_reference.py."""

from __future__ import annotations

import pytest
import torch

from stages.core.model.ddt_config import LightningDiTConfig
from stages.core.model.lightning_dit_model import LightningDiT
from tests import rae_reference as ref

TINY = dict(input_size=8, in_channels=3, hidden_size=32, depth=2, num_heads=2, num_classes=5)


def _pair(seed=0, **overrides):
    kw = {**TINY, **overrides}
    torch.manual_seed(seed)
    theirs = ref.LightningDiT(**kw)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if not name.endswith(("pos_embed", "t_embedder.W")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    ours = LightningDiT(LightningDiTConfig(**kw))
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return theirs.eval(), ours.eval()


@pytest.mark.parametrize("overrides", [{"patch_size": 1}, {"patch_size": 2}, {"patch_size": 2, "use_rope": False},
                                       {"patch_size": 2, "use_swiglu": False, "use_rmsnorm": False}])
def test_forward_matches_rae_on_the_same_weights(overrides):
    theirs, ours = _pair(**overrides)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 3, 8, 8, generator=g)
    t = torch.rand(3, generator=g)
    y = torch.tensor([0, 4, 5])  # the last is the null class
    with torch.no_grad():
        torch.testing.assert_close(ours.velocity(x, t, y), theirs(x, t, y), rtol=1e-5, atol=1e-5)


def test_xl_has_raes_names_shapes_and_count():
    kw = dict(input_size=16, in_channels=768, hidden_size=1152, depth=28, num_heads=16)
    with torch.device("meta"):
        theirs = ref.LightningDiT(**kw)
        ours = LightningDiT(LightningDiTConfig(**kw))
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters() if p.requires_grad)


def test_fresh_model_predicts_zero_as_rae():
    torch.manual_seed(0)
    model = LightningDiT(LightningDiTConfig(**TINY)).eval()
    with torch.no_grad():
        out = model.velocity(torch.randn(2, 3, 8, 8), torch.rand(2), torch.tensor([1, 5]))
    assert out.shape == (2, 3, 8, 8) and bool((out == 0).all())


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="must divide"):
        LightningDiTConfig(input_size=8, patch_size=3)
