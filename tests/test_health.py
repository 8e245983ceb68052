"""The daemon's health: what makes it degraded, and what the status payload carries."""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

from memory.store import CameraUsage, StoreStats, TierUsage
from streamer.health import Health, assess, status_payload
from streamer.ingest import IngestStats

TZ = ZoneInfo("Europe/Berlin")


def test_ok_only_when_no_camera_keeps_failing_and_no_write_waits():
    assert assess({}, 0, 0) == Health("ok", None)
    assert assess({}, 0, 5) == Health("ok", None)  # drops of a past outage are counters, not health


def test_each_cause_is_named():
    failing = assess({"garage": "3 chunks in a row not stored, last: ValueError: x"}, 0, 0)
    assert failing.state == "degraded"
    assert failing.reason == "camera garage: 3 chunks in a row not stored, last: ValueError: x"
    assert failing.causes == ("camera:garage",)
    away = assess({}, 12, 2)
    assert away == Health(
        "degraded", "Redis unreachable: 12 writes waiting for retry, 2 dropped so far", ("redis",)
    )
    assert assess({}, 13, 2).causes == away.causes  # the numbers move, the cause is the same
    both = assess({"a": "why a", "b": "why b"}, 1, 0)
    assert both.reason == "camera a: why a; camera b: why b; Redis unreachable: 1 writes waiting for retry"
    assert both.causes == ("camera:a", "camera:b", "redis")


def test_status_payload_carries_health_counters_and_its_time():
    stats = IngestStats(chunks=10, frames=80, frames_encoded=30, failed_chunks=2, encoding_chunks=1)
    now_s = datetime(2026, 11, 20, 14, 3, 5, tzinfo=TZ).timestamp()
    body = status_payload(
        Health("degraded", "why"), stats, StoreStats(dropped=4), 3, now_s=now_s, tz=TZ
    )
    assert body == {
        "published_at": "2026-11-20T14:03:05.000+01:00",
        "health": "degraded",
        "reason": "why",
        "chunks_stored": 10,
        "chunks_failed": 2,
        "frames_skipped": 50,
        "pending_writes": 3,
        "writes_dropped": 4,
        "encoder_queue_chunks": 1,
        "memory": None,  # no usage reading yet
    }


def test_status_payload_carries_memory_per_camera_and_tier():
    usage = {
        "gate": CameraUsage("gate", {0: TierUsage(120, 1_200_000), 1: TierUsage(15, 20_000)}),
        "old": CameraUsage("old", {0: TierUsage(3, 30)}, complete=False),
    }
    body = status_payload(Health("ok", None), IngestStats(), StoreStats(), 0, now_s=0.0, tz=TZ, memory=usage)
    assert body["memory"] == {
        "gate": {
            "0": {"chunks": 120, "bytes": 1_200_000},
            "1": {"chunks": 15, "bytes": 20_000},
            "total": {"chunks": 135, "bytes": 1_220_000},
        },
        "old": None,  # counters not yet recounted: unknown, not too small
    }
