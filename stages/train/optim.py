"""The optimiser and its learning-rate schedule, including repa-rf's recipe as named options.

``repa-rf-mup`` parameter groups (cloneofsimo/repa-rf, ``get_mup_setup``): parameters whose name contains
``bias`` or ``norm``, and the model's input-side parameters (repa-rf's ``patch_proj``, ``context_kv``,
``positional_embedding``), get lr x 0.1 and no weight decay; every other parameter gets lr x 32 / fan_in
and weight decay x fan_in / 1024, fan_in being its last dimension. ``repa-rf-cosine`` is transformers'
``get_cosine_schedule_with_warmup``: a linear warmup from 0 (the first step runs at lr 0), then a cosine
to 0 at the last step. ``linear-decay`` is RAE's stage-2 schedule: constant, a linear decay, constant.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from .config import TrainConfig

PARAM_TABLE_FILE = "param_groups.tsv"


def parameter_table(model: torch.nn.Module, rule: str, lr: float, weight_decay: float) -> list[dict]:
    """lr and weight decay of every trainable parameter under ``rule`` (uniform or repa-rf-mup)."""
    inputs = getattr(model, "input_params", ())
    table = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        p_lr, p_wd = lr, weight_decay
        if rule == "repa-rf-mup":
            if any(s in name for s in ("bias", "norm")) or any(s in name for s in inputs):
                p_lr, p_wd = lr * 0.1, 0.0
            else:
                fan_in = p.shape[-1]
                p_lr, p_wd = lr * 32 / fan_in, weight_decay * fan_in / 1024
        table.append({"name": name, "shape": list(p.shape), "lr": p_lr, "weight_decay": p_wd})
    return table


def make_optimizer(cfg: TrainConfig, model: torch.nn.Module, device: torch.device):
    """AdamW over parameter groups of equal (lr, weight decay), and the lr schedule; also the table."""
    table = parameter_table(model, cfg.param_groups, cfg.lr, cfg.weight_decay)
    params = dict(model.named_parameters())
    groups: dict[tuple[float, float], list] = {}
    for row in table:  # groups in order of their first parameter, as repa-rf builds them
        groups.setdefault((row["lr"], row["weight_decay"]), []).append(params[row["name"]])
    optimizer = torch.optim.AdamW(
        [{"params": ps, "lr": lr, "weight_decay": wd} for (lr, wd), ps in groups.items()],
        lr=cfg.lr, betas=(cfg.adam_betas[0], cfg.adam_betas[1]), weight_decay=cfg.weight_decay,
        fused=device.type == "cuda",
    )
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg)), table


def lr_factor(cfg: TrainConfig):
    """The schedule as a multiple of each group's lr, by optimizer step (0-based)."""
    warmup = cfg.warmup_steps or (cfg.steps // 10 if cfg.lr_schedule == "repa-rf-cosine" else 0)

    def factor(step: int) -> float:
        if cfg.lr_schedule == "repa-rf-cosine":
            if step < warmup:
                return step / max(1, warmup)
            progress = (step - warmup) / max(1, cfg.steps - warmup)
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
        if warmup and step < warmup:
            return (step + 1) / warmup
        if cfg.lr_schedule == "linear-decay":
            return linear_decay(step, cfg.lr_decay_start, cfg.lr_decay_end or cfg.steps, cfg.final_lr / cfg.lr)
        if cfg.lr_schedule == "cosine":
            progress = (step - warmup) / max(cfg.steps - warmup, 1)
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        return 1.0

    return factor


def linear_decay(step: int, start: int, end: int, final: float) -> float:
    """RAE's schedule (``utils/optim_utils.py``, LinearWarmupDecayScheduler without warmup) as a factor of the
    lr: 1 up to ``start``, then linearly down to ``final`` at ``end``, ``final`` after."""
    if step <= start:
        return 1.0
    if step >= end:
        return final
    return 1.0 + (final - 1.0) * (step - start) / (end - start)


def write_parameter_table(run_dir: Path, table: list[dict]) -> Path:
    path = Path(run_dir) / PARAM_TABLE_FILE
    lines = ["name\tshape\tlr\tweight_decay"]
    lines += [f"{r['name']}\t{'x'.join(map(str, r['shape']))}\t{r['lr']:.6g}\t{r['weight_decay']:.6g}" for r in table]
    path.write_text("\n".join(lines) + "\n")
    return path
