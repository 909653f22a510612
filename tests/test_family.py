"""REPA's successors on one cache: REG, iREPA, the dispersive loss and HASTE's early stop, each compared with a
transcription of its official code (tests/reference_family.py, repositories and lines cited there) on identical
weights and draws."""

from __future__ import annotations

import pytest
import torch

from stages.core.diffusion.family import ConvProjector, FamilySettings, dispersive_loss, spatial_zscore
from stages.core.diffusion.objective import batch_loss_terms
from stages.core.model.model_config import ModelConfig
from stages.core.model.network import build_model

from . import reference_family as ref
from .test_recipes import randomise

REG_TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, decoder_hidden_size=64, encoder_depth=2,
                depth=3, num_heads=4, num_classes=10, z_dims=[16], projector_dim=32)


def reg_config(**kw) -> ModelConfig:
    return ModelConfig(**{**dict(width=64, depth=3, num_heads=4, input_size=8, num_classes=10, repa_dims=(16,),
                                 align_layer=2, projector_dim=32, class_token_dim=16), **kw})


# -- iREPA ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("alpha", [1.0, 0.6, 0.0])
def test_spatial_zscore_is_irepas(alpha):
    g = torch.Generator().manual_seed(0)
    feat = torch.randn(3, 16, 8, generator=g) * 3 + torch.randn(3, 1, 8, generator=g)
    torch.testing.assert_close(spatial_zscore(feat, alpha), ref.irepa_spatial_zscore(feat, alpha), atol=1e-6, rtol=1e-6)
    # float16 as the cache stores them: computed in float32
    assert spatial_zscore(feat.half(), alpha).dtype == torch.float32


@pytest.mark.parametrize("kernel", [1, 3])
def test_conv_projector_is_irepas(kernel):
    torch.manual_seed(0)
    theirs = ref.IrepaConvProjection(12, 7, kernel)
    ours = ConvProjector(12, 7, kernel)
    ours.load_state_dict(theirs.state_dict())  # same names: projection_layer.weight / .bias
    x = torch.randn(2, 16, 12)
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-6, rtol=1e-6)


def test_conv_projector_treats_a_leading_token_as_a_lone_pixel():
    torch.manual_seed(1)
    proj = ConvProjector(12, 7, 3)
    x = torch.randn(2, 17, 12)
    out = proj(x, leading=1)
    lone = proj.projection_layer(x[:, 0, :, None, None])[:, :, 0, 0]  # a 1x1 image in zero padding
    torch.testing.assert_close(out[:, 0], lone, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out[:, 1:], proj(x[:, 1:]), atol=1e-6, rtol=1e-6)


def test_conv_projector_refuses_a_non_square_grid():
    with pytest.raises(ValueError, match="square"):
        ConvProjector(12, 7, 1)(torch.randn(1, 15, 12))


def test_model_with_conv_projector_projects_as_irepa():
    torch.manual_seed(2)
    model = build_model(ModelConfig(width=32, depth=2, num_heads=2, input_size=8, num_classes=10, repa_dims=(16,),
                                    align_layer=1, projector_type="conv", projector_kernel=3))
    assert [k for k in model.state_dict() if k.startswith("projectors.")] == \
        ["projectors.0.projection_layer.weight", "projectors.0.projection_layer.bias"]
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2])
    tokens = model.x_embedder(x) + model.pos_embed
    c = model.t_embedder(t) + model.y_embedder(y)
    hidden = model.blocks[0](tokens, c)
    theirs = ref.IrepaConvProjection(32, 16, 3)
    theirs.load_state_dict(model.projectors[0].state_dict())
    torch.testing.assert_close(model(x, t, y)[1][0], theirs(hidden), atol=1e-5, rtol=1e-5)


# -- dispersive loss ---------------------------------------------------------------------------------------
def test_dispersive_loss_is_the_official_pytorch_one():
    g = torch.Generator().manual_seed(3)
    z = torch.randn(6, 5, 4, generator=g)
    torch.testing.assert_close(dispersive_loss(z, 1.0), ref.disp_loss(z), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(dispersive_loss(z, 0.5), ref.disp_loss_tau(z, 0.5), atol=1e-6, rtol=1e-6)
    # identical states: every distance 0, the loss its maximum log 1 = 0; spread states: negative
    assert dispersive_loss(z[:1].expand(6, 5, 4)).abs() < 1e-6 and dispersive_loss(z) < 0


def test_dispersive_loss_has_the_gradient_of_the_official_one():
    z = torch.randn(4, 3, 8, generator=torch.Generator().manual_seed(4))
    ours, theirs = z.clone().requires_grad_(), z.clone().requires_grad_()
    dispersive_loss(ours).backward()
    ref.disp_loss(theirs).backward()
    torch.testing.assert_close(ours.grad, theirs.grad, atol=1e-6, rtol=1e-5)


def test_the_dispersive_term_reads_the_last_blocks_output():
    torch.manual_seed(5)
    model = build_model(ModelConfig(width=32, depth=3, num_heads=2, input_size=8, num_classes=10, hidden_layer=3))
    randomise(model, 5)
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2])
    tokens = model.x_embedder(x) + model.pos_embed
    c = model.t_embedder(t) + model.y_embedder(y)
    for block in model.blocks:  # act[-1] of the official SiT: the output of the last block
        tokens = block(tokens, c)
    velocity, projected, extra = model(x, t, y)
    torch.testing.assert_close(extra["hidden"], tokens, atol=1e-6, rtol=1e-6)
    assert projected == [] and extra["cls"] is None


# -- REG ---------------------------------------------------------------------------------------------------
def test_reg_model_has_regs_state_dict():
    with torch.device("meta"):
        theirs = ref.RegSiT(**dict(REG_TINY, input_size=32, hidden_size=1152, decoder_hidden_size=1152, depth=28,
                                   num_heads=16, num_classes=1000, z_dims=[768], projector_dim=2048, encoder_depth=8))
        ours = build_model(ModelConfig.from_preset("SiT-XL/2", repa_dims=(768,), num_classes=1000,
                                                   class_token_dim=768))
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in theirs.state_dict().items()}


def test_reg_position_rows_and_init_are_regs():
    torch.manual_seed(6)
    ours = build_model(reg_config())
    theirs = ref.RegSiT(**REG_TINY)
    torch.testing.assert_close(ours.pos_embed, theirs.pos_embed.data, atol=1e-7, rtol=0)
    assert not ours.pos_embed[0, 0].any()
    assert not ours.final_layer.linear_cls.weight.any() and not ours.final_layer.linear_cls.bias.any()
    assert torch.equal(ours.wg_norm.weight, torch.ones(64)) and ours.wg_norm.weight.requires_grad


def test_reg_forward_is_regs():
    torch.manual_seed(7)
    theirs = randomise(ref.RegSiT(**REG_TINY), 7).eval()
    ours = build_model(reg_config()).eval()
    ours.load_state_dict(theirs.state_dict())
    g = torch.Generator().manual_seed(8)
    x, t, y, cls = torch.randn(3, 4, 8, 8, generator=g), torch.rand(3, generator=g), torch.tensor([1, 5, 7]), \
        torch.randn(3, 16, generator=g)
    with torch.no_grad():
        v_theirs, zs_theirs, cls_theirs = theirs(x, t, y, cls_token=cls)
        v_ours, zs_ours, extra = ours(x, t, y, cls_token=cls)
    torch.testing.assert_close(v_ours, v_theirs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(zs_ours[0], zs_theirs[0], atol=1e-5, rtol=1e-5)  # [class token, patches]
    assert zs_ours[0].shape == (3, 17, 16)
    torch.testing.assert_close(extra["cls"], cls_theirs, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="cls_token"):
        ours(x, t, y)


def test_reg_loss_is_regs():
    torch.manual_seed(9)
    theirs = randomise(ref.RegSiT(**REG_TINY), 9).eval()
    ours = build_model(reg_config()).eval()
    ours.load_state_dict(theirs.state_dict())
    g = torch.Generator().manual_seed(10)
    x, y = torch.randn(4, 4, 8, 8, generator=g), torch.tensor([0, 3, 6, 9])
    patches, cls_tokens = torch.randn(4, 16, 16, generator=g), torch.randn(4, 2, 16, generator=g)  # cls + register
    t, noise = torch.rand(4, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    cls_noise = torch.randn(4, 16, generator=g)
    zs = [torch.cat([cls_tokens[:, 0].unsqueeze(1), patches], dim=1)]  # train.py: [x_norm_clstoken, patch tokens]
    want = ref.reg_loss(theirs, x, y, zs, cls_tokens[:, 0], t, noise, cls_noise, proj_coeff=0.5, cls_coeff=0.03)
    batch = {"dino": patches, "dino_cls": cls_tokens}
    terms = batch_loss_terms(ours, batch, x, noise, t, {"y": y}, ["dino"], FamilySettings(class_token_weight=0.03),
                             cls_noise=cls_noise)
    torch.testing.assert_close(terms.total(0.5), want, atol=1e-5, rtol=1e-5)


# -- HASTE ---------------------------------------------------------------------------------------------------
def test_without_alignment_the_loss_is_the_denoising_loss_with_its_gradient():
    torch.manual_seed(11)
    model = randomise(build_model(ModelConfig(width=32, depth=2, num_heads=2, input_size=8, num_classes=10,
                                              repa_dims=(16,), align_layer=1, projector_dim=32)), 11)
    g = torch.Generator().manual_seed(12)
    x, t, noise, y = torch.randn(2, 4, 8, 8, generator=g), torch.rand(2, generator=g), \
        torch.randn(2, 4, 8, 8, generator=g), torch.tensor([1, 2])
    batch = {"dino": torch.randn(2, 16, 16, generator=g)}
    stopped = batch_loss_terms(model, batch, x, noise, t, {"y": y}, ["dino"], FamilySettings(align=False))
    aligned = batch_loss_terms(model, batch, x, noise, t, {"y": y}, ["dino"], FamilySettings())
    assert stopped.repa is not None  # still measured, for the curves
    torch.testing.assert_close(stopped.total(0.5), stopped.denoise.mean())
    assert not torch.allclose(aligned.total(0.5), aligned.denoise.mean())
    stopped.total(0.5).backward(retain_graph=True)
    grads = [p.grad.clone() for p in model.blocks.parameters()]
    model.zero_grad()
    stopped.denoise.mean().backward()
    for got, want in zip(grads, (p.grad for p in model.blocks.parameters()), strict=True):
        torch.testing.assert_close(got, want)
