"""Seeds derived from positions (seed, rank, step, ...), so any random draw can be replayed alone.

Resume, validation noise, preview noise and per-image sampling noise all use these, so each draw is
a pure function of where it happens rather than of how many draws came before.
"""

from __future__ import annotations

import numpy as np
import torch


def derive_seed(*values: int) -> int:
    """A 64-bit seed that depends on every value in order (numpy's SeedSequence mixing)."""
    return int(np.random.SeedSequence([int(v) for v in values]).generate_state(1, dtype=np.uint64)[0])


def generator(*values: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator on ``device`` seeded with ``derive_seed(*values)``."""
    return torch.Generator(device=device).manual_seed(derive_seed(*values))
