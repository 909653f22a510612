"""`repa import-checkpoint`: a checkpoint of official REPA (sihyun-yu/REPA), REG (Martinser/REG) or iREPA
(End2End-Diffusion/iREPA) as a run of this project.

Their ``train.py`` saves ``{"model", "ema", "opt", "args", "steps"}`` with SiT state dicts whose names and
shapes are this project's SiT's (REG's class-token embedding ``cls_projectors2``/``wg_norm``, its head
``final_layer.linear_cls`` and 257-row ``pos_embed`` included; iREPA's projectors are
``projectors.k.projection_layer.*``: a Conv2d, whose kernel size its weight's shape gives, or the MLP, renamed
to REPA's names), and released weights are a bare state dict. Either becomes a run directory (config.json and
one checkpoint) that `repa sample` and `repa evaluate` use like any other run.
The file is read with ``weights_only=True``: only tensors, plain values and REPA's ``argparse.Namespace``
of arguments are accepted, so a crafted file cannot run code.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch

from stages.core.errors import UsageError
from stages.core.model.model_config import ModelConfig
from stages.core.model.model_presets import MODEL_PRESETS
from stages.core.model.network import build_model, count_parameters

from .imported_run import import_cache, write_imported_run

_BLOCK = re.compile(r"^blocks\.(\d+)\.")
_IREPA_PROJECTOR = re.compile(r"^projectors\.(\d+)\.projection_layer\.")


def official_names(state: dict) -> dict:
    """The state dict with iREPA's MLP projectors (``projectors.k.projection_layer.i.*``) under REPA's names
    (``projectors.k.i.*``); its conv projectors keep theirs, which are this project's."""
    out = {}
    for key, value in state.items():
        m = _IREPA_PROJECTOR.match(key)
        if m and key[m.end():].split(".")[0].isdigit():
            key = f"projectors.{m.group(1)}.{key[m.end():]}"
        elif m and value.dim() == 2:
            raise UsageError("the checkpoint's projector is iREPA's single linear layer (--projection-layer-type "
                             "linear), which this project does not build; export it with the conv or mlp projector")
        out[key] = value
    return out


def repa_states(obj: object, path: Path) -> tuple[dict, dict, dict, int]:
    """(model state dict, EMA state dict, REPA's arguments, step) from a REPA checkpoint or bare state dict."""
    if isinstance(obj, dict) and "ema" in obj and "model" in obj:
        raw = obj.get("args")
        args = vars(raw) if isinstance(raw, argparse.Namespace) else dict(raw or {})
        return obj["model"], obj["ema"], args, int(obj.get("steps", 0))
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj, obj, {}, 0  # the released weights: one state dict (the EMA)
    raise UsageError(f"{path}: neither REPA's {{model, ema, opt, args, steps}} nor a state dict of SiT weights")


def model_config_from(state: dict, args: dict, num_heads: int | None) -> ModelConfig:
    """The SiT shape a REPA state dict implies (heads from REPA's preset name, or ``num_heads``)."""
    if any("q_norm" in k for k in state):
        raise UsageError("the checkpoint uses qk-norm (REPA --qk-norm), which this project's SiT does not have")
    try:
        width, channels, patch, _ = state["x_embedder.proj.weight"].shape
        cls_dim = state["cls_projectors2.weight"].shape[1] if "cls_projectors2.weight" in state else 0  # REG
        tokens = state["pos_embed"].shape[1] - (1 if cls_dim else 0)
        table = state["y_embedder.embedding_table.weight"].shape[0]
    except KeyError as e:
        raise UsageError(f"the checkpoint has no {e.args[0]}: not a class-conditional SiT of official REPA") from None
    preset_name = args.get("model")
    preset = MODEL_PRESETS.get(preset_name, {}) if preset_name else {}
    heads = num_heads or preset.get("num_heads") or next(
        (p["num_heads"] for p in MODEL_PRESETS.values() if p.get("arch") == "sit" and p["width"] == width), None)
    if heads is None:
        raise UsageError(f"width {width} matches no SiT preset: pass --num-heads")
    z_dims = [state[f"projectors.{k}.4.weight"].shape[0] for k in range(64) if f"projectors.{k}.4.weight" in state]
    conv = [state[f"projectors.{k}.projection_layer.weight"] for k in range(64)
            if f"projectors.{k}.projection_layer.weight" in state]
    if conv:  # iREPA's Conv2d projectors: (target dim, width, k, k)
        z_dims = [w.shape[0] for w in conv]
    try:
        return ModelConfig(
            preset=preset_name if preset_name in MODEL_PRESETS else None, arch="sit", width=width,
            depth=1 + max(int(m.group(1)) for k in state if (m := _BLOCK.match(k))), num_heads=heads,
            patch_size=patch, in_channels=channels, input_size=int(round(tokens**0.5)) * patch, cond="class",
            num_classes=table - 1, repa_dims=tuple(z_dims), align_layer=int(args.get("encoder_depth", 8)),
            projector_dim=state["projectors.0.0.weight"].shape[0] if z_dims and not conv else 2048,
            projector_type="conv" if conv else "mlp", projector_kernel=conv[0].shape[-1] if conv else 1,
            class_token_dim=cls_dim,
        )
    except ValueError as e:
        raise UsageError(f"the checkpoint's shape is not a SiT this project builds ({e})") from None


def import_repa_checkpoint(contents: object, path: Path, run_dir: Path, cache: Path, num_heads: int | None = None,
                           val_fraction: float = 0.0, log=print) -> Path:
    """Write ``run_dir`` from a REPA checkpoint's ``contents`` (``load_import_file``); the cache names the VAE
    and latent scaling to sample with. Returns the checkpoint written."""
    model_sd, ema_sd, args, step = repa_states(contents, path)
    model_sd, ema_sd = official_names(model_sd), official_names(ema_sd)
    mc = model_config_from(ema_sd, args, num_heads)
    manifest = import_cache(cache)
    latent = manifest.latent
    if (latent["channels"], latent["size"]) != (mc.in_channels, mc.input_size):
        raise UsageError(f"--cache {cache} holds {latent['channels']}x{latent['size']}x{latent['size']} latents, the "
                         f"checkpoint's SiT takes {mc.in_channels}x{mc.input_size}x{mc.input_size}; pass a cache "
                         "encoded with the VAE and resolution the checkpoint was trained with")
    model = build_model(mc)
    for name, state in (("model", model_sd), ("ema", ema_sd)):
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise UsageError(f"{path}: its {name} weights do not fit the SiT they describe (missing "
                             f"{missing[:3]}, unexpected {unexpected[:3]})")
    config = {"repa_lambda": 0.5 if mc.repa else 0.0,
              "method": "reg" if mc.class_token_dim else "irepa" if mc.projector_type == "conv" else "repa",
              "repa_args": {k: v for k, v in args.items() if isinstance(v, (int, float, str, bool, type(None)))}}
    ckpt = write_imported_run(path, run_dir, cache, manifest, step=step, model=model_sd, ema=ema_sd, model_config=mc,
                              parameters=count_parameters(model), val_fraction=val_fraction, config=config)
    log(f"imported {path} (step {step}, {mc.preset or 'SiT'} width {mc.width} depth {mc.depth}, "
        f"{count_parameters(model) / 1e6:.2f} M params) as {ckpt}")
    return ckpt
