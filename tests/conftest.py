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
    from stages.encoders.tiny import write_tiny_encoders

    return write_tiny_encoders(tmp_path_factory.mktemp("tiny-models"), seed=0)


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory) -> list[Path]:
    from stages.encode.demo_data import write_demo_shards

    return write_demo_shards(tmp_path_factory.mktemp("demo-data"), num_shards=3, samples_per_shard=24, seed=0)
