"""Named model shapes, kept free of torch so the CLI can list and check them without importing it.

SiT: class-conditional ImageNet shapes from the DiT/SiT papers; ``align_layer`` is the REPA paper's choice
(1-based: the output of that block is aligned). repa-rf: repa-rf's CC12M DiT at the widths of its
sweep (depth 9, 64 channels per head), aligned after block 7 (its hard-coded block index 6). DiT-DH and
LightningDiT: RAE's networks (``stages.core.model.ddt``, ``lightning_dit_model``) at patch 1, the body's shape
in width/depth/num_heads and DiT-DH's wide head in head_*; they take no REPA projector (align_layer unused).
"""

from __future__ import annotations

from stages.core.model.ddt_config import DDT_PRESETS

_SIT_SIZES: dict[str, dict] = {
    "B": dict(depth=12, width=768, num_heads=12, align_layer=4),
    "L": dict(depth=24, width=1024, num_heads=16, align_layer=8),
    "XL": dict(depth=28, width=1152, num_heads=16, align_layer=8),
}

MODEL_PRESETS: dict[str, dict] = {
    **{
        f"SiT-{size}/{patch}": {"arch": "sit", **shape, "patch_size": patch}
        for size, shape in _SIT_SIZES.items()
        for patch in (1, 2, 4, 8)
    },
    **{
        f"repa-rf-w{width}": dict(arch="repa-rf", depth=9, width=width, head_dim=64, patch_size=2, align_layer=7)
        for width in (512, 1024, 2048)
    },
    **{
        name: dict(arch="dit-dh", width=shape["hidden_size"][0], depth=shape["depth"][0],
                   num_heads=shape["num_heads"][0], head_width=shape["hidden_size"][1], head_depth=shape["depth"][1],
                   head_heads=shape["num_heads"][1], patch_size=1)
        for name, shape in DDT_PRESETS.items()
    },
    **{
        f"LightningDiT-{size}/1": {"arch": "lightning-dit", **{k: v for k, v in shape.items() if k != "align_layer"},
                                   "patch_size": 1}
        for size, shape in _SIT_SIZES.items()
    },
}
