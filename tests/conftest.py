"""Shared fixtures: tiny encoders and demo shards are generated once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    from stages.demo.tiny_encoders import write_tiny_encoders

    return write_tiny_encoders(tmp_path_factory.mktemp("tiny-models"), seed=0)


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory) -> list[Path]:
    from stages.demo.data import write_demo_shards

    return write_demo_shards(tmp_path_factory.mktemp("demo-data"), num_shards=3, samples_per_shard=24, seed=0)


@pytest.fixture(scope="session")
def labelled_shards(tmp_path_factory) -> list[Path]:
    from stages.demo.data import write_demo_shards

    return write_demo_shards(tmp_path_factory.mktemp("demo-labelled"), num_shards=2, samples_per_shard=48, seed=3, labels=True)


@pytest.fixture(scope="session")
def train_cache(tmp_path_factory, tiny_models, labelled_shards) -> Path:
    """A 96-sample cache with captions, class labels, text features, DINOv2 tokens and the tiny SigLIP's
    image-caption similarity (64 px)."""
    from stages.encode.config import EncodeConfig
    from stages.encode.run import run_encode

    cache = tmp_path_factory.mktemp("train-cache") / "cache"
    run_encode(EncodeConfig(
        source=str(labelled_shards[0].parent / "cc12m-train-{0000..0001}.tar"), cache=cache, resolution=64,
        vae=str(tiny_models["vae"]), dino=str(tiny_models["dino"]), text_encoder=str(tiny_models["text"]),
        max_text_tokens=16, batch_size=16, num_workers=0, shard_size=32, similarity_model=str(tiny_models["siglip"]),
    ))
    return cache
