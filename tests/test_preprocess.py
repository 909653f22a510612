"""Image preprocessing of stage one: colour modes, the ADM crop, skip reasons, and the DINOv2 recipe."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from stages.core.encoders.features import IMAGENET_MEAN, IMAGENET_STD, dino_preprocess
from stages.core.encoders.images import (
    Prepared,
    Skipped,
    center_crop_adm,
    decode_image,
    prepare_sample,
    to_rgb,
)


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_rgba_composites_on_white_and_grayscale_replicates():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red
    assert np.asarray(to_rgb(rgba))[0, 0].tolist() == [255, 255, 255]
    half = Image.new("RGBA", (4, 4), (0, 0, 0, 128))
    assert abs(int(np.asarray(to_rgb(half))[0, 0, 0]) - 127) <= 1
    gray = Image.new("L", (4, 4), 77)
    assert np.asarray(to_rgb(gray))[0, 0].tolist() == [77, 77, 77]


def test_sixteen_bit_grayscale_is_scaled_not_clipped():
    arr = np.full((8, 8), 32768, dtype=np.uint16)
    img = Image.open(io.BytesIO(_encode(Image.fromarray(arr), "PNG")))
    assert img.mode.startswith("I")
    assert abs(int(np.asarray(to_rgb(img))[0, 0, 0]) - 128) <= 1


def test_palette_with_transparency_and_cmyk_jpeg():
    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([10, 20, 30] + [0] * 765)
    pal.info["transparency"] = 0
    assert np.asarray(to_rgb(pal))[0, 0].tolist() == [255, 255, 255]
    cmyk = Image.new("CMYK", (64, 64), (0, 255, 255, 0))  # pure red in CMYK
    out = decode_image(_encode(cmyk, "JPEG", quality=95), 32, 10**8, draft=False)
    r, g, b = out[16, 16].astype(int)
    assert r > 200 and g < 60 and b < 60


def test_adm_crop_matches_the_recipe_by_hand():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (300, 700, 3), dtype=np.uint8))
    res = 64
    # by hand: 300 >= 128 -> halve to 350x150; 150 >= 128 -> halve to 175x75; then bicubic to short side 64
    step = img.resize((350, 150), Image.BOX).resize((175, 75), Image.BOX)
    step = step.resize((round(175 * 64 / 75), 64), Image.BICUBIC)
    w = step.size[0]
    expected = np.asarray(step)[:, (w - 64) // 2 : (w - 64) // 2 + 64]
    np.testing.assert_array_equal(center_crop_adm(img, res), expected)


def test_draft_decode_is_close_to_full_decode():
    rng = np.random.default_rng(1)
    smooth = np.kron(rng.integers(0, 256, (40, 60, 3)), np.ones((32, 32, 1))).astype(np.uint8)
    data = _encode(Image.fromarray(smooth), "JPEG", quality=95)
    full = decode_image(data, 128, 10**8, draft=False).astype(float)
    fast = decode_image(data, 128, 10**8, draft=True).astype(float)
    assert full.shape == fast.shape == (128, 128, 3)
    assert np.abs(full - fast).mean() < 6.0


@pytest.mark.parametrize(
    "sample, reason",
    [
        ({"txt": b"no image"}, "missing-image"),
        ({"jpg": b"not a jpeg at all"}, "decode-error"),
        ({"jpg": "TRUNCATED"}, "truncated-image"),
        ({"jpg": "TINY"}, "too-small"),
        ({"jpg": "HUGE"}, "too-large"),
        ({"jpg": "OK", "txt": b"\xff\xfe bad utf8"}, "bad-caption"),
        ({"jpg": "OK", "json": b"{not json"}, "bad-caption"),
        ({"jpg": "OK", "cls": b"seven"}, "bad-label"),
    ],
)
def test_bad_samples_are_skipped_with_their_reason(sample, reason):
    rng = np.random.default_rng(2)
    good = _encode(Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)), "JPEG")
    images = {
        "OK": good,
        "TRUNCATED": good[: len(good) // 2],
        "TINY": _encode(Image.new("RGB", (7, 7)), "PNG"),
        "HUGE": _encode(Image.new("RGB", (200, 200)), "PNG"),
    }
    sample = {k: images.get(v, v) if k == "jpg" else v for k, v in sample.items()}
    out = prepare_sample({"__key__": "k1", **sample}, resolution=64, max_pixels=150 * 150, draft=True)
    assert isinstance(out, Skipped), out
    assert out.reason.split(":")[0] == reason
    assert out.key == "k1"


def test_caption_from_txt_or_json_and_label_from_cls():
    data = _encode(Image.new("RGB", (80, 80), (1, 2, 3)), "PNG")
    a = prepare_sample({"__key__": "a", "png": data, "txt": b" a red circle \n"}, 64, 10**8, True)
    b = prepare_sample({"__key__": "b", "png": data, "json": b'{"caption": "a blue square"}', "cls": b"7"}, 64, 10**8,
                       True)
    assert isinstance(a, Prepared) and a.caption == "a red circle" and a.label == -1
    assert isinstance(b, Prepared) and b.caption == "a blue square" and b.label == 7
    assert a.image.shape == (64, 64, 3) and a.image.dtype == np.uint8


def test_sample_without_key_is_skipped_not_stored_under_none():
    data = _encode(Image.new("RGB", (80, 80), (1, 2, 3)), "PNG")
    out = prepare_sample({"png": data, "txt": b"a caption"}, 64, 10**8, True)
    assert isinstance(out, Skipped) and out.key is None
    assert out.reason.split(":")[0] == "missing-key"


def _bicubic_matrix(n_in: int, n_out: int, a: float = -0.75) -> np.ndarray:
    """Resampling matrix of the cubic-convolution kernel (Keys, a=-0.75), half-pixel centres, edge clamp."""

    def k(x):
        x = abs(x)
        if x <= 1:
            return (a + 2) * x**3 - (a + 3) * x**2 + 1
        if x < 2:
            return a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a
        return 0.0

    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        src = (i + 0.5) * n_in / n_out - 0.5
        x0 = int(np.floor(src))
        for j in range(x0 - 1, x0 + 3):
            m[i, min(max(j, 0), n_in - 1)] += k(src - j)
    return m


def test_dino_preprocess_matches_a_hand_computation():
    res = 64  # -> 224 * 64 / 256 = 56 px, a 4x4 grid of 14-px patches, as the 4x4 latent-token grid
    rng = np.random.default_rng(3)
    img = rng.integers(0, 256, (2, 3, res, res), dtype=np.uint8)
    got = dino_preprocess(torch.from_numpy(img), res).numpy()
    x = img.astype(np.float64) / 255.0
    x = (x - np.array(IMAGENET_MEAN)[None, :, None, None]) / np.array(IMAGENET_STD)[None, :, None, None]
    m = _bicubic_matrix(res, 56)
    want = np.einsum("oh,bchw,pw->bcop", m, x, m)
    assert got.shape == (2, 3, 56, 56)
    np.testing.assert_allclose(got, want, atol=1e-4)
