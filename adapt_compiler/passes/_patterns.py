"""PEFT's per-module overrides (`rank_pattern`, `alpha_pattern`). A helper file the registry skips."""

from __future__ import annotations

import re


def pattern_value(pattern: dict, fqn: str, default):
    """PEFT's get_pattern_key: the first key whose regex matches the end of the module name wins."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", fqn):
            return value
    return default
