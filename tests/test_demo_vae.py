"""The demo VAE fitted to the demo images keeps what the demo's prompts name: each shape's colour, where it is."""

from __future__ import annotations

import shutil

import numpy as np
import torch
from diffusers import AutoencoderKL

from stages.core.encoders.images import center_crop_adm
from stages.demo.data import COLOURS, make_sample
from stages.demo.fit_vae import block_colour_init, fit_demo_vae

RES = 64  # the demo preset's resolution


def nearest_colour(rgb: np.ndarray) -> str:
    return min(COLOURS, key=lambda name: float(np.sum((np.array(COLOURS[name], float) - rgb) ** 2)))


def shape_colours(vae: AutoencoderKL, samples: list) -> tuple[list[str], list[str], list[str]]:
    """For every shape: its colour, the nearest named colour at its centre in the crop and in the VAE's
    reconstruction of the crop (the mean of the 3x3 pixels around the centre)."""
    crops = np.stack([center_crop_adm(image.convert("RGB"), RES) for image, *_ in samples])
    x = torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        rec = vae.decode(vae.encode(x).latent_dist.mean).sample
    rec = ((rec.clamp(-1, 1) + 1) * 127.5).permute(0, 2, 3, 1).numpy()
    truth, crop_said, rec_said = [], [], []
    for k, (image, _, shapes, _) in enumerate(samples):
        w, h = image.size
        scale = RES / min(w, h)  # where the ADM crop puts a pixel (to within a pixel)
        top, left = (round(h * scale) - RES) // 2, (round(w * scale) - RES) // 2
        for s in shapes:
            cx, cy = round(s.centre[0] * scale) - left, round(s.centre[1] * scale) - top
            if not (1 <= cx < RES - 1 and 1 <= cy < RES - 1):
                continue  # cropped away
            truth.append(s.colour)
            crop_said.append(nearest_colour(crops[k, cy - 1 : cy + 2, cx - 1 : cx + 2].reshape(-1, 3).mean(0)))
            rec_said.append(nearest_colour(rec[k, cy - 1 : cy + 2, cx - 1 : cx + 2].reshape(-1, 3).mean(0)))
    return truth, crop_said, rec_said


def test_fitted_demo_vae_keeps_each_shapes_colour_where_a_random_one_does_not(tiny_models, demo_shards, tmp_path):
    vae_dir = tmp_path / "vae-demo"
    shutil.copytree(tiny_models["vae-demo"], vae_dir)
    random_vae = AutoencoderKL.from_pretrained(vae_dir).eval()
    losses = fit_demo_vae(vae_dir, str(demo_shards[0].parent / "cc12m-train-{0000..0002}.tar"), RES, steps=4,
                          batch_size=8)
    fitted = AutoencoderKL.from_pretrained(vae_dir).eval()  # saved in place, loadable as before
    assert len(losses) == 4 and all(np.isfinite(losses))
    # zero-mean, unit-variance latents for the diffusion model
    means = []
    for image, *_ in [make_sample(0, 0, i) for i in range(16)]:
        x = torch.tensor(center_crop_adm(image.convert("RGB"), RES)).permute(2, 0, 1)[None].float() / 127.5 - 1
        with torch.no_grad():
            means.append(fitted.encode(x).latent_dist.mean[:, :3])
    z = (torch.cat(means) - fitted.config.shift_factor) * fitted.config.scaling_factor
    assert abs(float(z.mean())) < 0.3 and 0.7 < float(z.std()) < 1.4

    samples = [make_sample(7, 0, i) for i in range(48)]  # images it was not fitted on
    truth, crop_said, fitted_said = shape_colours(fitted, samples)
    _, _, random_said = shape_colours(random_vae, samples)
    # large enough to survive 64 px
    visible = [i for i, (t, c) in enumerate(zip(truth, crop_said, strict=True)) if t == c]
    assert len(visible) > 30

    def agreement(said):
        return sum(said[i] == truth[i] for i in visible) / len(visible)

    assert agreement(fitted_said) >= 0.8, list(zip(truth, fitted_said, strict=True))
    assert agreement(random_said) < 0.4  # the property is not free


def test_block_colour_start_is_the_8x8_block_mean():
    from stages.demo.tiny_encoders import tiny_vae

    vae = block_colour_init(tiny_vae(4, 0.18215, norm_groups=1)).eval()
    x = torch.rand(2, 3, 32, 48) * 2 - 1
    with torch.no_grad():
        posterior = vae.encode(x).latent_dist
        rec = vae.decode(posterior.mean).sample
    blocks = torch.nn.functional.avg_pool2d(x, 8)
    torch.testing.assert_close(posterior.mean[:, :3], blocks, atol=5e-3, rtol=0)
    torch.testing.assert_close(rec, torch.nn.functional.interpolate(blocks, scale_factor=8), atol=1e-2, rtol=0)
    assert float(posterior.std.max()) < 0.01
