"""The feature-cache contract between `repa encode` (writer) and `repa train` (reader).

Depends on numpy, zarr and torch only; nothing else in the project. See README "Cache layout".
"""

from .codec import dequantize_int8, dequantize_int8_numpy, quantize_int8
from .errors import CacheError, UsageError
from .layout import DEFAULT_SHARD_SIZE, FEATURE_CODECS, SCHEMA_VERSION, Field, cache_fields, part_name
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
from .reader import CacheReader
from .verify import verify_cache
from .writer import PartWriter, start_encode

__all__ = [
    "CacheError",
    "UsageError",
    "CacheReader",
    "DEFAULT_SHARD_SIZE",
    "FEATURE_CODECS",
    "Field",
    "Manifest",
    "PartRecord",
    "PartWriter",
    "SCHEMA_VERSION",
    "cache_fields",
    "dequantize_int8",
    "dequantize_int8_numpy",
    "field_from_json",
    "field_to_json",
    "fingerprint",
    "part_name",
    "quantize_int8",
    "new_manifest",
    "read_manifest",
    "settings_diff",
    "start_encode",
    "verify_cache",
]
