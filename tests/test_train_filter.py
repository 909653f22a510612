"""`repa train --min-similarity`: a stricter similarity filter than the encode's, from the stored scores."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cache_schema import FastReader
from stages.core.data.split import split_ids
from stages.core.errors import UsageError
from stages.train.loop import run_train
from stages.train.setup import select_training

from .test_train import tiny_train


def test_training_keeps_the_samples_at_or_above_the_threshold_and_validation_whole(train_cache, tmp_path):
    reader = FastReader(train_cache)
    similarity = reader.read("similarity", np.arange(len(reader)))
    threshold = float(np.median(similarity))
    train, val = split_ids(reader.keys, 0.1)
    expected = train[similarity[train] >= threshold]
    assert 0 < len(expected) < len(train)

    run = tmp_path / "run"
    run_train(tiny_train(train_cache, run, steps=1, ckpt_every=1, val_every=1, min_similarity=threshold))
    written = json.loads((run / "config.json").read_text())
    assert (written["train_samples"], written["val_samples"]) == (len(expected), len(val))

    kept = select_training(tiny_train(train_cache, run, min_similarity=threshold), reader, train)
    np.testing.assert_array_equal(kept, expected)
    # the split is by key hash, before the filter: nothing filtered out of training becomes validation
    assert set(kept) <= set(train) and not set(kept) & set(val)


def test_a_cache_without_stored_similarity_is_refused(tmp_path, tiny_models, demo_shards):
    from stages.encode.run import run_encode

    from .encode_helpers import tiny_config

    cache = tmp_path / "plain"
    run_encode(tiny_config(tiny_models, str(demo_shards[0]), cache, text_encoder=None))
    with pytest.raises(UsageError, match="--min-similarity 0.1: cache .* stores no image-caption similarity"):
        run_train(tiny_train(cache, tmp_path / "run", min_similarity=0.1))


def test_a_threshold_nothing_reaches_is_refused(train_cache, tmp_path):
    with pytest.raises(UsageError, match="--min-similarity 1.0: no training sample"):
        run_train(tiny_train(train_cache, tmp_path / "run", min_similarity=1.0))
