"""Exponential backoff with jitter, for every reconnect loop (cameras, the MQTT broker).

Delays double from ``initial_s`` up to ``max_s``; each is scaled by a random factor in
``[1 - JITTER, 1]`` ("equal jitter") so that clients behind one failed switch or broker do not
retry in lockstep.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

JITTER = 0.5  # share of each delay that is randomised
MAX_EXPONENT = 62  # 2**62 already exceeds any cap; bounding it keeps the float finite


def backoff_delay_s(attempt: int, initial_s: float, max_s: float, rng: random.Random) -> float:
    """Delay before retry ``attempt`` (0-based): in ``[(1 - JITTER) * base, base]``,
    ``base = min(max_s, initial_s * 2**attempt)``, so it never exceeds ``max_s``."""
    base = min(max_s, initial_s * 2.0 ** min(attempt, MAX_EXPONENT))
    return base * (1.0 - JITTER * rng.random())


def backoff_delays(initial_s: float, max_s: float, rng: random.Random) -> Iterator[float]:
    """The delays of attempts 0, 1, 2 … (see ``backoff_delay_s``); restart it after a success."""
    attempt = 0
    while True:
        yield backoff_delay_s(attempt, initial_s, max_s, rng)
        attempt += 1
