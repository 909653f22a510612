"""`repa import-checkpoint`: another codebase's checkpoint as a run of this project (REPA, REG, iREPA: a SiT on
the cache's VAE latents, ``import_repa``; RAE stage 2: a DiT-DH on a target's tokens, ``import_rae``)."""

from __future__ import annotations

from pathlib import Path

from stages.core.errors import UsageError

from .import_rae import import_rae_checkpoint, is_rae_stage2
from .import_repa import import_repa_checkpoint
from .imported_run import load_import_file


def import_checkpoint(path: Path, run_dir: Path, cache: Path, *, num_heads: int | None = None,
                      model: str | None = None, diffuse: str | None = None, diffuse_stats: Path | None = None,
                      val_fraction: float = 0.0, log=print) -> Path:
    """`repa import-checkpoint`: the file is read once and says what it is (a DiT-DH's weights are RAE's, any
    other SiT weights REPA's, REG's or iREPA's); options of the other kind are refused. Returns the checkpoint."""
    path = Path(path)
    contents = load_import_file(path)
    if is_rae_stage2(contents):
        if num_heads is not None:
            raise UsageError(f"--num-heads: {path} is an RAE stage-2 DiT-DH, whose head counts its RoPE tables give; "
                             "leave --num-heads out")
        return import_rae_checkpoint(contents, path, run_dir, cache, diffuse, diffuse_stats, model, val_fraction,
                                     log=log)
    given = [name for name, value in (("--model", model), ("--diffuse", diffuse), ("--diffuse-stats", diffuse_stats))
             if value is not None]
    if given:
        raise UsageError(f"{given[0]}: {path} holds no DiT-DH (RAE stage 2) but SiT weights (REPA, REG, iREPA), "
                         f"whose shape the file gives; leave {', '.join(given)} out")
    return import_repa_checkpoint(contents, path, run_dir, cache, num_heads, val_fraction, log=log)
