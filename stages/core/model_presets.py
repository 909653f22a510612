"""Named model shapes, kept free of torch so the CLI can list and check them without importing it.

Class-conditional ImageNet shapes from the DiT/SiT papers; ``align_layer`` is the REPA paper's choice
(1-based: the output of that block is aligned).
"""

from __future__ import annotations

_SIT_SIZES: dict[str, dict] = {
    "B": dict(depth=12, width=768, num_heads=12, align_layer=4),
    "L": dict(depth=24, width=1024, num_heads=16, align_layer=8),
    "XL": dict(depth=28, width=1152, num_heads=16, align_layer=8),
}

MODEL_PRESETS: dict[str, dict] = {
    f"SiT-{size}/{patch}": {**shape, "patch_size": patch}
    for size, shape in _SIT_SIZES.items()
    for patch in (2, 4, 8)
}
