"""--text-attention: captions encoded with an attention mask (real tokens stored), or as repa-rf did
(padded to --max-text-tokens, no mask, every position stored); sampling encodes prompts the cache's way."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cache_schema import CacheReader
from stages.encode.run import run_encode

from .encode_helpers import tiny_config

MAX_TOKENS = 24  # the demo captions are 12 to 30 words: some shorter, some truncated


@pytest.fixture(scope="module")
def caches(tmp_path_factory, tiny_models, demo_shards) -> dict[str, CacheReader]:
    out = {}
    for attention in ("masked", "unmasked"):
        cache = tmp_path_factory.mktemp("text-" + attention) / "cache"
        run_encode(tiny_config(tiny_models, str(demo_shards[0]), cache, text_attention=attention,
                               max_text_tokens=MAX_TOKENS), log=lambda *a: None)
        out[attention] = CacheReader(cache)
    return out


@pytest.fixture(scope="module")
def t5(tiny_models):
    from transformers import AutoTokenizer, T5EncoderModel

    return (AutoTokenizer.from_pretrained(tiny_models["text"]),
            T5EncoderModel.from_pretrained(tiny_models["text"]).eval())


def _samples(reader: CacheReader) -> list[dict]:
    return [reader.sample(i) for i in range(len(reader))]


def test_unmasked_stores_every_padded_position_as_t5_sees_it_without_a_mask(caches, t5):
    tokenizer, model = t5
    samples = _samples(caches["unmasked"])
    assert len(samples) == 24
    for s in samples:
        ids = tokenizer(s["caption"], padding="max_length", max_length=MAX_TOKENS, truncation=True,
                        return_tensors="pt")["input_ids"]
        with torch.no_grad():
            want = model(input_ids=ids).last_hidden_state[0].numpy()
        assert s["text"].shape == (MAX_TOKENS, want.shape[-1])
        np.testing.assert_allclose(s["text"].astype(np.float32), want, atol=2e-3, rtol=2e-3)
    m = caches["unmasked"].manifest
    assert m.settings["text_attention"] == "unmasked" and m.text["attention"] == "unmasked"


def test_masked_default_stores_only_real_tokens(caches, t5):
    tokenizer, _ = t5
    masked, unmasked = _samples(caches["masked"]), _samples(caches["unmasked"])
    lengths = [s["text"].shape[0] for s in masked]
    want = [len(tokenizer(s["caption"], max_length=MAX_TOKENS, truncation=True)["input_ids"]) for s in masked]
    assert lengths == want and min(lengths) < MAX_TOKENS and max(lengths) == MAX_TOKENS
    m = caches["masked"].manifest
    assert m.settings["text_attention"] == "masked" and m.text["attention"] == "masked"
    # without the mask the pads take part in attention: even the real tokens of a short caption change
    by_key = {s["key"]: s for s in unmasked}
    short = next(s for s in masked if s["text"].shape[0] < MAX_TOKENS)
    n = short["text"].shape[0]
    assert np.abs(short["text"].astype(np.float32) - by_key[short["key"]]["text"][:n].astype(np.float32)).max() > 1e-3


def test_text_attention_is_in_the_fingerprint(caches):
    assert caches["masked"].manifest.fingerprint != caches["unmasked"].manifest.fingerprint


def test_sampling_encodes_prompts_as_the_unmasked_cache_did(caches):
    from stages.sample.run import TextEncoder

    reader = caches["unmasked"]
    enc = TextEncoder(reader.manifest, torch.device("cpu"))
    samples = _samples(reader)[:3]
    hidden, mask = enc([s["caption"] for s in samples])
    assert hidden.shape == (3, MAX_TOKENS, reader.manifest.text["dim"])
    assert mask.dtype == torch.bool and bool(mask.all())
    for i, s in enumerate(samples):
        np.testing.assert_allclose(hidden[i].numpy(), s["text"].astype(np.float32), atol=2e-3, rtol=2e-3)


def test_sampling_of_a_masked_cache_is_unchanged(caches):
    from stages.sample.run import TextEncoder

    reader = caches["masked"]
    short = next(s for s in _samples(reader) if s["text"].shape[0] < MAX_TOKENS)
    hidden, mask = TextEncoder(reader.manifest, torch.device("cpu"))([short["caption"]])
    n = short["text"].shape[0]
    assert int(mask.sum()) == n
    np.testing.assert_allclose(hidden[0, :n].numpy(), short["text"].astype(np.float32), atol=2e-3, rtol=2e-3)
