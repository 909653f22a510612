"""Loading the encoders from a Hub id or a local folder (anything saved with ``save_pretrained``).

Used by the encode and sample stages only; training never imports this package.
Every failure becomes an ``EncoderLoadError`` with one line naming the model and the fix.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UsageError
from . import library_noise

library_noise.install()

DINO_MODEL_TYPES = ("dinov2", "dinov2_with_registers")
T5_MODEL_TYPES = ("t5", "mt5", "umt5")
CLIP_MODEL_TYPES = ("clip", "clip_text_model")


class EncoderLoadError(UsageError):
    """An encoder could not be loaded; the message says which and what to do."""


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: a Hub id or a folder, optionally a subfolder and a revision."""

    id: str
    subfolder: str | None = None
    revision: str | None = None

    def describe(self) -> str:
        return self.id + (f" (subfolder {self.subfolder})" if self.subfolder else "")

    def kwargs(self) -> dict:
        kw = {}
        if self.subfolder:
            kw["subfolder"] = self.subfolder
        if self.revision:
            kw["revision"] = self.revision
        return kw

    def to_json(self) -> dict:
        return {"id": self.id, "subfolder": self.subfolder, "revision": self.revision}


def _fail(role: str, src: ModelSource, err: Exception) -> EncoderLoadError:
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    local = Path(src.id).exists()
    hint = (
        "check the folder holds a model saved with save_pretrained"
        if local
        else "check the Hub id, your network or HF_HOME cache, or pass a local folder"
    )
    return EncoderLoadError(f"cannot load {role} '{src.describe()}': {reason[:300]}; {hint}")


def torch_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]
    except KeyError:
        raise UsageError(f"unknown --dtype {name!r}; choose auto, bf16, fp16 or fp32") from None


# -- configs only (no weights): what --dry-run and the manifest need -------------------------------
def vae_config(src: ModelSource) -> dict:
    from diffusers import AutoencoderKL

    try:
        return dict(AutoencoderKL.load_config(src.id, **src.kwargs()))
    except Exception as e:
        raise _fail("VAE", src, e) from e


def hf_config(role: str, src: ModelSource):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(src.id, **src.kwargs())
    except Exception as e:
        raise _fail(role, src, e) from e


def vae_geometry(cfg: dict) -> dict:
    """Latent channels, spatial downsampling and the scale/shift training applies to sampled latents.

    A config with per-channel ``latents_mean`` and ``latents_std`` (REPA-E's diffusers releases carry the
    statistics their SiT normalises with) adds both; training then uses them instead of the scalar pair.
    """
    geometry = {
        "channels": int(cfg["latent_channels"]),
        "downsample": 2 ** (len(cfg["block_out_channels"]) - 1),
        "scaling_factor": float(cfg.get("scaling_factor") or 1.0),
        "shift_factor": float(cfg.get("shift_factor") or 0.0),
    }
    mean, std = cfg.get("latents_mean"), cfg.get("latents_std")
    if mean is None and std is None:
        return geometry
    name = cfg.get("_name_or_path") or "the VAE"
    c = geometry["channels"]
    if mean is None or std is None or len(mean) != c or len(std) != c or min(float(v) for v in std) <= 0:
        raise EncoderLoadError(
            f"VAE '{name}': latents_mean and latents_std in its config must both hold {c} values (std > 0); "
            "fix its config.json or remove both to use scaling_factor/shift_factor"
        )
    return {**geometry, "latents_mean": [float(v) for v in mean], "latents_std": [float(v) for v in std]}


def dino_geometry(cfg, resolution: int) -> dict:
    if cfg.model_type not in DINO_MODEL_TYPES:
        raise EncoderLoadError(
            f"'{cfg._name_or_path}' is a {cfg.model_type} model, not DINOv2; pass e.g. facebook/dinov2-base"
        )
    size = dino_input_size(resolution)
    grid = size // cfg.patch_size
    return {
        "dim": int(cfg.hidden_size),
        "patch_size": int(cfg.patch_size),
        "input_size": size,
        "grid": [grid, grid],
        "tokens": grid * grid,
        "registers": int(getattr(cfg, "num_register_tokens", 0) or 0),
    }


def dino_input_size(resolution: int) -> int:
    """224 px per 256 px of crop, as in REPA: the DINOv2 patch grid then matches the latent token grid."""
    return 224 * resolution // 256


def text_geometry(cfg) -> dict:
    if cfg.model_type in T5_MODEL_TYPES:
        return {"dim": int(cfg.d_model), "kind": "t5"}
    if cfg.model_type in CLIP_MODEL_TYPES:
        text_cfg = getattr(cfg, "text_config", cfg)
        return {"dim": int(text_cfg.hidden_size), "kind": "clip"}
    raise EncoderLoadError(
        f"'{cfg._name_or_path}' is a {cfg.model_type} model; the text encoder must be a T5 encoder or a CLIP text model"
    )


# -- full models ----------------------------------------------------------------------------------
def load_vae(src: ModelSource, dtype: torch.dtype, device: torch.device):
    from diffusers import AutoencoderKL

    try:
        vae = AutoencoderKL.from_pretrained(src.id, torch_dtype=dtype, **src.kwargs())
    except Exception as e:
        raise _fail("VAE", src, e) from e
    return vae.to(device).eval().requires_grad_(False)


def load_dino(src: ModelSource, dtype: torch.dtype, device: torch.device, pos_embed_grid: list[int] | None = None,
              pos_embed: str = "antialias-once"):
    """DINOv2 (with or without registers); with ``pos_embed_grid`` its position embedding is resampled
    once to that patch grid by ``pos_embed`` (see :func:`resample_position_embedding`)."""
    from transformers import AutoModel

    cfg = hf_config("DINOv2", src)
    if cfg.model_type not in DINO_MODEL_TYPES:
        raise EncoderLoadError(f"'{src.describe()}' is a {cfg.model_type} model, not DINOv2; "
                               "pass e.g. facebook/dinov2-base")
    try:
        # Resample from the checkpoint's float32 table, as official REPA does, before casting to ``dtype``.
        model = AutoModel.from_pretrained(src.id, dtype=torch.float32 if pos_embed_grid else dtype, **src.kwargs())
    except Exception as e:
        raise _fail("DINOv2", src, e) from e
    if pos_embed_grid:
        resample_position_embedding(model, pos_embed_grid, pos_embed)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


# DINOv2's own interpolation (facebookresearch/dinov2 ``interpolate_pos_encoding``): the output size is
# floor(M * (g + offset) / M) = g, but the source coordinates follow the given scale factor, so the
# offset moves every sample point. Its register models were released with offset 0 and antialias.
DINO_INTERPOLATE_OFFSET = 0.1


def resample_position_embedding(model, grid: list[int] | tuple[int, int], method: str = "antialias-once") -> None:
    """Replace the (1, 1 + n*n, D) position table of a DINOv2 model by one for a ``grid`` patch grid, once.

    ``antialias-once`` (official REPA, timm's ``resample_abs_pos_embed`` with its defaults): the patch part
    bicubic to the grid size with antialias, align_corners=False. ``bicubic-per-call``: what DINOv2's own
    forward computes on every call for an input of that grid: for DINOv2 bicubic without antialias at
    ``scale_factor = (g + 0.1) / n`` (repa-rf's ``dinov2.py``), for DINOv2 with registers bicubic
    with antialias to the grid size. Either way in float32 with the CLS entry kept as is (registers carry no
    position embedding), and written here rather than left to transformers, whose per-call formula changed
    between versions. transformers then adds the installed table unchanged, because its per-call
    ``interpolate_pos_encoding`` returns the table as is when the patch count matches and the input is square.
    """
    emb = model.embeddings
    table = emb.position_embeddings
    h, w = (int(g) for g in grid)
    if h != w:
        raise EncoderLoadError(f"DINOv2 patch grid {h}x{w} is not square; the encode stage crops square images")
    dim = table.shape[-1]
    n = math.isqrt(table.shape[1] - 1)
    if n * n != table.shape[1] - 1:
        raise EncoderLoadError(f"DINOv2 position table of {table.shape[1] - 1} patches is not a square grid")
    if n != h:
        patches = table[:, 1:].detach().float().reshape(1, n, n, dim).permute(0, 3, 1, 2)
        patches = resampled_patch_table(patches, h, method, model.config.model_type)
        patches = patches.permute(0, 2, 3, 1).reshape(1, h * w, dim).to(table.dtype)
        emb.position_embeddings = torch.nn.Parameter(torch.cat([table[:, :1].detach(), patches], dim=1),
                                                     requires_grad=False)
    # A transformers version whose early return differs would interpolate the installed table again.
    patch = emb.patch_embeddings.patch_size
    probe = table.new_zeros(1, 1 + h * w, dim)
    if emb.interpolate_pos_encoding(probe, h * patch[0], w * patch[1]) is not emb.position_embeddings:
        raise EncoderLoadError(
            "this transformers version re-interpolates DINOv2's position embedding even when the patch count "
            "matches, so the resampled table would be resampled again; install another transformers version"
        )


def resampled_patch_table(patches: torch.Tensor, grid: int, method: str, model_type: str = "dinov2") -> torch.Tensor:
    """(1, D, n, n) float32 patch position table -> (1, D, grid, grid) by ``method`` (see above)."""
    F = torch.nn.functional
    if method == "bicubic-per-call" and model_type == "dinov2":
        scale = (grid + DINO_INTERPOLATE_OFFSET) / patches.shape[-1]
        return F.interpolate(patches, scale_factor=(scale, scale), mode="bicubic", align_corners=False)
    if method in ("antialias-once", "bicubic-per-call"):
        return F.interpolate(patches, size=(grid, grid), mode="bicubic", antialias=True, align_corners=False)
    raise UsageError(f"unknown --dino-pos-embed {method!r}; choose antialias-once or bicubic-per-call")


def load_text_encoder(src: ModelSource, dtype: torch.dtype, device: torch.device):
    """(tokenizer, encoder) for a T5 encoder or a CLIP text model."""
    from transformers import (
        AutoTokenizer,
        CLIPTextModel,
        PreTrainedModel,
        T5EncoderModel,
        UMT5EncoderModel,
    )

    cfg = hf_config("text encoder", src)
    kind = text_geometry(cfg)["kind"]
    cls: type[PreTrainedModel] = {"t5": T5EncoderModel, "clip": CLIPTextModel}[kind]
    if cfg.model_type == "umt5":
        cls = UMT5EncoderModel
    try:
        tokenizer = AutoTokenizer.from_pretrained(src.id, **_tokenizer_kwargs(src))
        model = cls.from_pretrained(src.id, dtype=dtype, **src.kwargs())
    except Exception as e:
        raise _fail("text encoder", src, e) from e
    module: torch.nn.Module = model  # PreTrainedModel.to is typed through @wraps(nn.Module.to), unbound
    return tokenizer, module.to(device).eval().requires_grad_(False)


def _tokenizer_kwargs(src: ModelSource) -> dict:
    # Pipelines such as FLUX keep the tokenizer in a sibling subfolder ("text_encoder_2" -> "tokenizer_2").
    kw = src.kwargs()
    if src.subfolder and src.subfolder.startswith("text_encoder"):
        kw["subfolder"] = src.subfolder.replace("text_encoder", "tokenizer", 1)
    return kw


def weights_hash(model: torch.nn.Module) -> str:
    """Content hash of a model's parameters and buffers: identifies the weights wherever they came from."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().reshape(-1).contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
