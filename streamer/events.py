"""Events as JSON for the outside world: ``{prefix}/events``, ``{prefix}/events/query``, ``vigil events``.

One function, so the live notifications, the query replies and the CLI's ``--json`` show an event
the same way (docs/api.md, Events). Times are ISO 8601 in the configured zone (streamer/timefmt.py),
as in answers; the citation is the span an answer would cite for it.
"""

from __future__ import annotations

from typing import Any
from zoneinfo import ZoneInfo

from memory.events import Event
from streamer.timefmt import iso_time

SCORE_DIGITS = 4  # as the citations' scores in answers


def event_payload(event: Event, tz: ZoneInfo, type: str | None = None) -> dict[str, Any]:
    """The JSON object of ``event``; ``type`` (``new``/``update``/``end``) first when given."""
    start = iso_time(event.start_s, tz)
    end = None if event.end_s is None else iso_time(event.end_s, tz)
    body: dict[str, Any] = {} if type is None else {"type": type}
    body.update(
        {
            "id": event.id,
            "watch": event.watch,
            "camera": event.camera,
            "start": start,
            "end": end,
            "score": round(event.score, SCORE_DIGITS),
            "peak_score": round(event.peak_score, SCORE_DIGITS),
            "description": event.description,
            "citation": {"camera": event.camera, "start": start, "end": end},
        }
    )
    return body
