"""Human-readable summary of a cache (what `repa cache info` prints)."""

from __future__ import annotations

from cache_schema.format.manifest import Manifest, field_from_json


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1024
    return f"{n:.1f} TiB"


def _src(m: Manifest, role: str) -> str:
    e = m.encoders.get(role, {})
    where = e.get("id", "?") + (f" (subfolder {e['subfolder']})" if e.get("subfolder") else "")
    weights = m.settings.get(role, {}).get("weights", "")
    return f"{where} [weights {weights[:12]}]" if weights else where


def _filters(m: Manifest) -> list[str]:
    """One line naming each encode-time filter and how many samples it removed, and the similarity model."""
    filters = m.settings.get("filters") or {}
    removed = m.filter_counts()
    shown = {"keep": lambda v: " ".join(f"--keep '{rule}'" for rule in v), "min_size": lambda v: f"--min-size {v}",
             "min_similarity": lambda v: f"--min-similarity {v}"}
    lines = []
    if filters:
        lines.append("filters      " + "; ".join(f"{shown[k](v)} removed {removed.get(k, 0)}"
                                               for k, v in filters.items() if k in shown))
    if m.settings.get("similarity_model"):
        lines.append(f"similarity   {_src(m, 'similarity_model')}  (stored per sample)")
    return lines


def describe(manifest: Manifest) -> list[str]:
    m = manifest
    per_sample = m.bytes_per_sample()
    total = sum(p.get("bytes", 0) for p in m.parts)
    s = m.settings
    lines = [
        f"samples      {m.num_samples}",
        f"parts        {len(m.parts)}",
        f"skipped      {len(m.skipped)}" + "".join(f"  {r}={c}" for r, c in sorted(m.skip_counts().items())),
        *_filters(m),
        f"status       {m.completeness()}",
        f"fingerprint  {m.fingerprint}  (schema v{m.schema_version})",
        f"resolution   {s['resolution']}  crop={s['crop']}  dtype={s['dtype']}  codec={s['feature_codec']}",
        "flips        " + ("on: moments and every target also stored for the horizontally flipped crop (*_flip)"
                           if m.flips else "off"),
        f"vae          {_src(m, 'vae')}  latent {m.latent['channels']}x{m.latent['size']}x{m.latent['size']}"
        + (f"  normalised per channel by the VAE's latents_mean/latents_std ({len(m.latent['latents_mean'])} each)"
           if m.latent.get("latents_mean") is not None
           else f"  scale={m.latent['scaling_factor']} shift={m.latent['shift_factor']}"),
        f"dino         {_src(m, 'dino')}  {m.dino['tokens']} tokens x {m.dino['dim']}  grid {m.dino['grid']}",
        f"text         {_src(m, 'text_encoder') if s.get('text_encoder') else 'none'}"
        + (f"  dim {m.text['dim']}  max tokens {m.text['max_tokens']}" if m.text else ""),
        *(f"target       {name}: {t['encoder']['id']}  {t['kind']}  {t['tokens']} tokens x {t['dim']}  grid {t['grid']}"
          f"  {_fmt_bytes(sum(field_from_json(n, f).bytes_per_row for n, f in t['fields'].items() if n != 'key'))}"
          "/sample" for name, t in sorted(m.targets.items())),
        "",
        f"{'field':<14}{'dtype':<9}{'shape per row':<18}{'bytes/sample':>14}",
    ]
    for name, spec in m.fields.items():
        f = field_from_json(name, spec)
        shape = "x".join(map(str, f.inner_shape)) or "scalar"
        if not f.per_sample:
            shape += " per token"
        b = per_sample.get(name)
        lines.append(f"{name:<14}{f.dtype:<9}{shape:<18}{'-' if b is None else _fmt_bytes(b):>14}")
    n = max(m.num_samples, 1)
    lines += [
        f"{'total (fixed-size fields)':<41}{_fmt_bytes(sum(per_sample.values())):>14}",
        f"on disk      {_fmt_bytes(total)}  ({_fmt_bytes(total / n)} per sample incl. metadata)",
    ]
    return lines
