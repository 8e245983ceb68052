"""``vigil events``: list stored watch events straight from Redis (no daemon needed).

Times are read like ``vigil ask --after``: ISO 8601, naive times in the configured zone
(streamer/timefmt.py). ``--json`` prints one JSON list of event objects in the form of the MQTT API
(streamer/events.py); the default is a table for people, times in the configured zone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from datetime import datetime
from typing import TextIO
from zoneinfo import ZoneInfo

import redis.exceptions

from memory.events import MAX_QUERY_LIMIT, Event, EventStore
from memory.keys import check_camera
from memory.store import REDIS_AWAY_ERRORS
from streamer.events import event_payload
from streamer.redact import redact_text
from streamer.resources import redis_client
from streamer.settings import Settings, load_settings
from streamer.timefmt import BadTimeError, parse_window

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2  # as streamer/cli.py
TABLE_TIME = "%Y-%m-%d %H:%M:%S"  # seconds are enough to read; --json has milliseconds and the offset
DESCRIPTION_CHARS = 60  # of the description column; --json has it whole


async def list_events(
    settings: Settings,
    *,
    camera: str | None,
    watch: str | None,
    after_s: float | None,
    before_s: float | None,
    limit: int,
) -> list[Event]:
    """The stored events matching the filters, ordered by start (EventStore.query)."""
    client = redis_client(settings)
    try:
        store = EventStore(client, key_prefix=settings.redis.key_prefix)
        return await store.query(camera=camera, watch=watch, after_s=after_s, before_s=before_s, limit=limit)
    finally:
        await client.aclose()


def format_table(events: Sequence[Event], tz: ZoneInfo) -> str:
    """Events as aligned columns for a terminal; ``no events`` when there are none."""
    if not events:
        return "no events"

    def when(ts_s: float | None) -> str:
        return "ongoing" if ts_s is None else datetime.fromtimestamp(ts_s, tz).strftime(TABLE_TIME)

    rows = [
        (
            when(e.start_s),
            when(e.end_s),
            e.camera,
            e.watch,
            f"{e.peak_score:.2f}",
            (e.description or "")[:DESCRIPTION_CHARS],
        )
        for e in events
    ]
    header = (f"start ({tz.key})", "end", "camera", "watch", "peak", "description")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header) - 1)]
    lines = [
        "  ".join([*(cell.ljust(width) for cell, width in zip(row, widths, strict=False)), row[-1]]).rstrip()
        for row in [header, *rows]
    ]
    return "\n".join(lines)


def cli_events(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """``vigil events [--camera C] [--watch W] [--after T] [--before T] [--limit N] [--json]``."""
    # Looked up per call, not bound at import: tests and callers may replace the streams.
    out = out or sys.stdout
    err = err or sys.stderr
    settings = load_settings(args.config)
    tz = settings.tz
    try:
        after_s, before_s = parse_window(args.after, args.before, tz)
        camera = None if args.camera is None else check_camera(args.camera)
    except (BadTimeError, ValueError) as exc:
        print(f"vigil events: {exc}", file=err)
        return EXIT_USAGE
    if not 1 <= args.limit <= MAX_QUERY_LIMIT:
        print(f"vigil events: --limit must be between 1 and {MAX_QUERY_LIMIT}", file=err)
        return EXIT_USAGE
    try:
        events = asyncio.run(
            list_events(settings, camera=camera, watch=args.watch, after_s=after_s, before_s=before_s, limit=args.limit)
        )
    except REDIS_AWAY_ERRORS as exc:
        print(f"Redis unavailable: {type(exc).__name__}: {redact_text(str(exc))}", file=err)
        return EXIT_FAILURE
    except redis.exceptions.RedisError as exc:
        print(f"Redis refused: {type(exc).__name__}: {redact_text(str(exc))}", file=err)
        return EXIT_FAILURE
    if args.json:
        print(json.dumps([event_payload(e, tz) for e in events], indent=2), file=out)
    else:
        print(format_table(events, tz), file=out)
    return EXIT_OK
