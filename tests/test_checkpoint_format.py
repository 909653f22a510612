"""One checkpoint format: ``checkpoint_contents`` builds it, its module documents it, and both training and
``repa import-checkpoint`` write exactly its entries."""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from pipeline.cli import app
from stages.core.files import checkpoint
from stages.core.files.checkpoint import TRAINING_ENTRIES, checkpoint_contents, latest_checkpoint
from stages.train.loop import run_train

from . import reference_repa as repa
from .encode_helpers import ROOT, env
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


INTERRUPTED_WRITE = """
import os, signal, sys, threading, time
from pathlib import Path
import torch
from stages.core.files.checkpoint import save_checkpoint

path = Path(sys.argv[1])

def stop_mid_write():  # a stop signal while the tensor data is being written, as a scheduler's may land
    while sum(p.stat().st_size for p in path.parent.iterdir() if p.name.startswith(f".{path.name}.tmp")) < 2**20:
        time.sleep(0.0002)
    os.kill(os.getpid(), signal.SIGINT)

threading.Thread(target=stop_mid_write, daemon=True).start()
try:
    save_checkpoint(path, {"weights": torch.zeros(96 * 2**20 // 4)})
except KeyboardInterrupt:
    print("interrupted")
"""


@pytest.mark.parametrize("attempt", range(3))
def test_a_stop_signal_during_a_checkpoint_write_is_the_stop_not_a_failed_write(tmp_path, attempt):
    path = tmp_path / "step-0000004.pt"
    r = subprocess.run([sys.executable, "-c", INTERRUPTED_WRITE, str(path)], env=env(), cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "interrupted", (r.stdout + r.stderr)[-2000:]
    assert [p.name for p in tmp_path.iterdir()] in ([], [path.name])  # no half file, no temporary one
    if path.exists():
        assert torch.load(path, weights_only=True)["weights"].numel() == 96 * 2**20 // 4
