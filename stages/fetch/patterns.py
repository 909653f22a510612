"""The shortest --source patterns for a set of shard paths: numbered runs become brace ranges."""

from __future__ import annotations

import re
from collections import defaultdict

_NUMBERED = re.compile(r"^(?P<head>.*?)(?P<num>\d+)(?P<tail>\.[^/\d]*)$")


def brace_patterns(paths: list[str]) -> list[str]:
    """Brace patterns (as ``expand_source`` reads them) covering exactly ``paths``, one per family of
    numbered files (same prefix, suffix and number width); each gap in the numbering starts another range,
    joined with ``::``. Paths without a number stay as they are."""
    families: dict[tuple[str, str, int], list[int]] = defaultdict(list)
    plain = []
    for path in paths:
        m = _NUMBERED.match(path)
        if m is None:
            plain.append(path)
        else:
            families[(m["head"], m["tail"], len(m["num"]))].append(int(m["num"]))
    out = []
    for (head, tail, width), numbers in sorted(families.items()):
        runs: list[list[int]] = []
        for n in sorted(set(numbers)):
            if runs and n == runs[-1][1] + 1:
                runs[-1][1] = n
            else:
                runs.append([n, n])
        out.append("::".join(f"{head}{a:0{width}d}{tail}" if a == b else f"{head}{{{a:0{width}d}..{b:0{width}d}}}{tail}"
                             for a, b in runs))
    return out + sorted(plain)
