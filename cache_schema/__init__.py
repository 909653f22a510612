"""The feature-cache contract between `repa encode` (writer) and `repa train` (reader).

Depends on numpy, zarr and tensorstore only, never on torch or on anything else in the project.
See docs/cache-format.md. Importing the package is cheap (manifest and layout); the codec, the zarr writer and
the readers load on first use, so `repa cache info` and `repa --help` import neither numpy nor zarr.
"""

from importlib import import_module

from .errors import CacheError
from .layout import (
    DEFAULT_SHARD_SIZE,
    FEATURE_CODECS,
    SCHEMA_VERSION,
    Field,
    cache_fields,
    part_name,
)
from .manifest import (
    Manifest,
    PartRecord,
    field_from_json,
    field_to_json,
    fingerprint,
    new_manifest,
    read_manifest,
    settings_diff,
)

_LAZY = {
    "dequantize_int8_numpy": ".codec",
    "quantize_int8_numpy": ".codec",
    "CacheReader": ".reader",
    "FastReader": ".fast_reader",
    "PartWriter": ".writer",
    "start_encode": ".writer",
    "verify_cache": ".verify",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
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
