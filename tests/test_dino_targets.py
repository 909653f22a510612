"""DINOv2 targets as official REPA: the position embedding resampled once to the patch grid (bicubic with
antialias, as timm's resample_abs_pos_embed), or as DINOv2's own per-call interpolation (repa-rf's)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import webdataset as wds

from cache_schema import CacheReader
from stages.core.encoders.features import EncoderSpec, FeatureEncoders, dino_preprocess
from stages.core.encoders.images import Prepared, prepare_sample
from stages.core.encoders.load import ModelSource, load_dino
from stages.encode.run import run_encode

from .encode_helpers import tiny_config
from .reference_repa_rf import seed_interpolate_pos_encoding

GRID = [4, 4]  # --resolution 64 -> 56 px DINOv2 input -> 4x4 patches of 14 px; the tiny table is 16x16


def _checkpoint(path):
    from transformers import AutoModel

    return AutoModel.from_pretrained(path, dtype=torch.float32).eval()


def _expected_table(raw) -> torch.Tensor:
    """timm's resample_abs_pos_embed(posemb, [4, 4]) with its defaults, written out."""
    table = raw.embeddings.position_embeddings.detach().float()
    dim = table.shape[-1]
    grid = table[:, 1:].reshape(1, 16, 16, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(4, 4), mode="bicubic", antialias=True, align_corners=False)
    return torch.cat([table[:, :1], grid.permute(0, 2, 3, 1).reshape(1, 16, dim)], dim=1)


def _manual_forward(raw, table: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """DINOv2's forward from the checkpoint's modules with ``table`` added as is; registers after CLS."""
    emb = raw.embeddings
    h = torch.cat([emb.cls_token.expand(x.shape[0], -1, -1), emb.patch_embeddings(x)], dim=1) + table
    registers = getattr(emb, "register_tokens", None)
    if registers is not None:
        h = torch.cat([h[:, :1], registers.expand(x.shape[0], -1, -1), h[:, 1:]], dim=1)
    for layer in raw.encoder.layer:
        out = layer(h)
        h = out[0] if isinstance(out, tuple) else out
    return raw.layernorm(h)


def _image(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (2, 3, 64, 64), generator=g, dtype=torch.uint8)


def _no_interpolation(*args, **kwargs):
    raise AssertionError("the installed position table was interpolated again")


@pytest.mark.parametrize("name, registers", [("dino", 0), ("dino-reg", 4)])
def test_resampled_once_table_and_forward_match_a_hand_computation(tiny_models, monkeypatch, name, registers):
    raw = _checkpoint(tiny_models[name])
    model = load_dino(ModelSource(str(tiny_models[name])), torch.float32, torch.device("cpu"), pos_embed_grid=GRID)
    table = model.embeddings.position_embeddings
    expected = _expected_table(raw)
    assert table.shape == (1, 17, 32) and not table.requires_grad
    torch.testing.assert_close(table.detach(), expected, atol=0, rtol=0)
    torch.testing.assert_close(table[:, 0], raw.embeddings.position_embeddings[:, 0], atol=0, rtol=0)  # CLS kept

    x = dino_preprocess(_image(), 64)
    assert x.shape[-2:] == (56, 56)
    with torch.no_grad():
        want = _manual_forward(raw, expected, x)
        monkeypatch.setattr(torch.nn.functional, "interpolate", _no_interpolation)
        got = model(pixel_values=x).last_hidden_state
    assert got.shape == (2, 1 + registers + 16, 32)
    torch.testing.assert_close(got[:, 1 + registers :], want[:, 1 + registers :], atol=1e-5, rtol=1e-5)


def _encoders(tiny_models, pos_embed: str, dino: str = "dino") -> FeatureEncoders:
    spec = EncoderSpec(
        vae=ModelSource(str(tiny_models["vae"])), dino=ModelSource(str(tiny_models[dino])), text=None,
        max_text_tokens=16, resolution=64, dino_pos_embed=pos_embed,
    )
    return FeatureEncoders(spec, torch.device("cpu"), torch.float32)


def test_per_call_installs_the_seeds_dinov2_table_and_gives_other_targets(tiny_models):
    raw = _checkpoint(tiny_models["dino"])
    per_call = _encoders(tiny_models, "bicubic-per-call")
    once = _encoders(tiny_models, "antialias-once")
    seed_table = seed_interpolate_pos_encoding(raw.embeddings.position_embeddings.detach(), 56, 56)
    assert seed_table.shape == (1, 17, 32)
    torch.testing.assert_close(per_call.dino.embeddings.position_embeddings.detach(), seed_table, atol=1e-6, rtol=1e-6)
    assert per_call.dino_info["pos_embed"] == "bicubic-per-call" and once.dino_info["pos_embed"] == "antialias-once"

    images = _image(1)
    with torch.no_grad():
        want = _manual_forward(raw, seed_table, dino_preprocess(images, 64))[:, 1:]
        a, b = per_call._dino_tokens(images), once._dino_tokens(images)
    torch.testing.assert_close(a, want, atol=1e-5, rtol=1e-5)
    assert a.shape == b.shape == (2, 16, 32)
    assert (a - b).abs().max() > 1e-2


def test_registers_model_per_call_already_uses_antialias(tiny_models):
    # transformers' Dinov2WithRegisters interpolates with antialias on every call: the same table as once.
    per_call = _encoders(tiny_models, "bicubic-per-call", "dino-reg")
    once = _encoders(tiny_models, "antialias-once", "dino-reg")
    assert once.dino_info["registers"] == 4 and once.dino.embeddings.position_embeddings.shape == (1, 17, 32)
    with torch.no_grad():
        a, b = per_call._dino_tokens(_image(2)), once._dino_tokens(_image(2))
    assert a.shape == b.shape == (2, 16, 32)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_method_is_in_the_fingerprint_and_the_manifest_and_the_cache_holds_its_targets(
    tmp_path, tiny_models, demo_shards
):
    caches = {}
    for method in ("antialias-once", "bicubic-per-call"):
        cache = tmp_path / method
        run_encode(tiny_config(tiny_models, str(demo_shards[0]), cache, dino_pos_embed=method, max_samples=8,
                               text_encoder=None), log=lambda *a: None)
        caches[method] = CacheReader(cache)
    once, per_call = caches["antialias-once"].manifest, caches["bicubic-per-call"].manifest
    assert once.fingerprint != per_call.fingerprint
    assert once.dino["pos_embed"] == "antialias-once" and per_call.dino["pos_embed"] == "bicubic-per-call"
    assert once.settings["dino_preprocess"] != per_call.settings["dino_preprocess"]
    assert "resampled once" in once.settings["dino_preprocess"]

    # the stored tokens of one sample, recomputed by hand from the tar
    raw_sample = next(iter(wds.WebDataset(str(demo_shards[0]), shardshuffle=False)))
    prep = prepare_sample(raw_sample, 64, 10**9, draft=False)
    assert isinstance(prep, Prepared)
    reader = caches["antialias-once"]
    got = reader.sample(reader.keys.tolist().index(raw_sample["__key__"]))["dino"].astype(np.float32)
    raw = _checkpoint(tiny_models["dino"])
    x = dino_preprocess(torch.from_numpy(prep.image.copy()).permute(2, 0, 1)[None], 64)
    with torch.no_grad():
        want = _manual_forward(raw, _expected_table(raw), x)[0, 1:].numpy()
        default = raw(pixel_values=x).last_hidden_state[0, 1:].numpy()
    np.testing.assert_allclose(got, want, atol=2e-3, rtol=2e-3)
    assert np.abs(got - default).max() > 1e-2
