"""`repa import-checkpoint` for RAE's stage-2 files (bytetriper/RAE): a DiT-DH as a run on a cache's tokens.

RAE's ``train.py`` saves ``{"step", "epoch", "model", "ema", "optimizer", "scheduler"}``; its released
``stage2_model.pt`` may also be the bare state dict, which is then both the weights and the EMA. The state-dict
names are the project's DiT-DH's (``stages.core.model.ddt``), so the shape is read off the tensors: widths from
the two patch embeddings, depths from the blocks of each width, head sizes from the RoPE tables, the grid from
the position table, classes from the label table (its last row is the null class). Every key and shape must
then fit that network exactly (RAE loads with ``strict=True``).

The run diffuses the tokens of the cache's target ``--diffuse`` (checked as for `repa train --diffuse`: fp16, a
square grid, and the checkpoint's channels and grid), normalised by RAE's ``stat.pt`` (``--diffuse-stats``),
which becomes the checkpoint's ``diffusion`` entry as a trained ``--diffuse`` run stores its statistics.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
from torch import Tensor

from stages.core.diffusion.token_stats import load_stats
from stages.core.diffusion.token_target import target_tokens, token_target
from stages.core.errors import UsageError
from stages.core.files.tensor_files import check_state_dict_fits, state_dict_in
from stages.core.model.ddt_config import DDT_PRESETS
from stages.core.model.model_config import ModelConfig
from stages.core.model.network import build_model, count_parameters

from .imported_run import check_new_run_dir, import_cache, write_imported_run

WHAT = "an RAE stage-2 state dict or checkpoint (stage2_model.pt)"
_BLOCK_NORM = re.compile(r"^blocks\.(\d+)\.norm1\.weight$")


def is_rae_stage2(contents: object) -> bool:
    """Whether a loaded file holds a DiT-DH's weights (its body's patch embedding ``s_embedder`` is DiT-DH's own)."""
    if not isinstance(contents, dict):
        return False
    ema = contents.get("ema")
    state = ema if isinstance(ema, dict) else contents
    return any(isinstance(k, str) and k.endswith("s_embedder.proj.weight") for k in state)


def rae_states(contents: object, path: Path) -> tuple[dict[str, Tensor], dict[str, Tensor], int]:
    """(weights, EMA weights, step); a bare state dict is both."""
    model = state_dict_in(contents, path, WHAT, prefer=("model", "ema"))
    ema = state_dict_in(contents, path, WHAT, prefer=("ema", "model"))
    step = contents.get("step", 0) if isinstance(contents, dict) and "ema" in contents else 0
    return model, ema, int(step) if isinstance(step, int) else 0


def tensor_shape(state: dict[str, Tensor], path: Path, name: str) -> tuple[int, ...]:
    if name not in state:
        raise UsageError(f"{path}: has no {name}: not a class-conditional DiT-DH with RoPE as RAE trains it "
                         "(the one this project builds)")
    return tuple(state[name].shape)


def ddt_geometry(state: dict[str, Tensor], path: Path) -> dict:
    """Latent channels and grid, and classes (the label table's last row is the null class)."""
    channels = tensor_shape(state, path, "s_embedder.proj.weight")[1]
    tokens = tensor_shape(state, path, "enc_feat_rope.freqs_cos")[0]
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise UsageError(f"{path}: its RoPE table covers {tokens} tokens, not a square grid; not a DiT-DH at patch 1")
    classes = tensor_shape(state, path, "y_embedder.embedding_table.weight")[0] - 1
    return dict(in_channels=channels, input_size=side, num_classes=classes)


def ddt_shape(state: dict[str, Tensor], path: Path) -> dict:
    """The DiT-DH fields of ``ModelConfig`` that the tensors' shapes imply."""
    body = tensor_shape(state, path, "s_embedder.proj.weight")[0]
    head = tensor_shape(state, path, "x_embedder.proj.weight")[0]
    if body == head:
        raise UsageError(f"{path}: body and head are both {body} wide, so the blocks' shapes do not say where the "
                         f"head starts; pass --model ({', '.join(DDT_PRESETS)})")
    body_dim = tensor_shape(state, path, "enc_feat_rope.freqs_cos")[-1]
    head_dim = tensor_shape(state, path, "dec_feat_rope.freqs_cos")[-1]
    if body % body_dim or head % head_dim:
        raise UsageError(f"{path}: its RoPE head sizes {body_dim}, {head_dim} do not divide its widths {body}, {head}")
    norms = sorted((int(m.group(1)), state[k].shape[0]) for k in state if (m := _BLOCK_NORM.match(k)))
    widths = [w for _, w in norms]
    depth = next((i for i, w in enumerate(widths) if w != body), len(widths))
    return dict(width=body, depth=depth, num_heads=body // body_dim, head_width=head, head_depth=len(widths) - depth,
                head_heads=head // head_dim, **ddt_geometry(state, path))


def ddt_model_config(state: dict[str, Tensor], path: Path, preset: str | None) -> ModelConfig:
    """The run's model: DiT-DH preset ``preset`` at the file's channels, grid and classes, or (no preset) the
    shape read off the tensors, named after the preset it equals."""
    if preset is not None:
        if preset not in DDT_PRESETS:
            raise UsageError(f"--model {preset}: an RAE stage-2 file is a DiT-DH; pass one of "
                             f"{', '.join(DDT_PRESETS)}, or leave --model out to read the shape from the file")
        return ModelConfig.from_preset(preset, cond="class", **ddt_geometry(state, path))
    shape = ddt_shape(state, path)
    found = ((shape["width"], shape["head_width"]), (shape["depth"], shape["head_depth"]),
             (shape["num_heads"], shape["head_heads"]))
    named = next((name for name, p in DDT_PRESETS.items()
                  if (p["hidden_size"], p["depth"], p["num_heads"]) == found), None)
    try:
        return ModelConfig(preset=named, arch="dit-dh", patch_size=1, cond="class", **shape)
    except ValueError as e:
        raise UsageError(f"{path}: its shape is not a DiT-DH this project builds ({e})") from None


def import_rae_checkpoint(contents: object, path: Path, run_dir: Path, cache: Path, diffuse: str | None,
                          stats: Path | None, model: str | None = None, val_fraction: float = 0.0, log=print) -> Path:
    """Write ``run_dir`` from an RAE stage-2 file's ``contents``; returns the checkpoint written."""
    if diffuse is None:
        raise UsageError(f"{path} is an RAE stage-2 model: pass --diffuse TARGET, the cache's DINOv2-with-registers "
                         "target whose tokens it generates")
    if stats is None:
        raise UsageError(f"{path} is an RAE stage-2 model: pass --diffuse-stats with the stat.pt it was trained with "
                         "(RAE's models/stats/.../stat.pt); its latents are normalised by those statistics")
    check_new_run_dir(run_dir)
    model_sd, ema_sd, step = rae_states(contents, path)
    mc = ddt_model_config(ema_sd, path, model)
    with torch.device("meta"):
        network = build_model(mc)
    hint = ("an RAE stage-2 DiT-DH (SwiGLU, RoPE, RMSNorm, no qk-norm, MLP ratio 4, as RAE's presets); with --model, "
            "the preset it was trained as")
    for state in (ema_sd, model_sd):
        check_state_dict_fits(network.state_dict(), state, path, hint)
    manifest = import_cache(cache)
    record = token_target(manifest, cache, diffuse)
    if (record["dim"], record["grid"][0]) != (mc.in_channels, mc.input_size):
        raise UsageError(f"--diffuse {diffuse}: cache {cache} holds {record['grid'][0]}x{record['grid'][1]} tokens of "
                         f"{record['dim']}, the checkpoint generates {mc.input_size}x{mc.input_size} tokens of "
                         f"{mc.in_channels}; pass the target encoded as RAE's encoder (DINOv2-B with registers at 224 "
                         "px for 256-px images: 16x16x768)")
    variable = target_tokens(diffuse, record, load_stats(stats, (mc.in_channels, mc.input_size, mc.input_size)))
    if variable.layernorm is None:
        log(f"--diffuse {diffuse}: the cache records no final-LayerNorm vectors for this target, so reference.png "
            "decodes its tokens as stored, not affine-free as RAE's decoder expects (add the target again to record "
            "them)")
    config = {"method": "sit", "diffuse": diffuse, "diffuse_stats": str(stats), "repa_lambda": 0.0}
    parameters = count_parameters(network)
    ckpt = write_imported_run(path, run_dir, cache, manifest, step=step, model=model_sd, ema=ema_sd, model_config=mc,
                              parameters=parameters, val_fraction=val_fraction, config=config,
                              diffusion=variable.record())
    log(f"imported {path} (step {step}, {mc.preset or 'DiT-DH'} widths {mc.width}/{mc.head_width} depths "
        f"{mc.depth}/{mc.head_depth}, {parameters / 1e6:.2f} M params) as {ckpt}, diffusing the tokens of {diffuse}")
    return ckpt
