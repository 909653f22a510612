"""The feature-cache contract between `repa encode` (writer) and `repa train` (reader).

Depends on numpy, zarr and tensorstore only, never on torch or on anything else in the project.
See docs/cache-format.md. Importing the package is cheap (manifest and layout); the codec, the zarr writer and
the readers load on first use, so `repa cache info` and `repa --help` import neither numpy nor zarr.
"""

from importlib import import_module

from cache_schema.format.layout import (
    DEFAULT_SHARD_SIZE,
    FEATURE_CODECS,
    SCHEMA_VERSION,
    Field,
    cache_fields,
    part_name,
)
from cache_schema.format.manifest import (
    Manifest,
    PartRecord,
    field_from_json,
    field_to_json,
    fingerprint,
    new_manifest,
    read_manifest,
    settings_diff,
)

from .errors import CacheError

_LAZY = {
    "dequantize_int8_numpy": "cache_schema.format.codec",
    "quantize_int8_numpy": "cache_schema.format.codec",
    "CacheReader": "cache_schema.reading.reader",
    "FastReader": "cache_schema.reading.fast_reader",
    "PartWriter": "cache_schema.writing.writer",
    "start_encode": "cache_schema.writing.writer",
    "verify_cache": "cache_schema.operations.verify",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CacheError",
    "CacheReader",
    "DEFAULT_SHARD_SIZE",
    "FEATURE_CODECS",
    "FastReader",
    "Field",
    "Manifest",
    "PartRecord",
    "PartWriter",
    "SCHEMA_VERSION",
    "cache_fields",
    "dequantize_int8_numpy",
    "field_from_json",
    "field_to_json",
    "fingerprint",
    "new_manifest",
    "part_name",
    "quantize_int8_numpy",
    "read_manifest",
    "settings_diff",
    "start_encode",
    "verify_cache",
]
