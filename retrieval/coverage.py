"""Coverage plans for long-window questions (issue 10): the whole window at a grain that fits (pure).

A question about a long window ("what happened at the gate today?") cannot be answered from the
top-k chunks by similarity: they are a few minutes out of many hours. When the window holds more
memory than the prompt budget (``answer.max_prompt_tokens``) allows, :func:`plan_coverage` plans
what the prompt shows instead:

1. **coverage**: the window is cut into equal time bins per camera; the stored chunks of a bin
   (already the coarsest tier consolidation made of them, memory/consolidate.py) become one piece,
   merged further on the fly (``memory.consolidate.consolidate``) to an equal share of the
   budget (at least ``COVERAGE_SHARE`` of it). A bin with more than ``MAX_MERGE_MEMBERS`` chunks is read as
   that many chunks spread evenly over it, so a question never reads a whole day of payloads;
2. **fine hits**: the best similarity hits in the window at their stored grain, at most
   ``top_k``, within the rest of the budget. They are chosen first, so that coverage takes
   whatever they leave; a hit that coverage shows as stored anyway is dropped.

Every piece knows its span and grain, and the prompt says both (retrieval/prompt.py). Token costs
are upper bounds: a piece's visual tokens are at most ``max_tokens`` and never more than its members
hold, its header line costs at most ``piece_text_tokens``. The plan is deterministic: the same
window, hits and budget give the same plan.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

# Share of the memory budget kept for the coverage pieces; the best fine hits may take the rest
# (what they leave goes to coverage too). Coverage comes first: without it a whole-day question
# sees minutes of the day (issue 10).
COVERAGE_SHARE = 0.75
# A coverage piece holds at least this many visual tokens: fewer bins with a few tokens each say
# more than many bins of one token (a merged chunk's summary token plus a handful of centres).
MIN_PIECE_TOKENS = 16
# Stored chunks read to build one coverage piece: one tier's merge (streamer/settings.py's default
# tiers merge 8). A bin holding more is read as this many spread evenly over it, which bounds a
# question's reads to pieces x 8 payloads whatever the window.
MAX_MERGE_MEMBERS = 8


@dataclass(frozen=True, slots=True)
class WindowChunk:
    """A stored chunk in the question's window, as its metadata says (``memory.store.ChunkMeta``)."""

    camera: str
    chunk_id: int
    start_s: float  # UTC epoch seconds
    end_s: float
    n_tokens: int  # visual tokens the chunk holds
    tier: int = 0  # consolidation tier: 0 as recorded
    n_members: int = 0  # chunks a consolidated chunk was merged from (0 for tier 0)


@dataclass(frozen=True, slots=True)
class Hit:
    """A similarity hit in the window: which chunk, and its score."""

    camera: str
    chunk_id: int
    score: float


@dataclass(frozen=True, slots=True)
class Piece:
    """One item of a coverage plan: a stored chunk shown as it is, or several merged into one.

    ``members`` are the chunks read to build it, in time order; ``n_covered`` counts the stored
    chunks in its span (more than ``len(members)`` when the bin was sampled). Its visual tokens are
    at most :attr:`tokens`.
    """

    camera: str
    start_s: float
    end_s: float
    members: tuple[WindowChunk, ...]
    n_covered: int
    max_tokens: int
    score: float = 0.0
    fine: bool = False  # a similarity hit at its stored grain, not a coverage piece

    @property
    def tokens(self) -> int:
        """Upper bound of the visual tokens the piece holds in the prompt."""
        return min(self.max_tokens, sum(m.n_tokens for m in self.members))

    @property
    def merged(self) -> bool:
        """Whether the piece must be built on the fly (several members, or one cut to fit)."""
        return len(self.members) > 1 or self.members[0].n_tokens > self.max_tokens

    @property
    def grain(self) -> str:
        """The grain in words for the prompt, e.g. ``summary of 8 chunks (tier 2)``."""
        return describe_grain(self)


def describe_grain(piece: Piece) -> str:
    """What one piece of memory stands for, in the prompt's words.

    A chunk shown as stored: ``as recorded`` (tier 0) or ``consolidated from 8 chunks (tier 1)``.
    A piece merged on the fly: ``summary of 12 chunks (tier 2)``, plus ``8 of them read`` when the
    bin was sampled.
    """
    top_tier = max(m.tier for m in piece.members)
    tier = "as recorded" if top_tier == 0 else f"tier {top_tier}"
    if not piece.merged:
        only = piece.members[0]
        return "as recorded" if only.tier == 0 else f"consolidated from {only.n_members} chunks ({tier})"
    text = f"summary of {piece.n_covered} chunks ({tier})"
    if len(piece.members) < piece.n_covered:
        text += f", {len(piece.members)} of them read"
    return text


def grain_bound(window: Sequence[WindowChunk]) -> str:
    """The longest grain text a plan over ``window`` can write (for a header's token bound)."""
    top_tier = max((c.tier for c in window), default=0)
    tier = "as recorded" if top_tier == 0 else f"tier {top_tier}"
    most_members = max((c.n_members for c in window), default=0)
    merged = f"summary of {len(window)} chunks ({tier}), {len(window)} of them read"
    stored = f"consolidated from {most_members} chunks ({tier})"
    return max(merged, stored, key=len)


def window_cost(chunks: Sequence[WindowChunk], piece_text_tokens: int) -> int:
    """Tokens the window takes when every chunk is shown as stored, each with its header line."""
    return sum(c.n_tokens + piece_text_tokens for c in chunks)


def plan_cost(pieces: Sequence[Piece], piece_text_tokens: int) -> int:
    """Upper bound of the tokens a plan's pieces take, header lines included."""
    return sum(p.tokens + piece_text_tokens for p in pieces)


def spread(count: int, k: int) -> list[int]:
    """``k`` indices of ``range(count)`` spread evenly, first and last included (all when k >= count).

    k == 1 picks the middle one. Deterministic and increasing.
    """
    if count < 0 or k < 0:
        raise ValueError(f"count and k must be >= 0, got {count} and {k}")
    if k >= count:
        return list(range(count))
    if k == 0:
        return []
    if k == 1:
        return [(count - 1) // 2]
    return sorted({round(i * (count - 1) / (k - 1)) for i in range(k)})


def time_bins(chunks: Sequence[WindowChunk], n_bins: int, lo_s: float, hi_s: float) -> list[list[WindowChunk]]:
    """The non-empty ones of ``n_bins`` equal bins of [lo_s, hi_s), each chunk in the bin of its midpoint.

    ``chunks`` are one camera's, in time order; the bins come in time order and keep it.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    width = (hi_s - lo_s) / n_bins
    bins: list[list[WindowChunk]] = [[] for _ in range(n_bins)]
    for chunk in chunks:
        mid = (chunk.start_s + chunk.end_s) / 2
        index = 0 if width <= 0 else min(n_bins - 1, max(0, math.floor((mid - lo_s) / width)))
        bins[index].append(chunk)
    return [b for b in bins if b]


def _coverage(
    chunks: Sequence[WindowChunk], budget: int, piece_text_tokens: int, min_piece_tokens: int, max_merge_members: int
) -> list[Piece]:
    """Coverage pieces over the whole window within ``budget`` tokens (headers included)."""
    max_pieces = budget // (piece_text_tokens + min_piece_tokens)
    if max_pieces < 1:
        return []
    cameras = sorted({c.camera for c in chunks})
    lo_s = min(c.start_s for c in chunks)
    hi_s = max(c.end_s for c in chunks)
    bins_per_camera = max(1, max_pieces // len(cameras))
    groups = [
        group
        for camera in cameras
        for group in time_bins([c for c in chunks if c.camera == camera], bins_per_camera, lo_s, hi_s)
    ]
    if len(groups) > max_pieces:  # more cameras than pieces: spread the pieces over time
        groups.sort(key=lambda g: (g[0].start_s, g[0].camera))
        groups = [groups[i] for i in spread(len(groups), max_pieces)]
    allowance = (budget - len(groups) * piece_text_tokens) // len(groups)  # >= min_piece_tokens
    pieces = []
    for group in groups:
        members = tuple(group[i] for i in spread(len(group), max_merge_members))
        pieces.append(
            Piece(
                camera=group[0].camera,
                start_s=group[0].start_s,
                end_s=max(c.end_s for c in group),
                members=members,
                n_covered=len(group),
                max_tokens=allowance,
            )
        )
    return pieces


def plan_coverage(
    window: Sequence[WindowChunk],
    hits: Sequence[Hit],
    *,
    budget_tokens: int,
    piece_text_tokens: int,
    top_k: int,
    coverage_share: float = COVERAGE_SHARE,
    min_piece_tokens: int = MIN_PIECE_TOKENS,
    max_merge_members: int = MAX_MERGE_MEMBERS,
) -> list[Piece] | None:
    """Plan a long-window prompt; None when the window fits the budget as stored (the usual path).

    Args:
        window: the stored chunks overlapping the question's window (any order, any cameras).
        hits: similarity hits, best first or not; those outside ``window`` are ignored.
        budget_tokens: tokens the memory pieces may take in all, header lines included.
        piece_text_tokens: upper bound of one piece's header line in tokens.
        top_k: most fine hits beside the coverage.
        coverage_share: share of ``budget_tokens`` kept for coverage (fine hits may take the rest).
        min_piece_tokens: fewest visual tokens of a coverage piece (fewer, wider bins otherwise).
        max_merge_members: most stored chunks read for one coverage piece.

    Returns:
        Pieces in time order (start, camera, coverage before fine) with
        ``plan_cost(pieces, piece_text_tokens) <= budget_tokens``; empty when not even one piece fits.
    """
    if budget_tokens < 0 or piece_text_tokens < 0 or top_k < 0:
        raise ValueError("budget_tokens, piece_text_tokens and top_k must be >= 0")
    if not 0 < coverage_share <= 1:
        raise ValueError(f"coverage_share must be in (0, 1], got {coverage_share}")
    if min_piece_tokens < 1 or max_merge_members < 1:
        raise ValueError("min_piece_tokens and max_merge_members must be >= 1")
    unique = {(c.camera, c.chunk_id): c for c in window}
    chunks = sorted(unique.values(), key=lambda c: (c.start_s, c.end_s, c.camera, c.chunk_id))
    if not chunks or window_cost(chunks, piece_text_tokens) <= budget_tokens:
        return None
    # Fine hits first, within their share, so that coverage can take everything they leave.
    fine_budget = budget_tokens - math.floor(budget_tokens * coverage_share)
    fine: list[Piece] = []
    chosen: set[tuple[str, int]] = set()
    for hit in sorted(hits, key=lambda h: (-h.score, h.camera, h.chunk_id)):
        if len(fine) >= top_k:
            break
        chunk = unique.get((hit.camera, hit.chunk_id))
        if chunk is None or (hit.camera, hit.chunk_id) in chosen:
            continue
        cost = chunk.n_tokens + piece_text_tokens
        if cost > fine_budget:
            continue
        chosen.add((hit.camera, hit.chunk_id))
        fine_budget -= cost
        fine.append(Piece(chunk.camera, chunk.start_s, chunk.end_s, (chunk,), 1, chunk.n_tokens, hit.score, True))
    left = budget_tokens - plan_cost(fine, piece_text_tokens)
    pieces = _coverage(chunks, left, piece_text_tokens, min_piece_tokens, max_merge_members)
    # A hit that coverage already shows as stored would be the same chunk twice: it goes.
    shown = {(p.camera, p.members[0].chunk_id) for p in pieces if not p.merged}
    fine = [p for p in fine if (p.camera, p.members[0].chunk_id) not in shown]
    return sorted([*pieces, *fine], key=lambda p: (p.start_s, p.camera, p.fine, p.end_s))
