"""Counters every rewrite bumps; `report()` shows them and tests assert them. A leaf module."""

from __future__ import annotations

import collections

COUNTERS: collections.Counter = collections.Counter()
