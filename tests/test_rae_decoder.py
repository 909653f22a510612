"""RAE's ViT decoder against the transcription in tests/rae_reference.py
(bytetriper/RAE@a4d18c4 src/stage1/decoders/decoder.py, src/stage1/rae.py)."""

from __future__ import annotations

import pytest
import torch

from stages.core.errors import UsageError
from stages.core.model.rae_decoder import DECODER_PRESETS, DecoderConfig, RAEDecoder, decoder_config, load_decoder
from tests import rae_reference as ref

TINY = dict(hidden_size=12, decoder_hidden_size=16, decoder_num_hidden_layers=2, decoder_num_attention_heads=2,
            decoder_intermediate_size=24, patch_size=2, num_patches=16)


def _reference(tiny=TINY):
    return ref.rae_decoder_for(tiny["hidden_size"], tiny["patch_size"], tiny["num_patches"],
                               decoder_hidden_size=tiny["decoder_hidden_size"],
                               decoder_num_hidden_layers=tiny["decoder_num_hidden_layers"],
                               decoder_num_attention_heads=tiny["decoder_num_attention_heads"],
                               decoder_intermediate_size=tiny["decoder_intermediate_size"])


def _randomised(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "decoder_pos_embed":
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


def _released_file(tmp_path, seed=0):
    """A decoder file as src/extract_decoder.py:138-150 writes it: the bare GeneralDecoder state dict."""
    torch.manual_seed(seed)
    theirs = _randomised(_reference(), seed + 1)
    path = tmp_path / "model.pt"
    torch.save(theirs.state_dict(), path)
    return theirs, path


def test_decoded_pixels_match_rae(tmp_path):
    theirs, path = _released_file(tmp_path)
    ours = load_decoder(path, DecoderConfig(**TINY))
    tokens = torch.randn(3, 16, 12, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = ref.rae_decode_pixels(theirs, tokens)
        got = ours.decode(tokens)
    assert got.shape == (3, 3, 8, 8)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_other_token_counts_are_resized_as_rae(tmp_path):
    theirs, path = _released_file(tmp_path, seed=2)
    ours = load_decoder(path, DecoderConfig(**TINY))
    tokens = torch.randn(2, 9, 12, generator=torch.Generator().manual_seed(6))  # a 3x3 grid for a 4x4 table
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), theirs(tokens), rtol=1e-5, atol=1e-5)


def test_xl_decoder_has_raes_names_and_shapes():
    with torch.device("meta"):
        theirs = ref.rae_decoder_for(768, 16, 256)  # configs/decoder/ViTXL as the DINOv2-B RAE builds it
        ours = RAEDecoder(decoder_config("ViTXL"))
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    assert decoder_config("ViTXL").image_size == 256
    assert set(DECODER_PRESETS) == {"ViTB", "ViTL", "ViTXL"}


def test_position_table_matches_rae():
    theirs = _reference()
    ours = RAEDecoder(DecoderConfig(**TINY))
    torch.testing.assert_close(ours.decoder_pos_embed, theirs.decoder_pos_embed.data, rtol=0, atol=1e-7)


def test_training_checkpoint_and_prefixes_load(tmp_path):
    theirs, _ = _released_file(tmp_path, seed=3)
    path = tmp_path / "ckpt.pt"
    torch.save({"ema": {f"module.{k}": v.half() for k, v in theirs.state_dict().items()}, "step": 7}, path)
    ours = load_decoder(path, DecoderConfig(**TINY))
    torch.testing.assert_close(ours.decoder_embed.weight, theirs.decoder_embed.weight.half().float())


def test_mismatched_weights_are_refused_in_one_line(tmp_path):
    _, path = _released_file(tmp_path)
    with pytest.raises(UsageError) as err:
        load_decoder(path, DecoderConfig(**{**TINY, "decoder_num_hidden_layers": 3}))
    assert "missing decoder_layers.2." in str(err.value) and "\n" not in str(err.value)
    bad = tmp_path / "pickle.pt"
    torch.save({"weights": ref.SimpleNamespace(a=1)}, bad)  # a pickled object: weights_only refuses it
    with pytest.raises(UsageError, match="not a loadable"):
        load_decoder(bad, DecoderConfig(**TINY))
