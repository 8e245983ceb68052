"""Prompt assembly: retrieved chunks → ``list[PromptPart]`` for ``VisionLanguageModel.generate_stream``.

Layout, top to bottom:

1. a short preamble saying what the memory is and which time zone the times are in;
2. per chunk, in time order: a text line ``[camera] 2026-11-20 14:03:05–14:03:13 CET`` (on the
   long-window path with the piece's grain: ``[camera] 2026-11-20 08:00:00–09:04:10 CET, summary of
   64 chunks (tier 1)``, retrieval/coverage.py) followed by the chunk's visual tokens, ordered by
   (frame, row, col) with the summary tokens last (the order a model reads a frame grid in, so
   positions stay monotone);
3. the ranges in which a selected camera was offline, in words, so the model does not invent
   what happened while nothing was recorded;
   for a question about now, each camera whose newest memory is stale, with its age, so the model
   does not describe old memory as the present;
4. the question, last, so generation starts right after it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Protocol
from zoneinfo import ZoneInfo

import torch
from torch import Tensor

from vlm.types import PromptPart, TextPart, VisualPart

if TYPE_CHECKING:
    from memory.outage import Outage
    from memory.types import CompressedChunk


class PromptChunk(Protocol):
    """What the prompt needs of a retrieved chunk (``retrieval.search.RetrievedChunk``)."""

    @property
    def camera(self) -> str: ...
    @property
    def start_s(self) -> float: ...
    @property
    def end_s(self) -> float: ...
    @property
    def chunk(self) -> CompressedChunk: ...


@dataclass(frozen=True)
class StaleCamera:
    """A camera whose newest memory is too old to show the present (question about now)."""

    camera: str
    end_s: float  # UTC epoch seconds
    age_s: float


PREAMBLE = (
    "You are vigil, a video memory of live cameras. Below are compressed memories of what the "
    "cameras saw, each introduced by its camera and time span ({zone}). Answer the question from "
    "these memories only, name the camera and time of what you describe, and say so when the "
    "memories do not show the answer."
)
NO_MEMORY = "No memory matches the cameras and time window of the question."


def format_time(ts_s: float, tz: ZoneInfo) -> str:
    """UTC epoch seconds → ``2026-11-20 14:03:05`` in ``tz`` (prompt text, whole seconds)."""
    return datetime.fromtimestamp(ts_s, tz).strftime("%Y-%m-%d %H:%M:%S")


def format_span(start_s: float, end_s: float | None, tz: ZoneInfo) -> str:
    """A time span as prompt text; the date is written once when both ends share it."""
    start = datetime.fromtimestamp(start_s, tz)
    zone = start.tzname() or str(tz)
    if end_s is None:
        return f"{start:%Y-%m-%d %H:%M:%S} {zone} until now"
    end = datetime.fromtimestamp(end_s, tz)
    if end.date() == start.date():
        return f"{start:%Y-%m-%d %H:%M:%S}–{end:%H:%M:%S} {zone}"
    return f"{start:%Y-%m-%d %H:%M:%S}–{end:%Y-%m-%d %H:%M:%S} {zone}"


def chunk_header(camera: str, start_s: float, end_s: float, tz: ZoneInfo, grain: str | None = None) -> str:
    """The text line introducing one chunk: camera, span and, on the long-window path, its grain."""
    grain_text = f", {grain}" if grain else ""
    return f"[{camera}] {format_span(start_s, end_s, tz)}{grain_text}:\n"


def outage_line(outage: Outage, tz: ZoneInfo) -> str:
    """The text line saying a camera was offline (and why, when known)."""
    why = f" ({outage.reason})" if outage.reason else ""
    return (
        f"Camera {outage.camera} was offline {format_span(outage.start_s, outage.end_s, tz)}{why}; "
        "nothing was recorded from it then.\n"
    )


def token_order(frame: Tensor, row: Tensor, col: Tensor) -> Tensor:
    """Permutation putting tokens in (frame, row, col) order with summary tokens (row < 0) last.

    frame, row, col: [M] → returns [M] int64 indices. Summary tokens keep frame order among
    themselves. Successive stable sorts, least significant key first (an LSD radix order).
    """
    if not (frame.shape == row.shape == col.shape) or frame.dim() != 1:
        raise ValueError(
            f"frame, row and col must be equal 1-D shapes, got {tuple(frame.shape)}, "
            f"{tuple(row.shape)}, {tuple(col.shape)}"
        )
    order = torch.arange(frame.shape[0])
    summary = (row < 0).to(torch.int8)
    for key in (col, row, frame, summary):
        _, idx = torch.sort(key[order].to(torch.int64), stable=True)
        order = order[idx]
    return order


def build_prompt(
    question: str,
    chunks: Sequence[PromptChunk],
    outages: Sequence[Outage],
    *,
    tz: ZoneInfo,
    stale: Sequence[StaleCamera] = (),
) -> list[PromptPart]:
    """Assemble the prompt parts; chunks are placed in time order whatever order they come in."""

    zone = datetime.now(tz).tzname() or str(tz)
    parts: list[PromptPart] = [TextPart(PREAMBLE.format(zone=zone) + "\n")]
    if not chunks:
        parts.append(TextPart(NO_MEMORY + "\n"))
    for item in sorted(chunks, key=lambda c: (c.start_s, c.camera)):
        # Only RetrievedChunk has a grain (long-window pieces); other chunk types are as stored.
        parts.append(TextPart(chunk_header(item.camera, item.start_s, item.end_s, tz, getattr(item, "grain", None))))
        compressed = item.chunk
        order = token_order(compressed.frame, compressed.row, compressed.col)  # [M]
        parts.append(
            VisualPart(
                tokens=compressed.tokens[order],  # [M, C]
                frame=compressed.frame[order],
                row=compressed.row[order],
                col=compressed.col[order],
            )
        )
        parts.append(TextPart("\n"))
    for outage in sorted(outages, key=lambda o: (o.start_s, o.camera)):
        parts.append(TextPart(outage_line(outage, tz)))
    for item in stale:
        parts.append(
            TextPart(
                f"The newest memory of camera {item.camera} ends {format_time(item.end_s, tz)}, "
                f"{item.age_s:.0f} s before now: it does not show the present.\n"
            )
        )
    parts.append(TextPart(f"Question: {question.strip()}\nAnswer:"))
    return parts
