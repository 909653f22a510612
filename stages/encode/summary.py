"""What an encode (or an added target) reports when it ends."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class EncodeSummary:
    encoded: int = 0
    parts: int = 0
    skipped: Counter = field(default_factory=Counter)
    seconds: float = 0.0
    steady_rate: float = 0.0  # img/s of this process from its first batch to its last (no start-up, no final commits)
    cache_samples: int = 0
    lines: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.encoded / self.seconds if self.seconds > 0 else 0.0
