"""Tiny encoders load offline through the real ``from_pretrained`` paths and have the expected shapes."""

from __future__ import annotations

import socket

import huggingface_hub.constants
import pytest
import torch
from diffusers import AutoencoderKL
from transformers import AutoModel, AutoTokenizer, CLIPTextModel, T5EncoderModel

from stages.demo.data import make_sample
from stages.demo.tiny_encoders import write_tiny_encoders

CAPTIONS = [make_sample(0, 0, i)[1] for i in range(8)]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return write_tiny_encoders(tmp_path_factory.mktemp("tiny"), seed=0)


@pytest.fixture
def offline(monkeypatch):
    """HF_HUB_OFFLINE=1, and a record of every attempt to open a network connection (there must be none)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the variable once at import; patch the constant too so it takes effect.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    attempts: list = []

    def refuse(self, address):
        attempts.append(address)
        raise OSError("network access in an offline test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    return attempts


def test_writes_every_folder(folders):
    assert set(folders) == {"vae", "vae-demo", "vae-flux", "dino", "dino-reg", "text", "clip-text", "siglip"}
    assert all((path / "config.json").is_file() for path in folders.values())


@pytest.mark.parametrize(
    ("name", "channels", "scale", "shift"), [("vae", 4, 0.18215, None), ("vae-flux", 16, 0.3611, 0.1159)]
)
def test_vae_loads_and_downsamples_by_eight(folders, offline, name, channels, scale, shift):
    vae = AutoencoderKL.from_pretrained(folders[name]).eval()
    assert (vae.config.scaling_factor, vae.config.shift_factor) == (scale, shift)
    with torch.inference_mode():
        posterior = vae.encode(torch.rand(2, 3, 64, 48) * 2 - 1).latent_dist
        decoded = vae.decode(posterior.mean).sample
    assert posterior.mean.shape == posterior.std.shape == (2, channels, 8, 6)
    assert decoded.shape == (2, 3, 64, 48)
    assert offline == []


@pytest.mark.parametrize(
    ("name", "cls_name", "prefix_tokens"),
    [("dino", "Dinov2Model", 1), ("dino-reg", "Dinov2WithRegistersModel", 1 + 4)],
)
def test_dino_loads_with_automodel_and_gives_a_token_per_patch(folders, offline, name, cls_name, prefix_tokens):
    model = AutoModel.from_pretrained(folders[name]).eval()
    assert type(model).__name__ == cls_name
    with torch.inference_mode():
        out = model(pixel_values=torch.randn(2, 3, 112, 112)).last_hidden_state
    assert out.shape == (2, prefix_tokens + 8 * 8, 32)
    assert offline == []


def test_t5_tokenizer_covers_demo_captions_and_appends_eos(folders, offline):
    tok = AutoTokenizer.from_pretrained(folders["text"])
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    for caption in CAPTIONS:
        ids = tok(caption)["input_ids"]
        assert tok.unk_token_id not in ids
        assert ids[-1] == tok.eos_token_id and ids.count(tok.eos_token_id) == 1
        assert tok.decode(ids, skip_special_tokens=True) == caption
    assert tok("Zebra")["input_ids"] == [tok.unk_token_id, tok.eos_token_id]
    assert offline == []


def test_t5_encoder_covers_the_vocabulary_and_encodes_padded_batches(folders, offline):
    tok = AutoTokenizer.from_pretrained(folders["text"])
    model = T5EncoderModel.from_pretrained(folders["text"]).eval()
    assert model.config.vocab_size >= len(tok)
    batch = tok(CAPTIONS, padding="max_length", max_length=48, truncation=True, return_tensors="pt")
    with torch.inference_mode():
        out = model(**batch).last_hidden_state
    assert out.shape == (len(CAPTIONS), 48, 32)
    assert offline == []


def test_clip_tokenizer_wraps_in_start_end_and_pads_to_77(folders, offline):
    tok = AutoTokenizer.from_pretrained(folders["clip-text"])
    model = CLIPTextModel.from_pretrained(folders["clip-text"]).eval()
    assert tok.model_max_length == 77 and model.config.vocab_size >= len(tok)
    batch = tok(
        CAPTIONS[:2], padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt"
    )
    ids = batch["input_ids"]
    assert ids.shape == (2, 77)
    assert (ids[:, 0] == tok.bos_token_id).all()
    assert tok.unk_token_id not in ids
    assert tok.decode(ids[0], skip_special_tokens=True) == CAPTIONS[0]
    with torch.inference_mode():
        out = model(**batch)
    assert out.last_hidden_state.shape == (2, 77, 32) and out.pooler_output.shape == (2, 32)
    assert offline == []


def test_siglip_scores_image_caption_pairs_offline(folders, offline):
    from transformers import AutoImageProcessor, SiglipModel

    tok = AutoTokenizer.from_pretrained(folders["siglip"])
    processor = AutoImageProcessor.from_pretrained(folders["siglip"])
    model = SiglipModel.from_pretrained(folders["siglip"]).eval()
    batch = tok(CAPTIONS[:2], padding="max_length", max_length=64, truncation=True, return_tensors="pt")
    assert set(batch) == {"input_ids"} and batch["input_ids"].shape == (2, 64)
    assert tok.unk_token_id not in batch["input_ids"] and (batch["input_ids"][:, -1] == tok.pad_token_id).all()
    pixels = processor(images=[make_sample(0, 0, i)[0] for i in range(2)], return_tensors="pt")["pixel_values"]
    assert pixels.shape == (2, 3, 32, 32)
    with torch.inference_mode():
        out = model(pixel_values=pixels, **batch)
    assert out.image_embeds.shape == out.text_embeds.shape == (2, 32)
    assert torch.allclose(out.image_embeds.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert offline == []


def test_same_seed_gives_identical_weights_and_another_seed_differs(folders, tmp_path):
    again = write_tiny_encoders(tmp_path / "again", seed=0)
    other = write_tiny_encoders(tmp_path / "other", seed=1)
    weights = "diffusion_pytorch_model.safetensors"
    assert (again["vae"] / weights).read_bytes() == (folders["vae"] / weights).read_bytes()
    assert (again["dino"] / "model.safetensors").read_bytes() == (folders["dino"] / "model.safetensors").read_bytes()
    assert (other["vae"] / weights).read_bytes() != (folders["vae"] / weights).read_bytes()


def test_writing_leaves_the_callers_random_state_alone(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    write_tiny_encoders(tmp_path, seed=0)
    assert torch.equal(torch.rand(3), expected)
