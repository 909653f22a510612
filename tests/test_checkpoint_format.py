"""One checkpoint format: ``checkpoint_contents`` builds it, its module documents it, and both training and
``repa import-checkpoint`` write exactly its entries."""

from __future__ import annotations

import inspect
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

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
import os, signal, sys
from pathlib import Path
import torch
from stages.core.files.checkpoint import save_checkpoint

signal.signal(signal.SIGINT, signal.default_int_handler)  # a suite run from a background job inherits it ignored
path = Path(sys.argv[1])
os.mkfifo(path.with_name(f".{path.name}.tmp-{os.getpid()}"))  # the write goes to a pipe the test drains
print("ready", flush=True)
try:
    save_checkpoint(path, {"weights": torch.zeros(8 * 2**20 // 4)})
except KeyboardInterrupt:
    print("interrupted")
"""


def drain_with_a_stop_midway(fifo: Path, child: subprocess.Popen, deadline: float) -> int:
    """Read the checkpoint's bytes from ``fifo``; after the first MiB, SIGINT the writer (its write is then
    blocked on the pipe, as a write to a slow disk is when a scheduler's signal lands). Returns bytes read."""
    fd, got = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK), 0
    try:
        while time.monotonic() < deadline:
            try:
                data = os.read(fd, 1 << 16)
            except BlockingIOError:  # the writer is there, between writes
                select.select([fd], [], [], 0.1)
                continue
            if not data:
                if got:  # the writer closed the pipe
                    return got
                time.sleep(0.01)  # the writer has not opened it yet
                continue
            if got < 2**20 <= got + len(data):
                child.send_signal(signal.SIGINT)
            got += len(data)
        raise AssertionError(f"the write did not end within the deadline ({got} bytes read)")
    finally:
        os.close(fd)


def test_a_stop_signal_during_a_checkpoint_write_is_the_stop_not_a_failed_write(tmp_path):
    path = tmp_path / "step-0000004.pt"
    child = subprocess.Popen([sys.executable, "-c", INTERRUPTED_WRITE, str(path)], env=env(), cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        got = drain_with_a_stop_midway(path.with_name(f".{path.name}.tmp-{child.pid}"), child,
                                       time.monotonic() + 120)
        out, err = child.communicate(timeout=60)
    finally:
        child.kill()
    assert got > 2**20 and child.returncode == 0 and out.strip() == "interrupted", (out + err)[-2000:]
    assert list(tmp_path.iterdir()) == []  # no half file, no temporary one
