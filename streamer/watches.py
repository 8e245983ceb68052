"""Watches: the pure part. Hysteresis and cooldown over a watch's scores, and runtime watch requests.

A watch (``WatchSettings`` in streamer/settings.py, docs/watches.md) is a standing yes/no question.
Every new chunk of a watched camera gets a score, the model's P(yes) (vlm/watch.py); this module
turns a camera's scores, in chunk order, into events:

* a chunk *fires* when ``score >= threshold``, except that a threshold of 1 never fires (a
  saturated softmax can return exactly 1.0, and "1 never does" is the documented meaning);
* ``on_after`` firing chunks in a row start an event; it starts where the first of them starts;
* ``off_after`` chunks in a row that do not fire end it; it ends where its last firing chunk ends;
* no event starts from a chunk that starts less than ``cooldown_s`` after the previous event's end
  (those chunks do not count towards ``on_after`` either).

Everything runs on chunk times (UTC epoch seconds), never the wall clock, so a sequence of
scores always gives the same events (the tests check this against a naive reference).

The I/O around it (the check queue, the model thread, Redis, MQTT) is streamer/watch_service.py.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal

from pydantic import ValidationError

from streamer.requests import RequestError, first_error
from streamer.settings import CAMERA_NAME_RE, WatchSettings

# Fields of a ``{prefix}/watches/NAME/set`` body that address the reply (v3.1.1) rather than the watch.
REPLY_FIELDS = ("reply_to", "id")


def fires(score: float, threshold: float) -> bool:
    """Whether a chunk with this P(yes) counts as "yes" (NaN never does, threshold 1 never does)."""
    return threshold < 1.0 and score >= threshold


@dataclass(frozen=True, slots=True)
class Rule:
    """What the state machine needs of a watch."""

    threshold: float
    on_after: int
    off_after: int
    cooldown_s: float

    @classmethod
    def of(cls, watch: WatchSettings) -> Rule:
        return cls(watch.threshold, watch.on_after, watch.off_after, watch.cooldown_s)


@dataclass(frozen=True, slots=True)
class Ongoing:
    """An event that started and has not ended: its span so far and its highest score."""

    start_s: float
    end_s: float  # end of its last firing chunk
    peak_score: float


@dataclass(frozen=True, slots=True)
class WatchState:
    """One watch on one camera between chunks."""

    above: int = 0  # firing chunks in a row while no event is on
    run_start_s: float | None = None  # start of the first of them
    run_peak: float = 0.0
    event: Ongoing | None = None
    below: int = 0  # chunks in a row that did not fire while the event is on
    quiet_until_s: float = -math.inf  # end of the cooldown after the last event

    @property
    def on(self) -> bool:
        return self.event is not None


@dataclass(frozen=True, slots=True)
class Change:
    """An event starting or ending at this chunk (UTC epoch seconds)."""

    kind: Literal["start", "end"]
    start_s: float
    end_s: float  # start: end of the chunk that started it; end: end of its last firing chunk
    peak_score: float


def step(state: WatchState, score: float, start_s: float, end_s: float, rule: Rule) -> tuple[WatchState, Change | None]:
    """The state after one chunk (``start_s``..``end_s``) scored ``score``, and the event change it makes."""
    hit = fires(score, rule.threshold)
    event = state.event
    if event is None:
        if start_s < state.quiet_until_s or not hit:
            return replace(state, above=0, run_start_s=None, run_peak=0.0), None
        above = state.above + 1
        run_start = start_s if state.run_start_s is None else state.run_start_s
        peak = max(state.run_peak, score) if state.above else score
        if above < rule.on_after:
            return replace(state, above=above, run_start_s=run_start, run_peak=peak), None
        started = Ongoing(run_start, end_s, peak)
        return WatchState(event=started, quiet_until_s=state.quiet_until_s), Change("start", run_start, end_s, peak)
    if hit:
        return replace(state, event=Ongoing(event.start_s, end_s, max(event.peak_score, score)), below=0), None
    below = state.below + 1
    if below < rule.off_after:
        return replace(state, below=below), None
    ended = Change("end", event.start_s, event.end_s, event.peak_score)
    return WatchState(quiet_until_s=event.end_s + rule.cooldown_s), ended


def run_scores(
    scores: Sequence[tuple[float, float, float]], rule: Rule, state: WatchState | None = None
) -> tuple[WatchState, list[tuple[int, Change]]]:
    """Fold :func:`step` over (score, start_s, end_s) chunks; returns the last state and (chunk index, change)."""
    state = state or WatchState()
    changes: list[tuple[int, Change]] = []
    for i, (score, start_s, end_s) in enumerate(scores):
        state, change = step(state, score, start_s, end_s, rule)
        if change is not None:
            changes.append((i, change))
    return state, changes


def end_now(state: WatchState) -> tuple[WatchState, Change | None]:
    """End an ongoing event at once (its watch was removed or changed, or vigil stops)."""
    if state.event is None:
        return WatchState(quiet_until_s=state.quiet_until_s), None
    event = state.event
    return WatchState(), Change("end", event.start_s, event.end_s, event.peak_score)


def event_id(watch: str, camera: str, start_s: float) -> str:
    """A stable event id: the same watch, camera and start always name the same event (upserts are idempotent)."""
    return f"{watch}:{camera}:{round(start_s * 1000)}"


def watched_cameras(watch: WatchSettings, cameras: Sequence[str]) -> list[str]:
    """The cameras ``watch`` checks among ``cameras`` (its own list, or all of them)."""
    return sorted(cameras) if watch.cameras is None else [c for c in watch.cameras if c in cameras]


# --------------------------------------------------------------------------- runtime requests


def check_watch_name(name: str) -> str:
    """``name`` if it is a valid watch name (the camera-name rules); raises RequestError otherwise."""
    if not CAMERA_NAME_RE.fullmatch(name):
        raise RequestError(
            "bad_name",
            f"watch name {name[:70]!r} is invalid: use 1-64 characters of a-z, 0-9, '_' or '-', "
            "starting with a letter or digit",
        )
    return name


def parse_watch(body: Mapping[str, object], *, cameras: Sequence[str]) -> WatchSettings:
    """A decoded ``{prefix}/watches/NAME/set`` body (reply fields removed) → the watch.

    Strict: the config's fields only, JSON types as they are (no "0.5" for 0.5), every camera
    known. Raises RequestError (``bad_request``, ``unknown_camera``).
    """
    try:
        watch = WatchSettings.model_validate(dict(body), strict=True)
    except ValidationError as exc:
        raise RequestError("bad_request", first_error(exc)) from None
    unknown = [c for c in watch.cameras or () if c not in cameras]
    if unknown:
        raise RequestError(
            "unknown_camera",
            f"unknown camera(s) {', '.join(unknown[:5])}; known: {', '.join(sorted(cameras)) or 'none'}",
        )
    return watch


def watch_fields(body: Mapping[str, object]) -> dict[str, object]:
    """The watch's fields of a request body: everything but the v3.1.1 reply address."""
    return {key: value for key, value in body.items() if key not in REPLY_FIELDS}
