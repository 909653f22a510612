"""Which samples are worth encoding: rules on a numeric field of the sample's json, and a minimum image size.

Both run in the decode workers of `repa encode` before any encoder sees the sample (the image-caption
similarity filter runs with the encoders, ``stages.core.encoders.similarity``). Plain Python, so the encode
config can check rules without importing encoder code. A sample that fails is skipped with a reason whose code is the
filter's (``cache_schema.format.layout.FILTER_SKIP_CODES``), so the cache records it like any other skip.
Rules are parsed with a regular expression, never evaluated.
"""

from __future__ import annotations

import json
import math
import operator
import re
from dataclasses import dataclass

from cache_schema.format.layout import FILTER_SKIP_CODES
from stages.core.errors import UsageError

_OPS = {">=": operator.ge, "<=": operator.le, "==": operator.eq, "!=": operator.ne, ">": operator.gt, "<": operator.lt}
_RULE = re.compile(
    r"^\s*(?P<field>[A-Za-z_][A-Za-z0-9_\-]*(?:\.[A-Za-z_][A-Za-z0-9_\-]*)*)\s*"
    r"(?P<op>>=|<=|==|!=|>|<)\s*"
    r"(?P<value>[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?)\s*$"
)
KEEP_CODE = FILTER_SKIP_CODES["keep"]
MIN_SIZE_CODE = FILTER_SKIP_CODES["min_size"]


def _number(v: float) -> str:
    return str(int(v)) if v.is_integer() and abs(v) < 1e15 else repr(v)


@dataclass(frozen=True)
class KeepRule:
    """Keep a sample when ``json[field] op value``; ``field`` may name a nested key (``a.b``)."""

    field: str
    op: str
    value: float

    @property
    def text(self) -> str:
        """The canonical spelling: what the manifest and the fingerprint record."""
        return f"{self.field}{self.op}{_number(self.value)}"

    def reject(self, meta: dict) -> str | None:
        """The skip reason for a sample with this json metadata, or None when it passes."""
        value = meta
        for key in self.field.split("."):
            if not isinstance(value, dict) or key not in value:
                return f"{KEEP_CODE}: no {self.field} in the json metadata (--keep '{self.text}')"
            value = value[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"{KEEP_CODE}: {self.field} is {json.dumps(value)[:40]}, not a number (--keep '{self.text}')"
        if math.isnan(value) or not _OPS[self.op](value, self.value):
            return f"{KEEP_CODE}: {self.field}={value} fails --keep '{self.text}'"
        return None


def parse_keep(text: str) -> KeepRule:
    m = _RULE.match(text)
    if m is None:
        raise UsageError(f"--keep {text!r}: not FIELD OP NUMBER; write e.g. 'aesthetic_score>3' "
                         f"(FIELD a json key, a.b for a nested one; OP one of {' '.join(_OPS)})")
    return KeepRule(m["field"], m["op"], float(m["value"]))


@dataclass(frozen=True)
class SampleFilters:
    """The filters of the decode workers; the default one lets every sample through."""

    keep: tuple[KeepRule, ...] = ()
    min_size: int | None = None  # shorter image side in pixels, before cropping

    @classmethod
    def from_options(cls, keep: list[str], min_size: int | None) -> SampleFilters:
        return cls(tuple(parse_keep(rule) for rule in keep), min_size)

    def reject_metadata(self, sample: dict) -> str | None:
        """The reason a sample fails a --keep rule (read from its json), or None."""
        if not self.keep:
            return None
        if "json" not in sample:
            return f"{KEEP_CODE}: the sample has no json metadata (--keep '{self.keep[0].text}')"
        try:
            meta = json.loads(sample["json"])
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            return f"{KEEP_CODE}: json metadata unreadable ({str(e)[:80]})"
        for rule in self.keep:
            reason = rule.reject(meta if isinstance(meta, dict) else {})
            if reason:
                return reason
        return None

    def reject_size(self, width: int, height: int) -> str | None:
        if self.min_size is not None and min(width, height) < self.min_size:
            return f"{MIN_SIZE_CODE}: {width}x{height}, shorter side below --min-size {self.min_size}"
        return None
