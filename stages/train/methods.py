"""`repa train --method NAME`: REPA and its successors as sets of training options, over the same cache.

A method expands to the settings its official code publishes (docs/methods.md cites each); every option
given on its own overrides the method's value, and config.json holds the expanded settings. Methods
compose with ``+`` (e.g. ``reg+irepa``): each part sets its own options, a later part wins where two set the
same one, and a composition in which no part aligns (``dispersive`` alone) trains without REPA.
"""

from __future__ import annotations

from stages.core.errors import UsageError

# The options a method sets, with the value each takes when no part of the method sets it.
NEUTRAL = {
    "repa_lambda": 0.0,
    "class_token_weight": 0.0,
    "projector": "mlp",
    "projector_kernel": 1,
    "target_norm": "none",
    "zscore_alpha": 0.6,
    "dispersive_lambda": 0.0,
    "dispersive_tau": 1.0,
    "dispersive_layer": 0,
    "align_stop": 0,
}

LAST_BLOCK = "last"

METHODS: dict[str, dict] = {
    # SiT (rectified flow, no alignment)
    "sit": {"repa_lambda": 0.0},
    # sihyun-yu/REPA train.py: --proj-coeff 0.5, --encoder-depth 8 (the model preset's align layer)
    "repa": {"repa_lambda": 0.5},
    # Martinser/REG train.sh: --proj-coeff 0.5 --cls 0.03, target [class token, patch tokens]
    "reg": {"repa_lambda": 0.5, "class_token_weight": 0.03},
    # End2End-Diffusion/iREPA ldm/configs/irepa.yaml (conv projector, zscore, proj_coeff 1.0) and ldm/train.py's
    # defaults it leaves alone (--proj-kwargs-kernel-size 1, --zscore-alpha 0.6)
    "irepa": {"repa_lambda": 1.0, "projector": "conv", "projector_kernel": 1, "target_norm": "zscore",
              "zscore_alpha": 0.6},
    # Wang & He's PyTorch code: 0.25 * disp_loss(act[-1]), no temperature (tau 1)
    "dispersive": {"dispersive_lambda": 0.25, "dispersive_tau": 1.0, "dispersive_layer": LAST_BLOCK},
    # NUS-HPC-AI-Lab/HASTE scripts/run.sh: --proj-coeff 0.5 --early-stop-point 250000 (its attention
    # distillation needs DINOv2's attention maps, which no cache holds)
    "haste": {"repa_lambda": 0.5, "align_stop": 250_000},
}
ALIGNING = {"repa", "reg", "irepa", "haste"}


def method_parts(method: str) -> list[str]:
    parts = [p.strip() for p in method.split("+")]
    unknown = [p for p in parts if p not in METHODS]
    if unknown or not parts:
        raise UsageError(f"--method {method}: unknown method {unknown[0] if unknown else method!r}; choose "
                         f"{', '.join(METHODS)}, or compose them with + (e.g. reg+irepa)")
    if "sit" in parts and len(parts) > 1:
        raise UsageError(f"--method {method}: sit is the model without alignment; compose the other methods alone "
                         "(e.g. dispersive)")
    if len(set(parts)) != len(parts):
        raise UsageError(f"--method {method}: name each method once")
    return parts


def method_settings(method: str, depth: int | None) -> dict:
    """The options ``method`` sets (every key of NEUTRAL); ``depth`` (the model's) resolves the last block."""
    parts = method_parts(method)
    out = dict(NEUTRAL)
    for part in parts:
        out.update(METHODS[part])
    if not ALIGNING & set(parts):
        out["repa_lambda"] = 0.0
    if out["dispersive_layer"] == LAST_BLOCK:
        out["dispersive_layer"] = depth or 0
    return out


def family_model_fields(cfg, manifest, repa: bool) -> dict:
    """The ModelConfig fields a method needs, after checking the cache holds what it reads."""
    names = cfg.target_names()
    first = names[0]
    fields = {"projector_type": cfg.projector, "projector_kernel": cfg.projector_kernel,
              "hidden_layer": cfg.dispersive_layer if cfg.dispersive_lambda > 0 else 0}
    if cfg.class_token_weight > 0:
        for name in names if repa else [first]:
            if f"{name}_cls" not in manifest.target(name)["fields"]:
                how = (f"`repa encode --cache {cfg.cache} --add-target {name} ... --class-tokens`" if name != first
                       else "`repa encode --class-tokens`, or add it as a target with `repa encode --add-target NAME "
                            "--class-tokens` and train with --targets NAME")
                raise UsageError(f"--method {cfg.method} (--class-token-weight {cfg.class_token_weight}): cache "
                                 f"{cfg.cache} stores no class token of target {name}; encode it with {how}")
        fields["class_token_dim"] = manifest.target(first)["dim"]
    if repa and cfg.projector == "conv":
        for name in names:
            rows, cols = manifest.target(name)["grid"]
            if rows != cols:
                raise UsageError(f"--projector conv: target {name} of cache {cfg.cache} has a {rows}x{cols} token "
                                 f"grid, the conv projector needs a square one; re-encode it with `repa encode "
                                 f"--add-target {name} --target-input-size N` for a square grid, or use "
                                 "--projector mlp")
    return fields
