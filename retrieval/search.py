"""Retrieval: a question → the memory chunks to show the model, plus the camera outages in range.

Steps: embed the question (SigLIP text tower) → FAISS search with camera and time filters → add
the freshest chunks of the selected cameras when the question is about now → drop near-duplicates
→ keep the best ``max_chunks`` → order by time → fetch and decode the tokens from Redis.

A question with a time window whose memory does not fit the prompt budget (:class:`PromptBudget`)
takes the long-window path instead (issue 10): retrieval/coverage.py plans pieces over the whole
window plus the best hits, and pieces that merge several chunks are consolidated on the fly
(``memory.consolidate.consolidate``, in a thread).

The decisions (is the question about now? which hits are duplicates? which chunks fit?) are plain
functions below, tested on their own; :class:`Retriever` is the thin I/O shell around them.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

from memory.codec import CodecError, decode_chunk
from memory.consolidate import consolidate
from memory.outage import Outage
from retrieval.coverage import Hit, Piece, WindowChunk, grain_bound, plan_coverage

if TYPE_CHECKING:
    from memory.index import VectorIndex
    from memory.store import MemoryStore
    from memory.types import CompressedChunk

log = logging.getLogger(__name__)

# Two hits of the same camera whose spans overlap by more than this share of the shorter span
# show the same moment (a re-indexed chunk, or a fresh chunk that was also a search hit).
DUPLICATE_OVERLAP = 0.5
# Fresh chunks are added because of their time, not their similarity; they carry this score.
FRESH_SCORE = 0.0
# Hits fetched per wanted chunk: room for the near-duplicates dedupe drops.
SEARCH_OVERFETCH = 2
# Coverage pieces of a long-window plan are there for their time, like fresh chunks.
COVERAGE_SCORE = 0.0

# The "about now" rule: explicit now-words decide; otherwise a question without a time filter in
# the present tense ("is the gate open?") is about now, one in the past tense is not.
NOW_WORDS = re.compile(
    r"\b(now|right now|currently|current|at the moment|at present|presently|still|live|latest|"
    r"these days|at this moment)\b",
    re.IGNORECASE,
)
# Past auxiliaries and time words only: a suffix rule ("-ed") would read "is the red car parked?"
# as past.
PAST_WORDS = re.compile(
    r"\b(was|were|did|had|happened|yesterday|earlier|ago|last|before|previously|came|went|left|"
    r"arrived|saw|seen)\b",
    re.IGNORECASE,
)
PRESENT_WORDS = re.compile(r"\b(is|are|am|does|do|has|have)\b|\w'(s|re)\b", re.IGNORECASE)


class TextEmbedder(Protocol):
    """The part of ``vlm.embedder.Embedder`` retrieval needs."""

    def embed_text(self, texts: list[str]) -> np.ndarray: ...  # [B, D] float32, L2-normalised


# --------------------------------------------------------------------------- pure parts


def is_about_now(question: str, after_s: float | None, before_s: float | None) -> bool:
    """Whether the freshest chunks belong in the answer (the rule in the module docstring)."""
    if NOW_WORDS.search(question):
        return True
    if after_s is not None or before_s is not None:
        return False
    if PAST_WORDS.search(question):
        return False
    return PRESENT_WORDS.search(question) is not None


@dataclass(frozen=True)
class Candidate:
    """A chunk that may go into the prompt: from the vector search or because it is the freshest."""

    camera: str
    chunk_id: int
    start_s: float
    end_s: float
    score: float
    fresh: bool = False


def _overlap_share(a: Candidate, b: Candidate) -> float:
    """Overlap of two spans as a share of the shorter one (0 when disjoint)."""
    overlap = min(a.end_s, b.end_s) - max(a.start_s, b.start_s)
    shorter = min(a.end_s - a.start_s, b.end_s - b.start_s)
    if overlap <= 0:
        return 0.0
    return 1.0 if shorter <= 0 else overlap / shorter


def dedupe(candidates: Sequence[Candidate], *, overlap: float = DUPLICATE_OVERLAP) -> list[Candidate]:
    """Drop repeats: same chunk id, or same camera with spans overlapping more than ``overlap``.

    The best-scored of a group survives (fresh beats a search hit only on score); the result keeps
    the input's order of survivors. O(n²), n is a few dozen.
    """
    ranked = sorted(range(len(candidates)), key=lambda i: -candidates[i].score)
    kept: list[int] = []
    for i in ranked:
        c = candidates[i]
        if any(
            candidates[j].chunk_id == c.chunk_id
            or (candidates[j].camera == c.camera and _overlap_share(candidates[j], c) > overlap)
            for j in kept
        ):
            continue
        kept.append(i)
    return [candidates[i] for i in sorted(kept)]


def select(hits: Sequence[Candidate], fresh: Sequence[Candidate], *, top_k: int, max_chunks: int) -> list[Candidate]:
    """The chunks for the prompt, in time order.

    The best ``top_k`` search hits and every fresh chunk, without duplicates, capped at
    ``max_chunks``: fresh chunks first (a question about now needs them), then hits by score.
    """
    best_hits = sorted(dedupe(hits), key=lambda c: -c.score)[:top_k]
    merged = dedupe([*fresh, *best_hits])
    merged.sort(key=lambda c: (not c.fresh, -c.score))
    return order_by_time(merged[:max_chunks])


def order_by_time(candidates: Sequence[Candidate]) -> list[Candidate]:
    """Time order (start, then end, then camera): the order the model reads the memory in."""
    return sorted(candidates, key=lambda c: (c.start_s, c.end_s, c.camera))


def clip_outages(outages: Sequence[Outage], after_s: float | None, before_s: float | None) -> list[Outage]:
    """The outages overlapping the window, clipped to it, by start time.

    An outage still open (``end_s`` None) stays open unless the window ends: then it ends there.
    """
    lo = -math.inf if after_s is None else after_s
    hi = math.inf if before_s is None else before_s
    clipped = []
    for o in outages:
        end = math.inf if o.end_s is None else o.end_s
        if end <= lo or o.start_s >= hi:
            continue
        clipped_end = None if (o.end_s is None and before_s is None) else min(end, hi)
        clipped.append(Outage(o.camera, max(o.start_s, lo), clipped_end, o.reason))
    return sorted(clipped, key=lambda r: (r.start_s, r.camera))


# --------------------------------------------------------------------------- I/O shell


@dataclass(frozen=True)
class RetrievedChunk:
    """A chunk to show the model: where and when, its retrieval score and its decoded tokens.

    ``grain`` is set on the long-window path: what the piece stands for in words (e.g. ``summary
    of 8 chunks (tier 2)``, retrieval/coverage.py), written into the prompt beside its span. A
    piece merged on the fly carries its first member's ``chunk_id``.
    """

    camera: str
    chunk_id: int
    start_s: float
    end_s: float
    score: float
    fresh: bool
    chunk: CompressedChunk
    grain: str | None = None
    fine: bool = False  # long-window path: a similarity hit at its stored grain, not coverage


@dataclass(frozen=True)
class Retrieved:
    """Everything the prompt needs: chunks in time order and the outages in the window.

    ``planned`` says the long-window path chose the chunks (a coverage plan within the budget).
    """

    chunks: list[RetrievedChunk]
    outages: list[Outage]  # clipped to the window
    after_s: float | None
    before_s: float | None
    about_now: bool
    planned: bool = False


@dataclass(frozen=True)
class PromptBudget:
    """What the memory of one prompt may cost, from the answerer (which knows the tokenizer).

    Attributes:
        tokens: tokens the memory pieces and the outage lines may take together (the prompt
            budget less the preamble, the question and the chat template).
        header_tokens: (camera, grain text) → tokens of a header line of that camera with that
            grain and the longest span text, the newline after the piece included.
        outage_tokens: an outage → tokens of its line in the prompt.
    """

    tokens: int
    header_tokens: Callable[[str, str], int]
    outage_tokens: Callable[[Outage], int]


class Retriever:
    """Question → :class:`Retrieved`, over ``memory.store.MemoryStore`` and ``memory.index.VectorIndex``."""

    def __init__(
        self,
        embedder: TextEmbedder,
        store: MemoryStore,
        index: VectorIndex,
        *,
        top_k: int,
        recent_chunks: int,
        max_chunks: int,
    ) -> None:
        self._embedder = embedder
        self._store = store
        self._index = index
        self._top_k = top_k
        self._recent_chunks = recent_chunks
        self._max_chunks = max_chunks

    async def retrieve(
        self,
        question: str,
        *,
        cameras: Sequence[str] | None,
        after_s: float | None,
        before_s: float | None,
        top_k: int | None = None,
        budget: PromptBudget | None = None,
    ) -> Retrieved:
        """Search, add the freshest chunks when asked about now, dedupe, fetch, decode.

        With a ``budget`` and a time window whose memory does not fit it, the long-window path
        (module docstring) chooses the chunks instead.
        """
        k = top_k or self._top_k
        # Embedding and FAISS are CPU work: off the loop so MQTT and ingest keep moving.
        query = await asyncio.to_thread(self._embedder.embed_text, [question])  # [1, D]
        raw_hits = await asyncio.to_thread(
            self._index.search,
            np.asarray(query[0], dtype=np.float32),  # [D]
            k * SEARCH_OVERFETCH,
            set(cameras) if cameras else None,
            after_s,
            before_s,
        )
        hits = [Candidate(h.camera, h.chunk_id, h.start_s, h.end_s, h.score) for h in raw_hits]
        about_now = is_about_now(question, after_s, before_s)
        fresh: list[Candidate] = []
        if about_now and self._recent_chunks > 0:
            for camera in list(cameras) if cameras else await self._store.cameras():
                fresh.extend(
                    Candidate(m.camera, m.chunk_id, m.start_s, m.end_s, FRESH_SCORE, fresh=True)
                    for m in await self._store.latest_chunks(camera, self._recent_chunks)
                )
        outages = clip_outages(
            await self._store.outages(list(cameras) if cameras else None, after_s, before_s), after_s, before_s
        )
        if budget is not None and (after_s is not None or before_s is not None):
            window = await self._window(cameras, after_s, before_s)
            longest = grain_bound(window)
            header = max((budget.header_tokens(c, longest) for c in {w.camera for w in window}), default=0)
            plan = plan_coverage(
                window,
                [Hit(h.camera, h.chunk_id, h.score) for h in hits],
                budget_tokens=max(0, budget.tokens - sum(budget.outage_tokens(o) for o in outages)),
                piece_text_tokens=header,
                top_k=k,
            )
            if plan is not None:
                pieces = await self._build(plan)
                log.info(
                    "long window: %d chunks in range, %d pieces planned (%d fine), %d built",
                    len(window), len(plan), sum(p.fine for p in plan), len(pieces),
                )  # fmt: skip
                return Retrieved(pieces, outages, after_s, before_s, about_now, planned=True)
        chosen = select(hits, fresh, top_k=k, max_chunks=self._max_chunks)
        chunks = await self._fetch(chosen)
        log.debug("retrieved %d chunks (%d hits, %d fresh, now=%s)", len(chunks), len(hits), len(fresh), about_now)
        return Retrieved(chunks, outages, after_s, before_s, about_now)

    async def _window(
        self, cameras: Sequence[str] | None, after_s: float | None, before_s: float | None
    ) -> list[WindowChunk]:
        """Every stored chunk of the selected cameras overlapping the window (metadata only)."""
        out: list[WindowChunk] = []
        for camera in list(cameras) if cameras else await self._store.cameras():
            out.extend(
                WindowChunk(m.camera, m.chunk_id, m.start_s, m.end_s, m.n_tokens, m.tier, len(m.members))
                for m in await self._store.chunks_in_range(camera, after_s, before_s)
            )
        return out

    async def _build(self, plan: Sequence[Piece]) -> list[RetrievedChunk]:
        """The planned pieces with their tokens: stored chunks decoded, merged pieces consolidated.

        A member deleted or corrupt since it was listed is left out of its piece; a piece left
        with no member, or whose members cannot be merged, is skipped. Decoding and merging run
        in one worker thread (tensor work, off the loop).
        """
        refs = sorted({(m.camera, m.chunk_id) for p in plan for m in p.members})
        rows = await self._store.get_chunks(refs)

        def build() -> list[RetrievedChunk]:
            decoded: dict[tuple[str, int], CompressedChunk] = {}
            for meta, payload in rows:
                try:
                    decoded[(meta.camera, meta.chunk_id)] = decode_chunk(payload)
                except CodecError as exc:  # one damaged payload must not fail the whole question
                    log.error("chunk %d of %s has a corrupt payload; skipped: %s", meta.chunk_id, meta.camera, exc)
            out = []
            for piece in plan:
                members = [decoded[key] for m in piece.members if (key := (m.camera, m.chunk_id)) in decoded]
                if not members:
                    continue
                chunk = members[0]
                if piece.merged:
                    total = sum(c.n_tokens for c in members)
                    try:
                        chunk = consolidate(members, min(1.0, piece.max_tokens / total)).chunk
                    except ValueError as exc:  # e.g. members of two encoders (the model changed)
                        log.error("long window: %d chunks of %s not merged: %s", len(members), piece.camera, exc)
                        continue
                score = piece.score if piece.fine else COVERAGE_SCORE
                first = piece.members[0].chunk_id
                out.append(
                    RetrievedChunk(
                        piece.camera, first, piece.start_s, piece.end_s, score, False, chunk, piece.grain, piece.fine
                    )
                )
            return out

        return await asyncio.to_thread(build)

    async def _fetch(self, chosen: Sequence[Candidate]) -> list[RetrievedChunk]:
        """Payloads from Redis, decoded; a chunk deleted since it was indexed, or whose payload is
        corrupt, is skipped."""
        rows = await self._store.get_chunks([(c.camera, c.chunk_id) for c in chosen])
        payloads = {(meta.camera, meta.chunk_id): payload for meta, payload in rows}
        out = []
        for c in chosen:
            payload = payloads.get((c.camera, c.chunk_id))
            if payload is None:
                log.info("chunk %d of %s expired before it could be read; skipped", c.chunk_id, c.camera)
                continue
            try:
                chunk = decode_chunk(payload)
            except CodecError as exc:  # one damaged payload must not fail the whole question
                log.error("chunk %d of %s has a corrupt payload; skipped: %s", c.chunk_id, c.camera, exc)
                continue
            out.append(RetrievedChunk(c.camera, c.chunk_id, c.start_s, c.end_s, c.score, c.fresh, chunk))
        return out
