"""Time in the question: "in the last 10 minutes", "yesterday after 3 pm" → a search window.

A question without ``after``/``before`` may still say when (issue 11, item 6). ``read_window``
finds the time words and turns them into (after_s, before_s) at a given "now" in the configured
zone. The dates and clock times themselves ("Monday", "yesterday", "3 pm", "2 hours ago",
"20 November") are parsed by ``dateparser``; the thin layer of rules here only finds where a time
phrase is and what it bounds ("since", "after", "before", "between ... and ...", "the last N
minutes") and gives parts of the day ("this morning", "last night") their hours, which dateparser
does not know as ranges.

A window that would end after "now" is left open (``before_s`` None): memory has nothing later,
and an open end reads "until now" in the answer. Pure: no clock, no I/O; ``now_s`` comes in.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from zoneinfo import ZoneInfo

import dateparser

# Parts of the day as [start hour, end hour) in local time; an end of 24 or more runs into the next day.
DAY_PARTS: dict[str, tuple[int, int]] = {
    "morning": (6, 12),
    "afternoon": (12, 18),
    "evening": (18, 22),
    "night": (18, 30),  # "last night" is yesterday evening until 06:00 today
}
# A phrase after "since"/"after"/"before" is tried from this many words down to one: the longest
# prefix dateparser understands wins ("Monday 9 am" over "Monday").
MAX_PHRASE_WORDS = 4

_WEEKDAYS = "monday|tuesday|wednesday|thursday|friday|saturday|sunday"
_MONTHS = "january|february|march|april|may|june|july|august|september|october|november|december"
_UNITS = "second|minute|hour|day|week"
_RECENT = re.compile(
    rf"\b(?:(?:in|during|over|within|for)\s+)?(?:the\s+)?(?:last|past)\s+"
    rf"(?:(\d+|a|an|one|two|three|four|five|six|seven|eight|nine|ten|few|couple of)\s+)?({_UNITS})s?\b"
)
_SINCE = re.compile(r"\bsince\s+(.+)")
_BETWEEN = re.compile(r"\bbetween\s+(.+?)\s+and\s+(.+)")
_AFTER = re.compile(r"\b(?:after|from)\s+(.+)")
_BEFORE = re.compile(r"\b(?:before|until|till)\s+(.+)")
_PART = re.compile(r"\b(?:(this|yesterday|last)\s+)?(morning|afternoon|evening|night)\b|\b(tonight)\b")
_DAY = re.compile(
    rf"\b(today|yesterday|(?:last\s+)?(?:{_WEEKDAYS})|\d{{1,2}}(?:st|nd|rd|th)?\s+(?:{_MONTHS})"
    rf"|(?:{_MONTHS})\s+\d{{1,2}}(?:st|nd|rd|th)?)\b"
)
# A clock time must say it is one (am/pm, hh:mm, noon, midnight, o'clock): "after 2 people came"
# is not 02:00.
_CLOCK = re.compile(
    r"^(?:\d{1,2}(?::\d{2})?\s*(?:am|pm|a\.m\.|p\.m\.)|\d{1,2}:\d{2}|noon|midday|midnight|\d{1,2}\s+o'clock)"
)
_CLAUSE_END = re.compile(r"[?.!,;]")
_FEW = {"few": "3", "couple of": "2"}


@dataclass(frozen=True)
class TimeWindow:
    """The window a question's words give: UTC epoch seconds (None: open) and the words read."""

    after_s: float | None
    before_s: float | None
    phrase: str


def read_window(text: str, *, now_s: float, tz: ZoneInfo) -> TimeWindow | None:
    """The time window ``text`` speaks of at ``now_s`` in ``tz``, or None when it names no time."""
    lowered = " ".join(text.lower().split())
    now = datetime.fromtimestamp(now_s, tz)
    if match := _RECENT.search(lowered):
        count = _FEW.get(match.group(1) or "one", match.group(1) or "one")
        start = _parse(f"{count} {match.group(2)}s ago", now)
        if start is not None:
            return _window(start, None, now, match.group(0).strip())
    if match := _SINCE.search(lowered):
        found = _moment(match.group(1), now)
        if found is not None:
            start, words = found
            return _window(start, None, now, f"since {words}")

    day_words: list[str] = []
    day, span = _day_span(lowered, now, day_words)
    bounds = _clock_bounds(lowered, day or now.date(), now, day_words)
    if bounds is not None:
        start, end = bounds
        if day is not None and span is not None:
            start = start or span[0]
            end = end or span[1]
        elif day is None and start is not None and start > now:
            # "after 3 pm" asked at 10:00 means yesterday's afternoon, not one still to come.
            start, end = start - timedelta(days=1), None if end is None else end - timedelta(days=1)
        return _window(start, end, now, " ".join(day_words))
    if span is not None:
        return _window(span[0], span[1], now, " ".join(day_words))
    return None


def _day_span(lowered: str, now: datetime, words: list[str]) -> tuple[date | None, tuple[datetime, datetime] | None]:
    """The day the text names and its span (a part of it when one is named); appends the words read."""
    day: date | None = None
    part: str | None = None
    if match := _PART.search(lowered):
        which, part, tonight = match.group(1), match.group(2), match.group(3)
        part = part or "night"
        if which in ("yesterday", "last"):
            day = now.date() - timedelta(days=1)
        elif which == "this" or tonight:
            day = now.date()
        words.append(match.group(0))
    if match := _DAY.search(lowered):
        parsed = _parse(match.group(1), now)
        if parsed is not None and (day is None or match.group(0) not in " ".join(words)):
            day = parsed.date()
            words.insert(0, match.group(0))
    if day is None:
        return None, None
    if part is None:
        start = datetime.combine(day, time(), now.tzinfo)
        return day, (start, start + timedelta(days=1))
    first, last = DAY_PARTS[part]
    start = datetime.combine(day, time(), now.tzinfo)
    return day, (start + timedelta(hours=first), start + timedelta(hours=last))


def _clock_bounds(
    lowered: str, day: date, now: datetime, words: list[str]
) -> tuple[datetime | None, datetime | None] | None:
    """Clock bounds on ``day`` ("after 3 pm", "before noon", "between 2 and 4 pm"); None without any."""
    if match := _BETWEEN.search(lowered):
        first, second = _clock(match.group(1), day, now), _clock(match.group(2), day, now)
        if second is not None and first is None and re.fullmatch(r"\d{1,2}(?::\d{2})?", match.group(1).strip()):
            # "between 2 and 4 pm": the first clock borrows the second's am/pm.
            suffix = "pm" if second[0].hour >= 12 else "am"
            first = _clock(f"{match.group(1).strip()} {suffix}", day, now)
        if first is not None and second is not None and first[0] < second[0]:
            words.append(f"between {first[1]} and {second[1]}")
            return first[0], second[0]
    start = end = None
    if (match := _AFTER.search(lowered)) and (found := _clock(match.group(1), day, now)):
        start = found[0]
        words.append(f"after {found[1]}")
    if (match := _BEFORE.search(lowered)) and (found := _clock(match.group(1), day, now)):
        end = found[0]
        words.append(f"before {found[1]}")
    if start is None and end is None:
        return None
    return start, end


def _clock(phrase: str, day: date, now: datetime) -> tuple[datetime, str] | None:
    """A clock time at the start of ``phrase`` on ``day`` and the words it was read from."""
    match = _CLOCK.match(phrase.strip())
    if match is None:
        return None
    parsed = _parse(match.group(0), now)
    if parsed is None:
        return None
    return datetime.combine(day, parsed.time(), now.tzinfo), match.group(0)


def _moment(phrase: str, now: datetime) -> tuple[datetime, str] | None:
    """The longest leading run of words in ``phrase`` that dateparser reads as a time, and the words."""
    phrase = _CLAUSE_END.split(phrase, maxsplit=1)[0]
    words = phrase.split()[:MAX_PHRASE_WORDS]
    for n in range(len(words), 0, -1):
        candidate = " ".join(words[:n])
        parsed = _parse(candidate, now)
        if parsed is not None:
            if _CLOCK.match(candidate) and parsed > now:
                parsed -= timedelta(days=1)  # "since 3 pm" asked at 10:00: yesterday's
            return parsed, candidate
    return None


def _parse(phrase: str, now: datetime) -> datetime | None:
    """dateparser on one phrase, relative to ``now``, preferring the past; the result in now's zone."""
    settings = {
        "RELATIVE_BASE": now.replace(tzinfo=None),
        "PREFER_DATES_FROM": "past",
        "RETURN_AS_TIMEZONE_AWARE": False,
        "TIMEZONE": str(now.tzinfo),
        "PARSERS": ["relative-time", "absolute-time"],
    }
    parsed = dateparser.parse(phrase, languages=["en"], settings=settings)
    if parsed is None:
        return None
    # Naive wall-clock time in the zone; fold 0 picks the first of a repeated autumn hour.
    return parsed.replace(tzinfo=now.tzinfo)


def _window(start: datetime | None, end: datetime | None, now: datetime, phrase: str) -> TimeWindow | None:
    if end is not None and end >= now:
        end = None  # nothing is remembered after now: leave the end open
    if start is not None and end is not None and start >= end:
        return None
    return TimeWindow(
        None if start is None else start.timestamp(), None if end is None else end.timestamp(), phrase.strip()
    )
