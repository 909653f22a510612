"""`repa sample`: images from a trained run, conditioned on prompts, class ids or nothing.

Everything the run already knows comes from its checkpoint (weights, model shape, conditioning)
and the manifest of the cache it trained on (VAE, text encoder, maximum caption tokens, latent
scaling), so a user passes only what to draw and how.

Reproducibility: image ``i`` starts from noise drawn by a CPU generator seeded with (seed, i), the
SDE sampler draws image ``i``'s per-step noise from its own generator seeded with (seed, i, 1), and
process ``r`` of ``world`` takes the images ``i ≡ r (mod world)``: every sampler gives the same image
``i`` whatever the number of processes or the batch size.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
import torch
from torch import Tensor

from cache_schema import Manifest
from cache_schema.storage.fsutil import atomic_write_json
from stages.core.data.codec import dequantize_int8, quantize_int8
from stages.core.diffusion.diffusion_variable import TargetTokens
from stages.core.diffusion.family import JointState
from stages.core.diffusion.samplers import DEFAULT_STEPS, STOCHASTIC, guided, sample
from stages.core.errors import UsageError
from stages.core.files.checkpoint import latest_checkpoint, load_checkpoint
from stages.core.files.run_files import CKPT_DIR
from stages.core.model.ddt_config import DDTConfig, LightningDiTConfig
from stages.core.model.model_config import ModelConfig
from stages.core.model.network import Network, TextNetwork, build_model
from stages.core.options import check
from stages.core.runtime.progress import progress_bar
from stages.core.runtime.seeding import generator
from stages.core.runtime.threads import set_threads

from .config import GRID_MAX_IMAGES, SampleConfig, SamplingOptions
from .decode import (
    IMAGE_NAME,
    LatentDecoder,
    check_outputs,
    grid_picture,
    real_images,
    resolve_cache,
    save_png,
    write_grid,
)
from .rae_decode import TokenDecoder, check_sampler, load_run_decoder, real_token_images, sample_tokens

REFERENCE_MAX_IMAGES = 16
SIDECAR = "samples.json"
GRID = "grid.png"
REFERENCE = "reference.png"

#################################################################################
#                             Loading a trained run                             #
#################################################################################


@dataclass
class LoadedRun:
    """A run's sampling model and everything it knows about its data."""

    model: Network
    cond: str  # "class", "text" or "none"
    checkpoint: Path
    step: int
    ema: bool
    cache: Path
    manifest: Manifest
    train_config: dict  # the TrainConfig the run was trained with, as JSON
    variable: TargetTokens | None = None  # a --diffuse run's variable (RAE); None: VAE latents

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        # The network's own config: ModelConfig (SiT, repa-rf) or an RAE network's, all naming the shape alike.
        c = cast("ModelConfig | DDTConfig | LightningDiTConfig", self.model.config)
        return c.in_channels, c.input_size, c.input_size

    def record(self) -> dict:
        return {"checkpoint": str(self.checkpoint), "step": self.step, "ema": self.ema}


def load_run(
    run_dir: Path, checkpoint: Path | None = None, cache: Path | None = None, ema: bool = True,
    device: torch.device | str = "cpu",
) -> LoadedRun:
    """The newest checkpoint of ``run_dir`` (or ``checkpoint``) as an eval-mode model on ``device``."""
    if checkpoint is None:
        if not Path(run_dir).is_dir():
            raise UsageError(f"--run-dir {run_dir}: no such run directory")
        checkpoint = latest_checkpoint(run_dir)
        if checkpoint is None:
            raise UsageError(
                f"--run-dir {run_dir}: no checkpoint in {Path(run_dir) / CKPT_DIR}; "
                "train longer (one is written every --ckpt-every steps) or pass --checkpoint FILE"
            )
    ckpt = load_checkpoint(checkpoint)
    cache_dir, manifest = resolve_cache(ckpt["cache"], cache, ckpt.get("fingerprint"))
    model = build_model(ModelConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["ema" if ema else "model"])
    del model.projectors[:]  # REPA's projectors only serve the training loss
    model.to(device).eval().requires_grad_(False)
    variable = TargetTokens.from_record(ckpt["diffusion"]) if ckpt.get("diffusion") else None
    return LoadedRun(model, ckpt["cond"], Path(checkpoint), int(ckpt["step"]), ema, cache_dir, manifest, ckpt["config"],
                     variable)


#################################################################################
#                                  Conditioning                                 #
#################################################################################


class TextEncoder:
    """The cache's text encoder, producing exactly what training read from the cache.

    Tokenised and encoded as at encode time (``max_tokens``, truncation, right padding, with or
    without the attention mask as the cache's ``text_attention`` says), positions the cache does not
    store zeroed, and rounded through the cache's feature codec (fp16, or int8 with a per-token scale).
    """

    def __init__(self, manifest: Manifest, device: torch.device):
        from stages.core.encoders.load import ModelSource, load_text_encoder

        source = manifest.encoders.get("text_encoder")
        if source is None or manifest.text is None:
            raise UsageError("the cache manifest names no text encoder; this run cannot encode prompts")
        dtype = torch.bfloat16 if device.type == "cuda" and manifest.settings.get("dtype") == "bf16" else torch.float32
        self.tokenizer, self.encoder = load_text_encoder(ModelSource(**source), dtype, device)
        self.max_tokens = int(manifest.text["max_tokens"])
        self.attention = manifest.settings.get("text_attention", "masked")  # caches made before the option
        self.codec = manifest.codec
        self.device = device

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        from stages.core.encoders.captions import encode_captions

        hidden, mask = encode_captions(
            self.tokenizer, self.encoder, prompts, self.max_tokens, self.device, attention=self.attention
        )
        hidden = hidden.float() * mask[..., None]
        if self.codec == "int8":
            hidden = dequantize_int8(*quantize_int8(hidden))
        return hidden.half().float(), mask.bool()


class Conditions:
    """The conditioning of image ``i``: entry ``i % len(entries)`` (prompts or class ids), or nothing
    (unconditional runs)."""

    def __init__(self, entries: list | None = None):
        self.entries = entries or [None]

    def entry(self, index: int):
        return self.entries[index % len(self.entries)]

    def batch(self, indices: list[int]) -> dict[str, Tensor]:
        return {}

    def null(self) -> dict[str, Tensor]:
        return {}

    def describe(self, index: int) -> dict:
        return {}

    def caption(self, index: int) -> str | None:
        """What image ``index`` was asked to show, in words (None: unconditional)."""
        return None


class ClassConditions(Conditions):
    """Class ids; the null condition is the model's extra null class."""

    def __init__(self, labels: list[int], model: Network, device: torch.device):
        super().__init__([int(x) for x in labels])
        self.null_class, self.device = model.null_class, device

    def batch(self, indices: list[int]) -> dict[str, Tensor]:
        return {"y": torch.tensor([self.entry(i) for i in indices], device=self.device)}

    def null(self) -> dict[str, Tensor]:
        return {"y": torch.tensor([self.null_class], device=self.device)}

    def describe(self, index: int) -> dict:
        return {"class": self.entry(index)}

    def caption(self, index: int) -> str:
        return f"class {self.entry(index)}"


class PromptConditions(Conditions):
    """Captions embedded by ``encoder(prompts) -> (text, mask)`` (None: a subclass gives its own batches); the
    null is the model's learned null caption."""

    def __init__(self, prompts: list[str], model: Network, encoder: TextEncoder | None):
        if not isinstance(model, TextNetwork):  # a run's cond is "text" only for these families
            raise TypeError(f"a {type(model).__name__} takes no captions")
        super().__init__(list(prompts))
        self.model, self.encoder = model, encoder

    def batch(self, indices: list[int]) -> dict[str, Tensor]:
        if self.encoder is None:
            raise TypeError(f"{type(self).__name__} has no text encoder: it must give its own batch()")
        text, mask = self.encoder([self.entry(i) for i in indices])
        return {"text": text, "text_mask": mask}

    def null(self) -> dict[str, Tensor]:
        text, mask = self.model.null_text(1, 1)
        return {"text": text.float(), "text_mask": mask}

    def describe(self, index: int) -> dict:
        return {"prompt": self.entry(index)}

    def caption(self, index: int) -> str:
        return self.entry(index)


def read_prompts(cfg: SampleConfig) -> list[str]:
    if cfg.prompts is None:
        return list(cfg.prompt)
    try:
        lines = Path(cfg.prompts).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--prompts {cfg.prompts}: cannot read it ({e})") from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise UsageError(f"--prompts {cfg.prompts}: no prompt in the file (one per line)")
    return prompts


def parse_classes(spec: str | None, num_classes: int, count: int, seed: int) -> list[int]:
    """``1,2,3`` as given, or ``random`` (also when ``spec`` is None): ``count`` ids drawn from ``seed``."""
    if spec is None or spec.strip().lower() == "random":
        return np.random.default_rng(seed).integers(0, num_classes, size=count).tolist()
    try:
        ids = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--classes {spec!r}: give comma-separated class ids (1,2,3) or random") from None
    bad = [i for i in ids if not 0 <= i < num_classes]
    if not ids or bad:
        raise UsageError(f"--classes {spec!r}: ids must lie in [0, {num_classes}) for this run")
    return ids


def held_out_ids(run: LoadedRun) -> np.ndarray:
    """The run's held-out samples in cache order (its first samples when it held none out)."""
    from cache_schema import CacheReader
    from stages.core.data.split import split_ids

    reader = CacheReader(run.cache)
    _, held = split_ids(reader.keys, float(run.train_config.get("val_fraction") or 0.0))
    return held if len(held) else np.arange(len(reader))


def held_out_conditions(run: LoadedRun, count: int, device: torch.device) -> Conditions:
    """The captions or class ids of the first ``count`` held-out samples (``--held-out``)."""
    from cache_schema import CacheReader

    if run.cond not in ("text", "class"):
        raise UsageError(f"--held-out: {run.checkpoint} is an unconditional run; it takes no conditioning")
    reader = CacheReader(run.cache)
    samples = [reader.sample(int(i)) for i in held_out_ids(run)[:count]]
    if run.cond == "text":
        return PromptConditions([s["caption"] for s in samples], run.model, TextEncoder(run.manifest, device))
    return ClassConditions([int(s["label"]) for s in samples], run.model, device)


def sample_conditions(cfg: SampleConfig, run: LoadedRun, device: torch.device) -> Conditions:
    """What `repa sample` conditions on, checked against what the run was trained for."""
    if cfg.held_out:
        return held_out_conditions(run, cfg.num_samples, device)
    has_prompts = cfg.prompts is not None or bool(cfg.prompt)
    if run.cond == "text":
        if cfg.classes is not None:
            raise UsageError(f"--classes: {run.checkpoint} is a text-conditioned run; "
                             "pass --prompts FILE or --prompt TEXT")
        if not has_prompts:
            raise UsageError(f"{run.checkpoint} is a text-conditioned run: pass --prompts FILE or --prompt TEXT")
        return PromptConditions(read_prompts(cfg), run.model, TextEncoder(run.manifest, device))
    if has_prompts:
        option = "--prompts" if cfg.prompts is not None else "--prompt"
        raise UsageError(f"{option}: {run.checkpoint} is a {run.cond}-conditioned run, not a text one; "
                         + ("pass --classes" if run.cond == "class" else "it takes no conditioning"))
    if run.cond == "class":
        labels = parse_classes(cfg.classes, run.model.config.num_classes, cfg.num_samples, cfg.seed)
        return ClassConditions(labels, run.model, device)
    if cfg.classes is not None:
        raise UsageError(f"--classes: {run.checkpoint} is an unconditional run; it takes no conditioning")
    return Conditions()


#################################################################################
#                                    Sampling                                   #
#################################################################################


def image_noise(seed: int, indices: list[int], shape: tuple[int, ...]) -> Tensor:
    """Starting noise (B, *shape): row ``k`` from a CPU generator seeded with (seed, indices[k])."""
    return torch.stack([torch.randn(shape, generator=generator(seed, i)) for i in indices])


def sampling_record(options: SamplingOptions) -> dict:
    """How the images were made, as written next to them and into eval.jsonl."""
    steps = DEFAULT_STEPS[options.sampler] if options.steps is None else options.steps
    return {"sampler": options.sampler, "steps": steps, "cfg": options.guidance_scale, "interval": options.interval}


def process_indices(count: int, rank: int, world: int) -> list[int]:
    """The image indices process ``rank`` of ``world`` makes: ``i ≡ rank (mod world)``."""
    return list(range(rank, count, world))


def chunks(items: list[int], size: int) -> list[list[int]]:
    return [items[k : k + size] for k in range(0, len(items), size)]


class ImageSampler:
    """Latents, then uint8 images, for batches of image indices."""

    def __init__(self, run: LoadedRun, options: SamplingOptions, conditions: Conditions, device: torch.device):
        if run.cond == "none" and options.guidance_scale != 1.0:
            raise UsageError(f"--guidance-scale {options.guidance_scale}: {run.checkpoint} is unconditional; "
                             "guidance needs a conditional run")
        self.run, self.options, self.conditions, self.device = run, options, conditions, device
        if run.variable is not None:
            check_sampler(options.sampler, run.variable)
            decoder = load_run_decoder(options.rae_decoder, options.rae_decoder_config, run.variable, device)
            self.decoder: TokenDecoder | LatentDecoder = TokenDecoder(run.variable, decoder, device)
        else:
            self.decoder = LatentDecoder(run.manifest, device)
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext())
        cls_dim = getattr(run.model.config, "class_token_dim", 0)
        self.joint = JointState(run.latent_shape, cls_dim) if cls_dim else None  # REG: the class token too

    def _velocity(self, x: Tensor, t: Tensor, cond: Mapping[str, Tensor]) -> Tensor:
        with self.autocast:
            if self.joint is not None:
                return self.joint.velocity(self.run.model, x, t, cond)
            return self.run.model(x, t, **cond)[0].float()

    @torch.no_grad()
    def latents(self, indices: list[int]) -> Tensor:
        o = self.options
        noise = image_noise(o.seed, indices, self.run.latent_shape).to(self.device)
        if self.joint is not None:
            cls = torch.stack([torch.randn(self.joint.dim, generator=generator(o.seed, i, 2)) for i in indices])
            noise = self.joint.pack(noise, cls.to(self.device))
        fn = guided(self._velocity, self.conditions.batch(indices), self.conditions.null(), o.guidance_scale,
                    o.guidance_low, o.guidance_high)
        generators = None
        if o.sampler in STOCHASTIC:
            generators = [generator(o.seed, i, 1, device=self.device) for i in indices]
        if self.run.variable is not None:
            return sample_tokens(fn, noise, self.run.variable, o.sampler, o.steps)
        out = sample(fn, noise, o.sampler, o.steps, generator=generators)
        return out if self.joint is None else self.joint.unpack(out)[0]

    def images(self, indices: list[int]) -> Tensor:
        """uint8 (B, 3, H, W) on the sampling device."""
        return self.decoder(self.latents(indices))


def reference_images(run: LoadedRun, decoder: LatentDecoder | TokenDecoder, count: int) -> tuple[np.ndarray, list[str]]:
    """Real images of the cache through the same VAE (the run's held-out samples, else its first ones),
    uint8 (N, H, W, 3), and their captions: the best the samples can look with this VAE (or RAE decoder)."""
    if isinstance(decoder, TokenDecoder):
        return real_token_images(run.cache, held_out_ids(run)[:count], decoder)
    return real_images(run.cache, held_out_ids(run)[:count], decoder)


#################################################################################
#                                 `repa sample`                                 #
#################################################################################


@dataclass
class SampleResult:
    out: Path
    images: list[Path]
    grid: Path  # captioned with each image's prompt or class
    sidecar: Path
    reference: Path  # real images of the cache through the same VAE, captioned


def _clear_previous(out: Path) -> None:
    """--overwrite: drop the images, grids and sidecar of an earlier run, so no stale image survives."""
    for p in out.iterdir():
        if re.fullmatch(r"\d{6}\.png", p.name) or p.name in (GRID, REFERENCE, SIDECAR):
            p.unlink()


def sidecar_entries(cfg: SampleConfig, run: LoadedRun, conditions: Conditions) -> list[dict]:
    made = {**sampling_record(cfg), **run.record()}
    return [{"file": IMAGE_NAME.format(i), "index": i, **conditions.describe(i), "seed": cfg.seed, **made}
            for i in range(cfg.num_samples)]


def run_sample(cfg: SampleConfig, log=print) -> SampleResult:
    from accelerate import PartialState

    check(cfg)
    state = PartialState(cpu=not torch.cuda.is_available())
    set_threads(cfg.threads, 0)
    device, main = state.device, state.is_main_process
    run = load_run(cfg.run_dir, cfg.checkpoint, cfg.cache, cfg.ema, device)
    out = Path(cfg.out) if cfg.out is not None else Path(cfg.run_dir) / "samples" / f"step-{run.step:07d}"
    files = [out / IMAGE_NAME.format(i) for i in range(cfg.num_samples)]
    grid, sidecar, reference = out / GRID, out / SIDECAR, out / REFERENCE
    check_outputs([*files, grid, sidecar, reference], cfg.overwrite)
    if main:
        try:
            out.mkdir(parents=True, exist_ok=True)
            (out / f".probe-{os.getpid()}").touch()
            (out / f".probe-{os.getpid()}").unlink()
        except OSError as e:
            raise UsageError(f"--out {out}: not writable ({e.strerror}); choose another --out") from None
    conditions = sample_conditions(cfg, run, device)
    sampler = ImageSampler(run, cfg, conditions, device)
    if main:
        if cfg.overwrite:
            _clear_previous(out)
        log(f"sample: {cfg.num_samples} images from {run.checkpoint} (step {run.step}, {'EMA' if run.ema else 'raw'}), "
            f"{cfg.sampler} {sampling_record(cfg)['steps']} steps, guidance scale {cfg.guidance_scale} on t in "
            f"{cfg.interval}, {state.num_processes} process(es)")
    state.wait_for_everyone()  # the folder exists and holds nothing stale before any process writes

    mine = process_indices(cfg.num_samples, state.process_index, state.num_processes)
    with progress_bar(total=len(mine), unit="img", disable=not main, dynamic_ncols=True, desc="sample") as bar:
        for batch in chunks(mine, cfg.batch_size):
            for i, image in zip(batch, sampler.images(batch).cpu(), strict=True):
                save_png(image, files[i])
            bar.update(len(batch))
    state.wait_for_everyone()
    if main:
        shown = files[:GRID_MAX_IMAGES]
        write_grid(shown, grid, [conditions.caption(i) for i in range(len(shown))])
        real, real_captions = reference_images(run, sampler.decoder, min(len(shown), REFERENCE_MAX_IMAGES))
        grid_picture(list(real), real_captions).save(reference)
        atomic_write_json(sidecar, {"images": sidecar_entries(cfg, run, conditions), "grid": grid.name,
                                    "reference": reference.name})
        through = "RAE decoder" if run.variable is not None else "VAE"
        log(f"wrote {len(files)} images, {grid.name}, {reference.name} (real images through the same {through}) and "
            f"{sidecar.name} to {out}")
    return SampleResult(out, files, grid, sidecar, reference)
