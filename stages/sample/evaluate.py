"""`repa evaluate`: FID, Inception Score and an optional CLIP score for a run's samples.

Samples are conditioned on the held-out split (its captions' cached features for text runs, its
labels for class runs), made with the same options as `repa sample`, and compared with statistics
of the held-out source images (see ``reference``). Each evaluation appends one JSON line to
``RUN_DIR/eval.jsonl``.

Why this implementation. torchvision is not available, and torch-fidelity, clean-fid and
pytorch-fid all import it, so the metrics are torchmetrics' ``FrechetInceptionDistance`` and
``InceptionScore`` (which need torch-fidelity only for their built-in network) with a custom
feature network: NVIDIA's TorchScript translation of the TensorFlow Inception graph
``inception-2015-12-05``, the network StyleGAN2-ADA, StyleGAN3, EDM and EDM2 report FID with. It
takes uint8 NCHW images and resizes them to 299 px itself; ``return_features=True`` gives the
2048-d pool features for FID, and ``no_output_bias=True`` class probabilities computed without the
output bias, as the original Inception Score code did. torchmetrics sums its states over processes,
so multi-GPU evaluation needs no extra code.

Caveat: REPA's paper numbers come from ADM's TensorFlow evaluator (the same Inception graph, but
TensorFlow's resize and ADM's reference batches, e.g. VIRTUAL_imagenet256_labeled.npz). Numbers
from here track them closely but are not identical: compare runs with each other, and run ADM's
evaluator on saved samples (`repa sample`) for tables next to the paper's.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import Metric

from cache_schema import FastReader
from stages.core.data.codec import features_to_device
from stages.core.errors import UsageError
from stages.core.files.run_files import EVAL_FILE, append_jsonl, read_run_config
from stages.core.model.conditioning import Conditioner
from stages.core.options import check
from stages.core.runtime.progress import progress_bar
from stages.core.runtime.threads import set_threads

from .config import EvaluateConfig
from .decode import check_outputs, resolve_cache
from .reference import FeatureStats, HeldOut, held_out, image_batches, source_images, source_locations
from .run import (
    ClassConditions,
    Conditions,
    ImageSampler,
    LoadedRun,
    PromptConditions,
    chunks,
    load_run,
    process_indices,
    sampling_record,
)

INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
IS_SPLITS = 10

#################################################################################
#                              The Inception network                            #
#################################################################################


def inception_file(weights: Path | None) -> Path:
    """``weights``, or NVIDIA's network in the torch hub cache (downloaded there on first use)."""
    if weights is not None:
        if not Path(weights).is_file():
            raise UsageError(f"--inception-weights {weights}: no such file")
        return Path(weights)
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(INCEPTION_URL).path).name
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(INCEPTION_URL, str(path), progress=False)
        except Exception as e:  # URLError, HTTPError, timeouts, a full disk: all mean "not here"
            raise UsageError(
                f"cannot download the Inception network ({type(e).__name__}: {e}); fetch {INCEPTION_URL} "
                "on a connected machine and pass --inception-weights FILE"
            ) from None
    return path


def load_inception(weights: Path | None, device: torch.device) -> torch.jit.ScriptModule:
    path = inception_file(weights)
    try:
        return torch.jit.load(str(path), map_location=device).eval()
    except Exception as e:
        raise UsageError(f"--inception-weights {path}: not a TorchScript network ({type(e).__name__}: {e})") from None


class InceptionFeatures(nn.Module):
    """Pool features (N, num_features) of uint8 (N, 3, H, W) images: torchmetrics' FID feature network."""

    def __init__(self, net: torch.jit.ScriptModule):
        super().__init__()
        self.net = net
        probe = torch.zeros(1, 3, 32, 32, dtype=torch.uint8, device=next(net.parameters()).device)
        with torch.no_grad():
            self.num_features = int(net(probe, return_features=True).shape[-1])  # 2048 for NVIDIA's network

    def forward(self, images: Tensor) -> Tensor:
        return self.net(images, return_features=True)


class InceptionLogProbs(nn.Module):
    """Log class probabilities: torchmetrics' IS applies a softmax, which turns them back into the probabilities."""

    def __init__(self, net: torch.jit.ScriptModule):
        super().__init__()
        self.net = net

    def forward(self, images: Tensor) -> Tensor:
        return self.net(images, no_output_bias=True).float().clamp_min(1e-30).log()


def fid_metric(net: torch.jit.ScriptModule, device: torch.device):
    from torchmetrics.image.fid import FrechetInceptionDistance

    return FrechetInceptionDistance(feature=InceptionFeatures(net), reset_real_features=False).to(device)


def reference_stats(held: HeldOut, where: dict[str, str], manifest, net, device: torch.device, batch_size: int,
                    rank: int = 0, world: int = 1) -> FeatureStats:
    """Statistics of the held-out source images (read where ``source_locations`` says); process ``rank``
    reads every ``world``-th shard, several at once, with a progress bar on the main process."""
    fid = fid_metric(net, device)
    urls = sorted(set(held.sources))[rank::world]
    images = source_images(held, urls, manifest, where, progress=rank == 0)
    for batch in image_batches(images, batch_size):
        fid.update(batch.to(device), real=True)
    return FeatureStats.from_fid(fid)


#################################################################################
#                                   CLIP score                                  #
#################################################################################


class ClipScore(Metric):
    """Mean of 100 · max(cos(image embedding, caption embedding), 0), as torchmetrics' CLIPScore.

    torchmetrics' own CLIPScore reads ``get_image_features`` as a tensor, which transformers 5
    returns inside a model output, hence this small metric.
    """

    higher_is_better = True
    full_state_update = False
    total: Tensor  # states registered with add_state
    count: Tensor

    def __init__(self, source: str, device: torch.device):
        super().__init__()
        from transformers import CLIPModel, CLIPProcessor

        from stages.core.encoders.load import EncoderLoadError

        try:
            # transformers wraps .to with functools.wraps, which typeshed does not bind to the instance
            model = CLIPModel.from_pretrained(source)
            self.model = model.to(device).eval().requires_grad_(False)  # type: ignore[arg-type]
            self.processor = CLIPProcessor.from_pretrained(source)
        except Exception as e:
            raise EncoderLoadError(
                f"--clip-model {source}: cannot load a CLIP model and processor ({e})"[:400]) from None
        self.max_tokens = self.model.config.text_config.max_position_embeddings
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0), dist_reduce_fx="sum")

    @staticmethod
    def _embedding(out) -> Tensor:
        return out if isinstance(out, Tensor) else out.pooler_output

    def update(self, images: Tensor, captions: list[str]) -> None:
        device = self.model.device
        pixels = self.processor(images=list(images.cpu()), return_tensors="pt")["pixel_values"].to(device)
        tokens = self.processor(text=captions, padding=True, truncation=True, max_length=self.max_tokens,
                                return_tensors="pt")
        image_emb = self._embedding(self.model.get_image_features(pixel_values=pixels))
        text_emb = self._embedding(self.model.get_text_features(
            input_ids=tokens["input_ids"].to(device), attention_mask=tokens["attention_mask"].to(device)))
        cosine = F.cosine_similarity(image_emb.float(), text_emb.float(), dim=-1)
        self.total += (100 * cosine.clamp_min(0)).double().sum()
        self.count += len(captions)

    def compute(self) -> Tensor:
        return self.total / self.count


#################################################################################
#                           Held-out conditioning                               #
#################################################################################


class CachedCaptions(PromptConditions):
    """Held-out captions with the caption features the cache stores for them: what training read."""

    def __init__(self, held: HeldOut, cache: Path, run: LoadedRun, device: torch.device):
        super().__init__(held.captions, run.model, encoder=None)
        self.ids, self.device = held.ids, device
        self.reader = FastReader(cache)
        self.conditioner = Conditioner("text", run.model, 0.0)

    def batch(self, indices: list[int]) -> dict[str, Tensor]:
        ids = np.array([int(self.ids[i % len(self.ids)]) for i in indices], dtype=np.int64)
        tokens, scales, lengths = self.reader.read_text(ids, padded=True)
        batch = {"text": torch.from_numpy(tokens),
                 "text_mask": torch.from_numpy(np.arange(tokens.shape[1]) < lengths[:, None])}
        if scales is not None:
            batch["text_scale"] = torch.from_numpy(scales)
        return self.conditioner(features_to_device(batch, self.device))


def held_out_conditions(run: LoadedRun, held: HeldOut, device: torch.device) -> Conditions:
    if run.cond == "text":
        return CachedCaptions(held, run.cache, run, device)
    if run.cond == "class":
        return ClassConditions(held.labels, run.model, device)
    return Conditions()


#################################################################################
#                                `repa evaluate`                                #
#################################################################################


def make_reference(cfg: EvaluateConfig, out: Path, state, log=print) -> Path:
    """``--make-reference``: statistics of the run's held-out source images, written to ``out`` (an .npz)."""
    check_outputs([out], cfg.overwrite)
    info = read_run_config(cfg.run_dir)
    cache, manifest = resolve_cache(info["config"]["cache"], cfg.cache, info.get("cache_fingerprint"))
    held = held_out(cache, info["config"]["val_fraction"])
    where = source_locations(held, cfg.source)  # before any model loads: a refused source fails fast
    with state.main_process_first():
        net = load_inception(cfg.inception_weights, state.device)
    stats = reference_stats(held, where, manifest, net, state.device, cfg.batch_size, state.process_index,
                            state.num_processes)
    if state.is_main_process:
        stats.save(out)
        log(f"wrote statistics of {stats.n} held-out images of {cache} to {out}")
    return out


def run_evaluate(cfg: EvaluateConfig, log=print) -> dict | Path:
    """Evaluate a run (the result is also appended to eval.jsonl), or with ``make_reference`` write statistics."""
    from accelerate import PartialState
    from torchmetrics.image.inception import InceptionScore

    check(cfg)
    state = PartialState(cpu=not torch.cuda.is_available())
    set_threads(cfg.threads, 0)
    if cfg.make_reference is not None:
        return make_reference(cfg, Path(cfg.make_reference), state, log)
    device, main, rank, world = state.device, state.is_main_process, state.process_index, state.num_processes
    reference = FeatureStats.load(cfg.reference) if cfg.reference is not None else None  # a bad file fails first
    run = load_run(cfg.run_dir, cfg.checkpoint, cfg.cache, cfg.ema, device)
    if cfg.clip_model and run.cond != "text":
        raise UsageError(f"--clip-model: {run.checkpoint} is a {run.cond}-conditioned run; a CLIP score needs captions")
    held = held_out(run.cache, run.train_config["val_fraction"])
    where = source_locations(held, cfg.source) if reference is None else {}
    with state.main_process_first():
        net = load_inception(cfg.inception_weights, device)
    conditions = held_out_conditions(run, held, device)
    sampler = ImageSampler(run, cfg, conditions, device)
    clip = ClipScore(cfg.clip_model, device) if cfg.clip_model else None

    reference_name = str(cfg.reference) if reference is not None else f"held-out:{run.cache}"
    if reference is None:
        log(f"evaluate: reference statistics from {len(held)} held-out source images of {run.cache}")
        reference = reference_stats(held, where, run.manifest, net, device, cfg.batch_size, rank, world)
    fid = fid_metric(net, device)
    reference.load_into(fid, main)
    with warnings.catch_warnings():  # it keeps every image's probabilities: 200 MB for 50 000 images, by design
        warnings.filterwarnings("ignore", message=".*will save all extracted features")
        inception_score = InceptionScore(feature=InceptionLogProbs(net), splits=min(IS_SPLITS, cfg.num_samples))
    inception_score = inception_score.to(device)

    mine = process_indices(cfg.num_samples, rank, world)
    with progress_bar(total=len(mine), unit="img", disable=not main, dynamic_ncols=True, desc="evaluate") as bar:
        for batch in chunks(mine, cfg.batch_size):
            images = sampler.images(batch)
            fid.update(images, real=False)
            inception_score.update(images)
            if clip is not None:
                clip.update(images, [conditions.entry(i) for i in batch])
            bar.update(len(batch))

    torch.manual_seed(cfg.seed)  # InceptionScore shuffles its splits with the global generator
    is_mean, is_std = inception_score.compute()
    record = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **run.record(), "n": cfg.num_samples, **sampling_record(cfg),
        "seed": cfg.seed, "fid": float(fid.compute()), "is_mean": float(is_mean), "is_std": float(is_std),
        "reference": reference_name, "reference_n": reference.n,
    }
    if clip is not None:
        record["clip_score"] = float(clip.compute())
        record["clip_model"] = cfg.clip_model
    if main:
        path = append_jsonl(Path(cfg.run_dir) / EVAL_FILE, record, durable=True)
        log(f"FID {record['fid']:.3f}, IS {record['is_mean']:.2f} ± {record['is_std']:.2f}"
            + (f", CLIP score {record['clip_score']:.2f}" if clip is not None else "") + f" -> {path}")
    return record
