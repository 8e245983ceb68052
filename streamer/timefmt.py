"""Times at the edges: ISO 8601 text in (MQTT requests, ``vigil import --start``) and out (MQTT JSON).

Inside vigil every time is UTC epoch seconds as ``float``; text is parsed and written only here, in
the configured zone (docs/architecture.md, Times). Prompt text has its own format in
retrieval/prompt.py.
"""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo


class BadTimeError(ValueError):
    """A time given as text could not be understood."""


def parse_time(value: object, tz: ZoneInfo) -> float:
    """ISO 8601 text → UTC epoch seconds; naive times are in ``tz``. Raises BadTimeError."""
    if not isinstance(value, str):
        raise BadTimeError(f"expected an ISO 8601 time string, got {type(value).__name__}")
    try:
        moment = datetime.fromisoformat(value.strip())
    except ValueError as exc:
        raise BadTimeError(f"{value!r} is not an ISO 8601 time (e.g. 2026-11-20T14:03:00+01:00)") from exc
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=tz)
    return moment.timestamp()


def parse_window(after: object, before: object, tz: ZoneInfo) -> tuple[float | None, float | None]:
    """The ``after``/``before`` fields of a request → (after_s, before_s); either may be absent."""
    after_s = None if after is None else parse_time(after, tz)
    before_s = None if before is None else parse_time(before, tz)
    if after_s is not None and before_s is not None and after_s >= before_s:
        raise BadTimeError(f"after ({after}) must be earlier than before ({before})")
    return after_s, before_s


def iso_time(ts_s: float, tz: ZoneInfo) -> str:
    """UTC epoch seconds → ISO 8601 with the zone's offset, millisecond precision (API output)."""
    return datetime.fromtimestamp(ts_s, tz).isoformat(timespec="milliseconds")
