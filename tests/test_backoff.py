"""The one backoff helper behind every reconnect loop (cameras, the MQTT broker)."""

from __future__ import annotations

import math
import random

from streamer.backoff import backoff_delay_s, backoff_delays


def test_backoff_grows_exponentially_with_jitter_and_respects_the_cap() -> None:
    rng = random.Random(1)
    for attempt in range(12):
        base = min(8.0, 0.5 * 2**attempt)
        delays = [backoff_delay_s(attempt, 0.5, 8.0, rng) for _ in range(50)]
        assert all(base / 2 <= d <= base for d in delays)
        assert len(set(delays)) > 1  # jittered
    assert backoff_delay_s(10_000, 1.0, 30.0, rng) <= 30.0
    assert math.isfinite(backoff_delay_s(10_000, 1.0, 30.0, rng))


def test_the_delay_sequence_doubles_to_the_cap_with_jitter() -> None:
    delays = backoff_delays(0.5, 4.0, random.Random(1))
    got = [next(delays) for _ in range(8)]
    nominal = [0.5, 1.0, 2.0, 4.0, 4.0, 4.0, 4.0, 4.0]
    assert all(n * 0.5 <= d <= n for d, n in zip(got, nominal, strict=True))
    assert len(set(got[3:])) == 5  # jittered: no two capped delays alike
    # The sequence is the per-attempt delay, drawn in order from the same generator.
    again = random.Random(1)
    assert got == [backoff_delay_s(attempt, 0.5, 4.0, again) for attempt in range(8)]
