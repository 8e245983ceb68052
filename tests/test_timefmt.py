"""ISO 8601 times at the edges (MQTT requests and replies, ``vigil import --start``)."""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

import pytest

from streamer.timefmt import BadTimeError, iso_time, parse_time, parse_window

TZ = ZoneInfo("Europe/Berlin")
T0 = datetime(2026, 11, 20, 10, 0, 0, tzinfo=TZ).timestamp()


def test_window_parsing_naive_in_zone_and_offsets_kept():
    after, before = parse_window("2026-11-20T10:00:00", "2026-11-20T10:00:00Z", TZ)
    assert after == T0
    assert before == T0 + 3600  # 10:00 UTC is 11:00 in Berlin
    assert parse_window(None, None, TZ) == (None, None)
    assert iso_time(T0, TZ) == "2026-11-20T10:00:00.000+01:00"
    with pytest.raises(BadTimeError, match="ISO 8601"):
        parse_window("last tuesday", None, TZ)
    with pytest.raises(BadTimeError, match="string"):
        parse_window(1700000000, None, TZ)
    with pytest.raises(BadTimeError, match="earlier"):
        parse_window("2026-11-20T11:00", "2026-11-20T10:00", TZ)


def test_iso_time_round_trips_through_parse_time():
    for ts in (T0, T0 + 0.125, 1_000_000_000.5):
        assert parse_time(iso_time(ts, TZ), ZoneInfo("UTC")) == ts
    assert parse_time(" 2026-11-20T10:00:00 ", TZ) == T0  # surrounding blanks are forgiven
