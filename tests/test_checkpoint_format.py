"""One checkpoint format: ``checkpoint_contents`` builds it, its module documents it, and both training and
``repa import-checkpoint`` write exactly its entries."""

from __future__ import annotations

import inspect

import pytest
import torch
from typer.testing import CliRunner

from pipeline.cli import app
from stages.core.files import checkpoint
from stages.core.files.checkpoint import TRAINING_ENTRIES, checkpoint_contents, latest_checkpoint
from stages.train.loop import run_train

from . import reference_repa as repa
from .test_recipes import TINY, randomise
from .test_train import tiny_train

COMMON = [name for name, p in inspect.signature(checkpoint_contents).parameters.items()
          if p.kind is inspect.Parameter.KEYWORD_ONLY]


def test_the_module_documents_every_entry():
    undocumented = [name for name in COMMON + list(TRAINING_ENTRIES) if f"``{name}``" not in checkpoint.__doc__]
    assert undocumented == []


def test_training_writes_the_documented_entries(train_cache, tmp_path):
    run_train(tiny_train(train_cache, tmp_path / "run", steps=2, val_every=2), log=lambda m: None)
    saved = torch.load(latest_checkpoint(tmp_path / "run"), weights_only=True)
    assert sorted(saved) == sorted(COMMON + list(TRAINING_ENTRIES))


def test_an_imported_checkpoint_has_the_common_entries(train_cache, tmp_path):
    torch.manual_seed(0)
    model, ema = randomise(repa.SiT(**TINY), 1), randomise(repa.SiT(**TINY), 2)
    torch.save(repa.train_checkpoint(model, ema, 3, model="SiT-T/2", encoder_depth=2, num_classes=10, proj_coeff=0.5),
               tmp_path / "0000003.pt")
    r = CliRunner().invoke(app, ["import-checkpoint", str(tmp_path / "0000003.pt"), "--run-dir", str(tmp_path / "run"),
                                 "--cache", str(train_cache), "--num-heads", "4"])
    assert r.exit_code == 0, r.output
    assert sorted(torch.load(latest_checkpoint(tmp_path / "run"), weights_only=True)) == sorted(COMMON)


def test_an_unknown_entry_is_a_programming_error():
    with pytest.raises(TypeError, match="optimiser"):
        checkpoint_contents(step=1, model={}, ema={}, config={}, model_config={}, cond="none", fingerprint="f",
                            latent={}, cache="c", parts={}, optimiser={})
