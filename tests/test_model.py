"""Tests for the SiT diffusion transformer (stages/core/model/sit.py) and the REPA loss
(stages/core/diffusion/objective.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from stages.core.diffusion.objective import LossTerms, repa_loss_per_sample
from stages.core.model.model_config import ModelConfig
from stages.core.model.model_presets import MODEL_PRESETS
from stages.core.model.network import count_parameters
from stages.core.model.sit import SiT

BATCH = 3
TEXT_LEN = 5


def repa_loss(projected: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The REPA part of the training loss (lambda 1, denoising part zero), as the loop computes it."""
    per_sample = repa_loss_per_sample(projected, target)
    return LossTerms(torch.zeros_like(per_sample), per_sample).total(1.0)
TEXT_DIM = 12


def tiny_config(**overrides) -> ModelConfig:
    """8x8x4 latents, patch 2 (16 tokens), width 64, 3 blocks, REPA after block 2."""
    fields = dict(
        width=64,
        depth=3,
        head_dim=16,
        patch_size=2,
        in_channels=4,
        input_size=8,
        num_classes=10,
        text_dim=TEXT_DIM,
        repa_dims=(24,),
        align_layer=2,
        projector_dim=32,
    )
    fields.update(overrides)
    return ModelConfig(**fields)


def build(seed: int = 0, randomise: bool = True, **overrides) -> SiT:
    """A tiny model; randomised so adaLN-Zero gates are open and every path reaches the output."""
    torch.manual_seed(seed)
    model = SiT(tiny_config(**overrides))
    if randomise:
        with torch.no_grad():
            for param in model.parameters():
                param.normal_(0.0, 0.1)
    return model


def inputs(config: ModelConfig, seed: int = 1) -> dict:
    """Latents, times and the conditioning that config.cond asks for."""
    generator = torch.Generator().manual_seed(seed)
    size = config.input_size
    kwargs = dict(
        x=torch.randn(BATCH, config.in_channels, size, size, generator=generator),
        t=torch.rand(BATCH, generator=generator),
    )
    if config.cond == "class":
        kwargs["y"] = torch.randint(0, config.num_classes, (BATCH,), generator=generator)
    if config.cond == "text":
        kwargs["text"] = torch.randn(BATCH, TEXT_LEN, config.text_dim, generator=generator)
        kwargs["text_mask"] = torch.tensor(
            [[True, True, True, False, False], [True, False, False, False, False], [True] * TEXT_LEN]
        )
    return kwargs


# ----------------------------------------------------------------------------- presets


@pytest.mark.parametrize("name", sorted(n for n in MODEL_PRESETS if n.startswith("SiT")))
def test_preset_parameter_counts_match_paper(name: str) -> None:
    paper_millions = {"B": 130, "L": 458, "XL": 675}[name.split("-")[1].split("/")[0]]
    with torch.device("meta"):
        model = SiT(ModelConfig.from_preset(name))
    assert abs(count_parameters(model) / 1e6 - paper_millions) <= 0.02 * paper_millions


def test_projector_counted_only_on_request() -> None:
    with torch.device("meta"):
        model = SiT(ModelConfig.from_preset("SiT-XL/2", repa_dims=(768,)))
    hidden, proj = 1152, 2048
    projector = hidden * proj + proj + proj * proj + proj + proj * 768 + 768
    assert count_parameters(model, include_projector=True) - count_parameters(model) == projector
    assert model.config.align_layer == 8 and model.config.num_heads == 16


def test_from_preset_rejects_unknown_name() -> None:
    with pytest.raises(ValueError, match="SiT-XL/2"):
        ModelConfig.from_preset("SiT-H/2")


# ----------------------------------------------------------------------------- forward


@pytest.mark.parametrize("cond", ["class", "text", "none"])
@pytest.mark.parametrize("repa_dims", [(24,), (24, 8), ()])
def test_forward_shapes(cond: str, repa_dims: tuple) -> None:
    model = build(cond=cond, repa_dims=repa_dims)
    kwargs = inputs(model.config)
    velocity, projected = model(**kwargs)
    assert velocity.shape == kwargs["x"].shape
    assert torch.isfinite(velocity).all()
    assert len(projected) == len(model.projectors) == len(repa_dims)
    for tokens, dim in zip(projected, repa_dims, strict=True):
        assert tokens.shape == (BATCH, model.num_patches, dim)
    assert model.num_patches == (8 // 2) ** 2


def test_flux_sized_latents_round_trip_channels() -> None:
    model = build(cond="none", in_channels=16, input_size=4, patch_size=1)
    velocity, _ = model(**inputs(model.config))
    assert velocity.shape == (BATCH, 16, 4, 4)


def test_fresh_model_predicts_zero_and_keeps_positions_fixed() -> None:
    model = build(randomise=False)
    velocity, projected = model(**inputs(model.config))
    assert torch.count_nonzero(velocity) == 0  # adaLN-Zero: zeroed final layer
    assert torch.count_nonzero(projected[0]) > 0
    assert "pos_embed" in dict(model.named_buffers())
    assert "pos_embed" not in dict(model.named_parameters())


def test_unpatchify_inverts_patch_order() -> None:
    """A final layer that copies each patch's pixels must reproduce the input exactly."""
    model = build(cond="none", patch_size=2)
    p, c = 2, 4
    x = torch.randn(BATCH, c, 8, 8)
    patches = x.reshape(BATCH, c, 4, p, 4, p).permute(0, 2, 4, 3, 5, 1).reshape(BATCH, 16, p * p * c)
    assert torch.equal(model.unpatchify(patches), x)


def test_null_class_is_the_last_label_row() -> None:
    model = build(cond="class", num_classes=10)
    assert model.null_class == 10
    assert model.y_embedder.embedding_table.num_embeddings == 11
    kwargs = inputs(model.config)
    kwargs["y"] = torch.full((BATCH,), model.null_class)
    velocity, _ = model(**kwargs)
    assert torch.isfinite(velocity).all()


def test_forward_compiles_as_one_graph() -> None:
    model = build(cond="text")
    kwargs = inputs(model.config)
    eager = model(**kwargs)
    compiled = torch.compile(model, backend="eager", fullgraph=True)(**kwargs)
    torch.testing.assert_close(compiled, eager)


# ----------------------------------------------------------------------------- REPA align layer


@pytest.mark.parametrize("cond", ["class", "text"])
@pytest.mark.parametrize("align_layer", [1, 2, 3])
def test_repa_gradient_reaches_exactly_blocks_up_to_align_layer(cond: str, align_layer: int) -> None:
    model = build(cond=cond, align_layer=align_layer)
    _, (projected,) = model(**inputs(model.config))
    target = torch.randn(projected.shape, generator=torch.Generator().manual_seed(2))
    repa_loss(projected, target).backward()

    for index, block in enumerate(model.blocks, start=1):
        for name, param in block.named_parameters():
            reached = param.grad is not None and torch.count_nonzero(param.grad) > 0
            assert reached == (index <= align_layer), f"block {index} {name}"
    for name, param in model.final_layer.named_parameters():
        assert param.grad is None or torch.count_nonzero(param.grad) == 0, name
    assert all(torch.count_nonzero(p.grad) > 0 for p in model.projectors.parameters())


# ----------------------------------------------------------------------------- captions


def test_padded_caption_tokens_do_not_change_the_output() -> None:
    model = build(cond="text")
    kwargs = inputs(model.config)
    mask = kwargs["text_mask"]
    velocity, projected = model(**kwargs)

    scrambled = kwargs["text"].clone()
    scrambled[~mask] = 100.0 * torch.randn(int((~mask).sum()), TEXT_DIM)
    velocity_scrambled, projected_scrambled = model(**{**kwargs, "text": scrambled})
    assert torch.equal(velocity_scrambled, velocity)
    assert torch.equal(projected_scrambled[0], projected[0])

    # the same edit on a real token must show, or the comparison above proves nothing
    changed = kwargs["text"].clone()
    changed[0, 0] += 1.0
    velocity_changed, _ = model(**{**kwargs, "text": changed})
    assert not torch.allclose(velocity_changed[0], velocity[0])
    torch.testing.assert_close(velocity_changed[1:], velocity[1:])


def test_padding_is_not_attended_to() -> None:
    """A padded caption gives the same output as the same caption cut to its real tokens."""
    model = build(cond="text")
    kwargs = inputs(model.config)
    velocity, _ = model(**kwargs)
    for row, length in enumerate(kwargs["text_mask"].sum(dim=1).tolist()):
        cut = {key: value[row : row + 1] for key, value in kwargs.items()}
        cut["text"] = cut["text"][:, :length]
        cut["text_mask"] = cut["text_mask"][:, :length]
        velocity_cut, _ = model(**cut)
        torch.testing.assert_close(velocity_cut[0], velocity[row])


def test_caption_without_real_tokens_gives_finite_output_independent_of_padding() -> None:
    model = build(cond="text")
    kwargs = inputs(model.config)
    kwargs["text_mask"][1] = False
    velocity, _ = model(**kwargs)
    assert torch.isfinite(velocity).all()

    other = kwargs["text"].clone()
    other[1] = torch.randn(TEXT_LEN, TEXT_DIM)
    velocity_other, _ = model(**{**kwargs, "text": other})
    assert torch.equal(velocity_other[1], velocity[1])

    velocity.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_missing_text_mask_means_all_tokens_are_real() -> None:
    model = build(cond="text")
    kwargs = inputs(model.config)
    kwargs["text_mask"] = torch.ones(BATCH, TEXT_LEN, dtype=torch.bool)
    with_mask, _ = model(**kwargs)
    without_mask, _ = model(**{**kwargs, "text_mask": None})
    assert torch.equal(with_mask, without_mask)


def test_null_caption_works_alone_and_padded_to_the_batch_length() -> None:
    model = build(cond="text")
    kwargs = inputs(model.config)
    tokens, mask = model.null_text(BATCH)
    assert tokens.shape == (BATCH, 1, TEXT_DIM) and mask.all()
    bare, _ = model(**{**kwargs, "text": tokens, "text_mask": mask})
    assert torch.isfinite(bare).all()

    padded_tokens, padded_mask = model.null_text(BATCH, seq_len=TEXT_LEN)
    assert padded_mask.tolist() == [[True] + [False] * (TEXT_LEN - 1)] * BATCH
    padded, _ = model(**{**kwargs, "text": padded_tokens, "text_mask": padded_mask})
    torch.testing.assert_close(padded, bare)

    padded.sum().backward()
    assert torch.count_nonzero(model.caption_embedder.null_token.grad) > 0


def test_null_text_requires_text_conditioning() -> None:
    with pytest.raises(ValueError, match="cond"):
        build(cond="class").null_text(2)


# ----------------------------------------------------------------------------- loss


def test_repa_loss_matches_hand_computed_negative_cosine() -> None:
    projected = torch.tensor([[[1.0, 0.0], [1.0, 1.0]], [[0.0, 2.0], [3.0, 4.0]]])
    target = torch.tensor([[[2.0, 0.0], [1.0, -1.0]], [[1.0, 0.0], [4.0, 3.0]]])
    # sample 0: cos = 1 and 0; sample 1: cos = 0 and 24/25
    expected_per_sample = torch.tensor([-(1.0 + 0.0) / 2, -(0.0 + 24 / 25) / 2])
    torch.testing.assert_close(repa_loss_per_sample(projected, target), expected_per_sample)
    torch.testing.assert_close(repa_loss(projected, target), expected_per_sample.mean())


def test_repa_loss_of_identical_inputs_is_minus_one_in_float32() -> None:
    tokens = torch.randn(2, 7, 5, generator=torch.Generator().manual_seed(3))
    loss = repa_loss(tokens.to(torch.bfloat16), tokens.to(torch.float16))
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, torch.tensor(-1.0), atol=1e-2, rtol=0)
    torch.testing.assert_close(repa_loss(tokens, tokens), torch.tensor(-1.0))
    torch.testing.assert_close(
        repa_loss(tokens, -tokens), -F.cosine_similarity(tokens, -tokens, dim=-1).mean()
    )


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize("align_layer", [0, 4])
def test_invalid_align_layer_is_rejected(align_layer: int) -> None:
    with pytest.raises(ValueError, match="align_layer"):
        tiny_config(depth=3, align_layer=align_layer)


def test_align_layer_is_checked_again_when_the_model_is_built() -> None:
    config = tiny_config(depth=3)
    config.align_layer = 5
    with pytest.raises(ValueError, match="align_layer"):
        SiT(config)


def test_align_layer_is_free_without_repa() -> None:
    assert tiny_config(repa_dims=(), align_layer=99).align_layer == 99


def test_width_not_divisible_by_head_dim_is_rejected() -> None:
    with pytest.raises(ValueError, match="head_dim"):
        tiny_config(width=96, head_dim=64)


def test_width_not_divisible_by_num_heads_is_rejected() -> None:
    with pytest.raises(ValueError, match="num_heads"):
        ModelConfig(width=96, num_heads=5, repa_dims=())


def test_text_conditioning_needs_text_dim() -> None:
    with pytest.raises(ValueError, match="text_dim"):
        tiny_config(cond="text", text_dim=None)


def test_head_dim_override_replaces_preset_head_count() -> None:
    config = ModelConfig.from_preset("SiT-B/2", width=512, head_dim=32)
    assert (config.num_heads, config.head_dim) == (16, 32)


def test_unmasked_captions_attend_without_a_mask_and_match_an_all_true_mask(monkeypatch) -> None:
    """repa-rf's unmasked cross-attention passes no mask to SDPA (so its flash kernel is eligible),
    with the output of an explicit all-true mask."""
    unmasked = build(cond="text", text_mask=False)
    masked = build(cond="text")
    masked.load_state_dict(unmasked.state_dict())
    kwargs = inputs(unmasked.config)
    all_true = {**kwargs, "text_mask": torch.ones_like(kwargs["text_mask"])}
    want, _ = masked(**all_true)
    sdpa, masks = torch.nn.functional.scaled_dot_product_attention, []
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, attn_mask=None, **k: masks.append(attn_mask) or sdpa(*a, attn_mask=attn_mask, **k))
    got, _ = unmasked(**kwargs)
    torch.testing.assert_close(got, want)
    assert len(masks) == 2 * unmasked.config.depth and all(m is None for m in masks)
