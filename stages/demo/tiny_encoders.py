"""Tiny random-init encoders of the real model classes, saved so they load offline like Hub models.

``write_tiny_encoders(out_dir)`` writes one folder per model with ``save_pretrained``; each loads
through the same ``from_pretrained`` calls the encode stage uses for Hub ids, so the whole pipeline
runs (and is tested) without downloading weights:

- ``vae/``       AutoencoderKL, 4 latent channels, downsampling 8, SD-VAE scaling 0.18215
- ``vae-demo/``  the same with one norm group, the layout `repa encoders fit-vae` fits to the demo images
- ``vae-flux/``  AutoencoderKL, 16 latent channels, FLUX scale/shift, no quant convs
- ``dino/``      Dinov2Model, hidden 32, patch 14
- ``dino-reg/``  Dinov2WithRegistersModel, the same plus 4 register tokens
- ``text/``      T5EncoderModel + word-level tokenizer (``</s>`` appended, ``<pad>`` = 0)
- ``clip-text/`` CLIPTextModel + word-level tokenizer (start/end tokens, 77 positions)
- ``siglip/``    SiglipModel (image-caption similarity) + word-level tokenizer (``</s>`` appended and used
                 as padding, 64 positions, ids only) + SiglipImageProcessor (32 px)

The tokenizers are built with the ``tokenizers`` library over the demo caption vocabulary
(imported from ``stages.demo.data``, so the two cannot drift) plus common English words,
so they need no sentencepiece/BPE files and no network.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from pathlib import Path
from typing import TypedDict

import torch
from diffusers.models import AutoencoderKL  # diffusers' top level shows type checkers its no-torch dummy
from tokenizers import (
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    Dinov2Config,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
    PreTrainedTokenizerFast,
    SiglipConfig,
    SiglipModel,
    T5Config,
    T5EncoderModel,
)

from stages.core.encoders import library_noise

from .data import caption_words

library_noise.install()

# Widths chosen for speed on CPU: batch 32, fp32, 2 cores, the encoder needs about 1/190 core-pair
# seconds per image at 128 px and 1/30 at 256 px (the mid-block attention then sees 32x32 tokens).
# Narrower blocks are not faster: full-resolution convolutions with few channels are memory-bound.
VAE_BLOCK_CHANNELS = (8, 16, 32, 32)  # 4 blocks -> 3 halvings -> downsampling 8
VAE_NORM_GROUPS = 8
VAE_SAMPLE_SIZE = 256


class DinoSizes(TypedDict):
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    mlp_ratio: int
    patch_size: int
    image_size: int


DINO_SIZES = DinoSizes(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, patch_size=14, image_size=224
)
DINO_REGISTERS = 4

T5_SPECIALS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2 as in T5's sentencepiece vocabulary
T5_MAX_LENGTH = 512
CLIP_SPECIALS = ("<|startoftext|>", "<|endoftext|>", "<unk>")  # end-of-text doubles as padding, as in OpenAI CLIP
CLIP_MAX_LENGTH = 77
SIGLIP_MAX_LENGTH = 64  # SigLIP's text length; its processor pads every caption to it
SIGLIP_IMAGE_SIZE = 32

# Frequent words of web alt-text captions, so real-looking captions are mostly in-vocabulary too.
COMMON_WORDS = """
the of and to in is was for on that with as by at from it an be this are or his her their its
have has had not but which one all were they we you he she them there been will would can could
more new after first two three four five time years year day days night people person man woman
men women boy girl child children baby family friends couple group team player players city
town street road house home room kitchen bedroom bathroom building church school office park
garden beach sea ocean lake river water mountain mountains forest tree trees flower flowers
grass field sky sun cloud clouds snow rain winter summer spring autumn fall morning evening
light dark black white red blue green yellow orange purple pink brown grey gray gold silver
colour color colours colors big small large little long short old young high low top bottom
left right front back side center centre middle inside outside over under near between
around up down out into through during before while above below beautiful happy modern
vintage classic wooden glass metal stone paper plastic photo photograph image picture
illustration vector drawing painting art design pattern background texture icon logo sign
text view close portrait landscape stock royalty free set collection style look made using
car bus train bike boat plane road food dinner lunch breakfast cake coffee tea wine fruit
table chair bed door window wall floor shirt dress shoes hat bag hair face eyes hand hands
dog cat horse bird fish animal animals sitting standing walking running playing holding
wearing looking smiling showing open closed full empty hot cold best great good other some
many each every most very just also only how what when where who why about like make
your our my me us
""".split()


def tokenizer_vocabulary() -> list[str]:
    """Regular (non-special) tokens shared by both tokenizers: caption words, common words, digits, punctuation."""
    words = set(caption_words()) | set(COMMON_WORDS) | set(string.digits) | set(string.punctuation)
    return sorted(words)


def _word_level_tokenizer(specials: Sequence[str], unk: str, template: str) -> Tokenizer:
    """A lower-casing word-level tokenizer; ``template`` is the post-processor's single-sequence template."""
    vocab = {token: i for i, token in enumerate([*specials, *tokenizer_vocabulary()])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=unk))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    # Each punctuation mark and digit is a token of its own, so "left," or "2024" never become <unk>.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(), pre_tokenizers.Digits(individual_digits=True)]
    )
    tok.post_processor = processors.TemplateProcessing(
        single=template,
        pair=f"{template} {template.replace('$A', '$B')}",
        special_tokens=[(t, vocab[t]) for t in specials if t in template.split()],
    )
    # Joins tokens with spaces and removes the space before punctuation, so decode() gives back the caption.
    tok.decoder = decoders.WordPiece(cleanup=True)
    return tok


def _eos_appended(pad_token: str, max_length: int, **extra) -> PreTrainedTokenizerFast:
    """The T5 vocabulary with ``</s>`` appended to every caption and no start token."""
    return PreTrainedTokenizerFast(
        tokenizer_object=_word_level_tokenizer(T5_SPECIALS, "<unk>", "$A </s>"),
        pad_token=pad_token,
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=max_length,
        **extra,
    )


def t5_tokenizer() -> PreTrainedTokenizerFast:
    """T5-style: ``</s>`` appended, ``<pad>`` id 0, no start token."""
    return _eos_appended("<pad>", T5_MAX_LENGTH)


def clip_tokenizer() -> PreTrainedTokenizerFast:
    """CLIP-style: start and end-of-text tokens around the words, padded with end-of-text to 77."""
    return PreTrainedTokenizerFast(
        tokenizer_object=_word_level_tokenizer(CLIP_SPECIALS, "<unk>", "<|startoftext|> $A <|endoftext|>"),
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token="<unk>",
        model_max_length=CLIP_MAX_LENGTH,
    )


def siglip_tokenizer() -> PreTrainedTokenizerFast:
    """SigLIP-style: ``</s>`` appended and used as padding, no attention mask (SigLIP pools the last position)."""
    return _eos_appended("</s>", SIGLIP_MAX_LENGTH, model_input_names=["input_ids"])


def tiny_vae(
    latent_channels: int, scaling_factor: float, shift_factor: float | None = None, quant_convs: bool = True,
    norm_groups: int = VAE_NORM_GROUPS,
) -> AutoencoderKL:
    """SD-VAE layout (4 blocks, downsampling 8) at tiny widths; FLUX-style VAEs drop the 1x1 quant convs."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(VAE_BLOCK_CHANNELS),
        up_block_types=("UpDecoderBlock2D",) * len(VAE_BLOCK_CHANNELS),
        block_out_channels=VAE_BLOCK_CHANNELS,
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=norm_groups,
        sample_size=VAE_SAMPLE_SIZE,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=quant_convs,
        use_post_quant_conv=quant_convs,
    )


def _builders(vocab_size: int) -> dict:
    """Name -> zero-argument constructor of each model, in the order they are written."""
    t5 = T5Config(
        vocab_size=vocab_size,
        d_model=32,
        d_kv=16,
        d_ff=64,
        num_layers=2,
        num_heads=2,
        feed_forward_proj="gated-gelu",  # T5 v1.1, the variant diffusion models use
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,  # type: ignore[call-arg]  # taken by PretrainedConfig through **kwargs
    )
    clip = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        projection_dim=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=CLIP_MAX_LENGTH,
        bos_token_id=0,
        # Not 2: CLIPTextModel treats eos id 2 as a legacy config and pools at the largest token id instead.
        eos_token_id=1,
        pad_token_id=1,
    )
    siglip = SiglipConfig(
        text_config=dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=SIGLIP_MAX_LENGTH, pad_token_id=1,
                         bos_token_id=1, eos_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=SIGLIP_IMAGE_SIZE, patch_size=8),
    )
    return {
        "vae": lambda: tiny_vae(4, scaling_factor=0.18215),
        "vae-demo": lambda: tiny_vae(4, scaling_factor=0.18215, norm_groups=1),  # see stages.demo.fit_vae
        "vae-flux": lambda: tiny_vae(16, scaling_factor=0.3611, shift_factor=0.1159, quant_convs=False),
        "dino": lambda: Dinov2Model(Dinov2Config(**DINO_SIZES)),
        "dino-reg": lambda: Dinov2WithRegistersModel(
            Dinov2WithRegistersConfig(**DINO_SIZES, num_register_tokens=DINO_REGISTERS)
        ),
        "text": lambda: T5EncoderModel(t5),
        "clip-text": lambda: CLIPTextModel(clip),
        "siglip": lambda: SiglipModel(siglip),
    }


def write_tiny_encoders(out_dir: Path, seed: int = 0) -> dict[str, Path]:
    """Write every tiny encoder (and its tokenizer, for text models) under ``out_dir``; return name -> folder.

    Each model's weights depend only on ``seed``; the caller's torch RNG state is left untouched.
    """
    out_dir = Path(out_dir)
    tokenizers = {"text": t5_tokenizer(), "clip-text": clip_tokenizer(), "siglip": siglip_tokenizer()}
    vocab_size = max(len(tok) for tok in tokenizers.values())  # one size fits both models
    paths: dict[str, Path] = {}
    with library_noise.no_progress_bars():  # a bar per one-file model says nothing
        for name, build in _builders(vocab_size).items():
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = build()
            path = out_dir / name
            model.save_pretrained(path)
            if name in tokenizers:
                tokenizers[name].save_pretrained(path)
            if name == "siglip":
                size = {"height": SIGLIP_IMAGE_SIZE, "width": SIGLIP_IMAGE_SIZE}
                siglip_image_processor()(size=size).save_pretrained(path)
            paths[name] = path
    return paths


def siglip_image_processor() -> type:
    """SigLIP's PIL image processor: transformers 5 names it ``SiglipImageProcessorPil`` (its plain name needs
    torchvision, which this project does not install, and warns when it falls back); 4.x has only the plain one."""
    import transformers

    return getattr(transformers, "SiglipImageProcessorPil", None) or transformers.SiglipImageProcessor
