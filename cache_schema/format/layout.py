"""On-disk layout of a feature cache: names, fields and how each field is chunked.

A cache directory looks like::

    CACHE/
      manifest.json            settings, fingerprint, encoders, geometry, fields, the input shards asked for
      .manifest.lock           advisory lock (flock) for the short critical sections of writers
      records/<part>.json      the commit record of a part: counts, files and their sizes, skips, statistics
      claims/<part>.json       the lease of the process encoding a part (host, pid, last heartbeat)
      parts/
        <part>.zarr/           one zarr v3 group per input shard, written by exactly one process
        .tmp-<part>-....zarr/  a part being written; never read
      targets/<target>/        an alignment target added later (`repa encode --add-target`): its own
        parts/, records/, claims/ and lock, written by the same protocol; its part <part> holds
        the same samples, in the same order, as the cache's part <part>

A part exists for readers exactly when its record exists. Every array in a part has the sample
(or, for ragged text, the token) as its first axis. Per-sample feature arrays use zarr v3
sharding: one sample per inner chunk, ``shard_size`` samples per shard file, no compression
(float16 features are nearly incompressible and compression halves read speed), so a reader
fetches any single sample with one small read. Every chunk ends with a crc32c checksum (the
zarr v3 ``crc32c`` codec), which zarr-python and tensorstore verify on every read.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

SCHEMA_VERSION = 2
MANIFEST_NAME = "manifest.json"
LOCK_NAME = ".manifest.lock"
PARTS_DIR = "parts"
RECORDS_DIR = "records"
CLAIMS_DIR = "claims"
TARGETS_DIR = "targets"
PART_SUFFIX = ".zarr"
RECORD_SUFFIX = ".json"
TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"

FEATURE_CODECS = ("fp16", "int8")
DEFAULT_SHARD_SIZE = 1024
# Tokens per inner chunk of the flat caption-token array: a caption of ~30 T5 tokens then costs ~1.5x its
# bytes to read (256 read 9x at T5-XXL width).
TEXT_CHUNK_TOKENS = 16
# The skip-reason code (the text before the colon) of each encode-time filter, by its key in
# ``settings["filters"]``: how `repa cache info` counts what each filter removed.
FILTER_SKIP_CODES = {"keep": "filter-keep", "min_size": "filter-min-size", "min_similarity": "filter-min-similarity"}


@dataclass(frozen=True)
class Field:
    """One array of a part: its name, dtype, shape after the leading axis and chunking."""

    name: str
    dtype: str
    inner_shape: tuple[int, ...]
    per_sample: bool = True  # False: indexed by token (ragged text storage)
    sharded: bool = True  # False: small arrays stored in a few big plain chunks
    doc: str = ""

    @property
    def bytes_per_row(self) -> int:
        n = 1
        for d in self.inner_shape:
            n *= d
        return n * _itemsize(self.dtype)


def _itemsize(dtype: str) -> int:
    return {"float16": 2, "float32": 4, "int8": 1, "int32": 4, "int64": 8, "str": 0}[dtype]


def cache_fields(
    latent_channels: int,
    latent_size: int,
    dino_tokens: int,
    dino_dim: int,
    text_dim: int | None,
    codec: str,
    similarity: bool = False,
    class_tokens: int = 0,
    flips: bool = False,
) -> dict[str, Field]:
    """The arrays every part of a cache with these dimensions holds (``similarity``: encoded with an
    image-text similarity model; ``class_tokens``: DINOv2's class and register tokens stored too; ``flips``:
    the image features of the horizontally flipped crop stored too, see ``flip_fields``). Readers ask for the
    fields they know, so a field added here never breaks a reader that does not know it."""
    if codec not in FEATURE_CODECS:
        raise ValueError(f"unknown feature codec {codec!r}; choose one of {', '.join(FEATURE_CODECS)}")
    feat = "int8" if codec == "int8" else "float16"
    fields = [
        Field("key", "str", (), sharded=False, doc="webdataset __key__ of the source sample"),
        Field("source_index", "int64", (), sharded=False, doc="position of the sample in its source shard"),
        Field("caption", "str", (), sharded=False, doc="caption text ('' when the source has none)"),
        Field("label", "int64", (), sharded=False, doc="class label (-1 when the source has none)"),
        Field(
            "moments",
            "float16",
            (2 * latent_channels, latent_size, latent_size),
            doc="VAE posterior mean and std, concatenated on the channel axis",
        ),
        Field("dino", feat, (dino_tokens, dino_dim), doc="DINOv2 patch tokens after the final LayerNorm"),
    ]
    if codec == "int8":
        fields.append(Field("dino_scale", "float16", (dino_tokens,), doc="per-token absmax/127 of dino"))
    fields += class_token_fields(FIRST_TARGET, dino_dim, class_tokens)
    if text_dim is not None:
        fields += [
            Field("text", feat, (text_dim,), per_sample=False, doc="caption hidden states, real tokens only"),
            Field("text_offsets", "int64", (), sharded=False, doc="sample i owns text[offsets[i]:offsets[i+1]]"),
        ]
        if codec == "int8":
            fields.append(Field("text_scale", "float16", (), per_sample=False, doc="per-token absmax/127 of text"))
    if similarity:
        fields.append(Field("similarity", "float32", (), sharded=False,
                            doc="cosine similarity of image and caption embeddings of the similarity model"))
    if flips:
        image = [f for f in fields if f.name in ("moments", FIRST_TARGET) or f.name.startswith(f"{FIRST_TARGET}_")]
        fields += flip_fields(image)
    return {f.name: f for f in fields}


# A target's name is a field name and a directory name: lower-case, no separators.
TARGET_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,47}$")
# The cache's first alignment target, stored with the VAE moments in the cache's own parts.
FIRST_TARGET = "dino"


def target_fields(name: str, tokens: int, dim: int, codec: str, class_tokens: int = 0,
                  flips: bool = False) -> dict[str, Field]:
    """The arrays of an added target's parts: the sample key (to check the alignment with the cache's
    parts), the patch tokens, their int8 scales, with ``class_tokens`` the class (+ register) tokens, and
    with ``flips`` each of those for the horizontally flipped crop."""
    if codec not in FEATURE_CODECS:
        raise ValueError(f"unknown feature codec {codec!r}; choose one of {', '.join(FEATURE_CODECS)}")
    feat = "int8" if codec == "int8" else "float16"
    fields = [
        Field("key", "str", (), sharded=False, doc="webdataset __key__ of the sample (the cache part's key)"),
        Field(name, feat, (tokens, dim), doc=f"{name} patch tokens after the final LayerNorm"),
    ]
    if codec == "int8":
        fields.append(Field(f"{name}_scale", "float16", (tokens,), doc=f"per-token absmax/127 of {name}"))
    fields += class_token_fields(name, dim, class_tokens)
    if flips:
        fields += flip_fields([f for f in fields if f.name != "key"])
    return {f.name: f for f in fields}


# The image features of a cache encoded with flips have a twin holding them for the horizontally flipped crop
# (the same crop, mirrored): ``<field>_flip``, same dtype and shape. Captions, labels and similarity have none.
FLIP_SUFFIX = "_flip"


def flip_name(name: str) -> str:
    """The field holding ``name``'s features of the flipped crop."""
    return name + FLIP_SUFFIX


def flip_fields(fields: list[Field]) -> list[Field]:
    """The flipped twin of each of ``fields``."""
    return [Field(flip_name(f.name), f.dtype, f.inner_shape, f.per_sample, f.sharded,
                  doc=f"{f.name} of the horizontally flipped crop") for f in fields]


def class_token_fields(name: str, dim: int, class_tokens: int) -> list[Field]:
    """The class token (then the register tokens) of target ``name``, stored in float16 whatever the codec."""
    if not class_tokens:
        return []
    return [Field(f"{name}_cls", "float16", (class_tokens, dim),
                  doc=f"{name} class token then register tokens, after the final LayerNorm")]


def part_name(source_url: str, source_id: str) -> str:
    """A stable, filesystem-safe part name for an input shard: its file stem plus a hash of its content
    identity (``cache_schema.format.sources.source_id``), so the same tar reached by two spellings of its path
    is one part, and two different tars with the same file name are two."""
    stem = re.split(r"[/\\]", source_url.rstrip("/ |"))[-1]
    stem = re.sub(r"\.(tar|tgz|tar\.gz)$", "", stem)
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem)[:80] or "shard"
    digest = hashlib.sha1(source_id.encode()).hexdigest()[:8]
    return f"{stem}-{digest}"
