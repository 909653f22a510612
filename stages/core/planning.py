"""What a real run costs before it starts: cache bytes from the real shapes (``cache_schema.format.sizes``), encode and
train time from rates measured on one H100 80GB (bf16, real architectures, random weights: the reference points
in BENCHMARKS.md), memory from the measured anchors. `repa encode --dry-run` and docs/planning.md use
these functions, so the two cannot disagree. Every number says what it is estimated from."""

from __future__ import annotations

from dataclasses import dataclass

from cache_schema.format.sizes import caption_tokens, sample_bytes, token_bytes

# Encoder images/s on one H100 (batch 64-256, 256 px): (rate, what was measured).
VAE_RATES = {  # by latent channels: SD-VAE has 4, FLUX's VAE 16
    (4, True): (1265.0, "SD-VAE encoder, torch.compile"),
    (4, False): (506.0, "SD-VAE encoder, eager"),
    (16, True): (505.0, "FLUX VAE encoder, eager (compiled not measured)"),
    (16, False): (505.0, "FLUX VAE encoder, eager"),
}
DINO_RATES = {768: (6724.0, "DINOv2-B/14 at 224 px"), 1024: (2404.0, "DINOv2-L/14"), 1536: (691.0, "DINOv2-G/14")}
# Train images/s per GPU with the inputs on the GPU (the cache-fed loop reaches it: BENCHMARKS.md, bench-train).
TRAIN_RATES = {
    ("SiT-XL/2", True): (507.0, "SiT-XL/2 + REPA step, batch 64, torch.compile"),
    ("SiT-XL/2", False): (378.0, "SiT-XL/2 + REPA step, batch 64, eager"),
    ("dit-512x9", False): (1534.0, "the repa-rf-size DiT (width 512, depth 9, 101 M, cross-attention to 512 T5 "
                                   "tokens), eager"),
}
TRAIN_GPU_MEMORY = {"SiT-XL/2": "52 GiB peak at batch 128 per GPU (measured; 256 per GPU does not fit in 80 GB)"}
# The training process and each loader worker at 12 M samples (bench-scale, BENCHMARKS.md).
HOST_PROCESS_MIB, HOST_WORKER_MIB = 679, 235


@dataclass(frozen=True)
class Geometry:
    """The shapes a cache's bytes follow from (read from the models' configs)."""

    latent_channels: int
    latent_size: int
    dino_tokens: int
    dino_dim: int
    text_dim: int | None = None
    text_tokens: int = 0
    class_tokens: int = 0  # DINOv2's class (and register) tokens, stored for REG

    def bytes(self, codec: str, flips: bool = False) -> int:
        return sum(sample_bytes(self.latent_channels, self.latent_size, self.dino_tokens, self.dino_dim, codec,
                                self.text_dim, self.text_tokens, flips=flips, class_tokens=self.class_tokens).values())


def encode_rate(geometry: Geometry, compiled: bool) -> tuple[float | None, str]:
    """Images/s of one GPU running the VAE then DINOv2 on each batch (their times add); None when an encoder
    was not measured."""
    vae = VAE_RATES.get((geometry.latent_channels, compiled))
    dino = DINO_RATES.get(geometry.dino_dim)
    if vae is None or dino is None:
        return None, "no measured rate for these encoders"
    rate = 1 / (1 / vae[0] + 1 / dino[0])
    basis = f"{vae[1]} {vae[0]:.0f} img/s + {dino[1]} {dino[0]:.0f} img/s"
    if geometry.text_dim:
        basis += "; the text encoder's time is not included (not measured)"
    return rate, basis


def train_rate(model: str, compiled: bool) -> tuple[float | None, str]:
    for key in ((model, compiled), (model, False)):
        if key in TRAIN_RATES:
            rate, basis = TRAIN_RATES[key]
            return rate, basis + ("" if key == (model, compiled) else " (compiled not measured)")
    return None, "no measured rate for this model"


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 360 else f"{seconds / 60:.0f} min"


def _size(n: float) -> str:
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n / 1024:.1f} KiB"


def encode_lines(geometry: Geometry, samples: int | None, codec: str, flips: bool, compiled: bool,
                 gpus: int = 8) -> list[tuple[str, str, str]]:
    """(quantity, value, estimated from) rows for a cache of ``samples`` samples."""
    rows = []
    for c in ("fp16", "int8"):
        plain, flipped = geometry.bytes(c), geometry.bytes(c, flips=True)
        mark = " (this cache)" if c == codec else ""
        rows.append((f"bytes/sample {c}{mark}", f"{_size(plain)}; with flips {_size(flipped)}",
                     "the stored arrays' shapes"))
        if samples:
            rows.append((f"cache size {c}{mark}", f"{_size(plain * samples)}; with flips {_size(flipped * samples)}",
                         f"{samples:,} samples"))
    rate, basis = encode_rate(geometry, compiled)
    if rate and samples:
        images = samples * (2 if flips else 1)
        rows.append(("encode", f"{images / rate / 3600:.1f} GPU-hours; {_hours(images / rate / gpus)} on {gpus} GPUs",
                     f"{rate:.0f} img/s per GPU ({basis})"))
    else:
        rows.append(("encode", "not estimated", basis))
    return rows


def target_lines(name: str, tokens: int, dim: int, samples: int | None) -> list[tuple[str, str, str]]:
    """Rows for an added alignment target's patch tokens (fp16, as RAE's latent needs), with and without flips."""
    one = token_bytes(tokens, dim, "fp16")
    rows = [(f"bytes/sample of target {name}", f"{_size(one)} fp16; with flips {_size(2 * one)}",
             f"{tokens} tokens x {dim} x 2 B")]
    if samples:
        rows.append((f"target {name} for all samples", f"{_size(one * samples)}; with flips {_size(2 * one * samples)}",
                     f"{samples:,} samples"))
    return rows


def train_lines(model: str, compiled: bool, steps: int, batch_size: int, workers: int,
                gpus: int = 8) -> list[tuple[str, str, str]]:
    rate, basis = train_rate(model, compiled)
    rows = []
    if rate:
        seconds = steps * batch_size / (rate * gpus)
        rows.append(("train", f"{rate:.0f} img/s per GPU; {steps:,} steps x {batch_size} in {_hours(seconds)} on "
                              f"{gpus} GPUs ({seconds * gpus / 3600:.1f} GPU-hours)", basis))
    else:
        rows.append(("train", "not estimated", basis))
    rows.append(("GPU memory", TRAIN_GPU_MEMORY.get(model, "not measured"), "bench/train_gpu.sh"))
    ram = HOST_PROCESS_MIB + workers * HOST_WORKER_MIB
    rows.append(("host RAM per GPU process", f"~{ram / 1024:.1f} GiB ({workers} loader workers)",
                 f"{HOST_PROCESS_MIB} MiB per training process + {HOST_WORKER_MIB} MiB per worker at 12 M samples"))
    return rows


def geometry_of(latent_channels: int, downsample: int, resolution: int, dino_dim: int, dino_patch: int,
                text_dim: int | None, max_text_tokens: int, unmasked: bool, class_tokens: int = 0) -> Geometry:
    """The cache geometry of an encode at ``resolution`` (DINOv2 input 224 px per 256, as the encode stage)."""
    grid = (224 * resolution // 256) // dino_patch
    return Geometry(latent_channels, resolution // downsample, grid * grid, dino_dim, text_dim,
                    caption_tokens(max_text_tokens, unmasked) if text_dim else 0, class_tokens)
