"""Each test file's measured seconds, so that `make test` starts the heaviest files first.

pytest-xdist (`--dist loadfile`) hands whole files to its two workers in collection order. Its
default order (most tests first) put the files that compile the most (few tests, minutes each)
last, and one worker ran them alone for minutes at the end. Heaviest first is the classic
longest-processing-time schedule: the last files to start are short ones.

The numbers only order the files; a stale or missing entry changes the order, never a result.
Refresh them after a full run:

    pytest -n 2 --dist loadfile --no-loadscope-reorder --junitxml=/tmp/junit.xml tests
    python tests/durations.py /tmp/junit.xml
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

FILE = Path(__file__).with_name("durations.json")
UNKNOWN = 10.0  # a file not measured yet: a light one


def load() -> dict[str, float]:
    try:
        return json.loads(FILE.read_text())
    except (OSError, ValueError):
        return {}


def heaviest_first(items, seconds: dict[str, float]) -> list:
    """`items` reordered file by file, heaviest file first; each file's tests keep their order."""
    first_seen = {}
    for i, item in enumerate(items):
        first_seen.setdefault(item.path.name, i)
    return sorted(items, key=lambda it: (-seconds.get(it.path.name, UNKNOWN), first_seen[it.path.name]))


def record(junit_xml: str) -> None:
    import xml.etree.ElementTree as ET

    total = Counter()
    for case in ET.parse(junit_xml).iter("testcase"):
        total[case.get("classname", "").split(".")[-1] + ".py"] += float(case.get("time", 0))
    FILE.write_text(json.dumps({k: round(v) for k, v in total.most_common()}, indent=0) + "\n")


if __name__ == "__main__":
    record(sys.argv[1])
