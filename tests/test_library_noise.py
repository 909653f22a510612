"""Known-harmless library messages are silenced where they arise; a vision tower missing weights is still refused."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stages.core.encoders.load import EncoderLoadError, ModelSource
from stages.core.encoders.targets import TargetEncoder

ROOT = Path(__file__).resolve().parent.parent
NOISE = ("requires torchvision", "Writing model shards", "UNEXPECTED", "LOAD REPORT", "bos_token_id", "eos_token_id")


@pytest.fixture
def transformers_messages():
    """What transformers logs at warning level and above while the test runs (the suite runs with
    TRANSFORMERS_VERBOSITY=error, and transformers' own handler writes to the stderr it found at import)."""
    import logging

    from transformers.utils import logging as hf_logging

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    messages: list[str] = []
    handler, logger, level = Collect(), logging.getLogger("transformers"), hf_logging.get_verbosity()
    hf_logging.set_verbosity_warning()
    logger.addHandler(handler)
    yield messages
    logger.removeHandler(handler)
    hf_logging.set_verbosity(level)


def test_writing_the_tiny_encoders_prints_no_library_noise(tmp_path):
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRANSFORMERS_VERBOSITY"}
    r = subprocess.run([sys.executable, "-m", "pipeline", "encoders", "tiny", "--out", str(tmp_path / "m")],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert [n for n in NOISE if n in r.stderr] == [], r.stderr


def test_a_siglip_target_loads_without_the_unexpected_keys_table(tiny_models, transformers_messages):
    enc = TargetEncoder(ModelSource(str(tiny_models["siglip"])), 64, 4, torch.device("cpu"), torch.float32)
    assert enc.kind == "siglip" and enc.grid == 4
    assert [m for m in transformers_messages if any(n in m for n in NOISE)] == []


def test_a_vision_tower_missing_weights_is_refused(tiny_models, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    broken = tmp_path / "siglip"
    shutil.copytree(tiny_models["siglip"], broken)
    weights = broken / "model.safetensors"
    state = {k: v for k, v in load_file(weights).items() if "vision_model.post_layernorm" not in k}
    save_file(state, weights, metadata={"format": "pt"})
    with pytest.raises(EncoderLoadError, match=r"lacks 2 weight\(s\) of its siglip vision tower .*post_layernorm"):
        TargetEncoder(ModelSource(str(broken)), 64, 4, torch.device("cpu"), torch.float32)
