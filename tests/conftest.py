"""Shared fixtures: tiny encoders and demo shards are generated once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# What makes a test an integration test (`make test-fast` leaves these out): it builds tiny models, shards or
# caches, or starts an object-storage server (fixtures that use these count too), or its module says so.
INTEGRATION_FIXTURES = {"tiny_models", "demo_shards", "labelled_shards", "train_cache", "s3_endpoint"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if INTEGRATION_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


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

    return write_demo_shards(tmp_path_factory.mktemp("demo-labelled"), num_shards=2, samples_per_shard=48, seed=3,
                             labels=True)


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


@pytest.fixture(scope="session")
def s3_endpoint():
    """An S3-compatible server (moto) on 127.0.0.1, with a bucket ``repa-test``; the AWS_* variables point
    this process and the subprocesses it starts at it."""
    import socket

    import boto3
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                            "AWS_REGION", "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE")}
    os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="test",
                      AWS_SECRET_ACCESS_KEY="test", AWS_REGION="us-east-1",
                      AWS_SHARED_CREDENTIALS_FILE=os.devnull, AWS_CONFIG_FILE=os.devnull)
    boto3.client("s3").create_bucket(Bucket="repa-test")
    yield os.environ["AWS_ENDPOINT_URL"]
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
