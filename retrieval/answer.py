"""Answering: retrieval + prompt + generation → an :class:`Answer` with citations.

Generation is the slowest step (seconds on CPU), so it runs on a dedicated single-thread executor
(``vigil-generate``): the event loop keeps serving MQTT and the cameras' ingest never waits for an
answer. One generation runs at a time; concurrency above that is bounded by the MQTT API's
``max_in_flight``. Text deltas cross from the executor thread to the loop through a queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol
from zoneinfo import ZoneInfo

from memory.outage import Outage
from retrieval.prompt import PREAMBLE, StaleCamera, build_prompt, chunk_header, outage_line
from retrieval.search import PromptBudget, Retrieved, RetrievedChunk, Retriever
from retrieval.timephrases import read_window
from vlm.types import TextPart, VisualPart

if TYPE_CHECKING:
    from torch import Tensor

    from vlm.types import PromptPart

log = logging.getLogger(__name__)

# A generation that ignores its deadline (a single slow decode step) still gets this much extra
# time before the answer is returned without it; the executor thread finishes on its own.
GENERATION_GRACE_S = 5.0
# A camera's newest memory older than this does not show "now". Chunks are stored when they end,
# plus encoding: with the default 8 s chunks the newest is 8-20 s old on a healthy camera. The
# daemon raises it for longer chunks (streamer/daemon.py).
FRESH_WITHIN_S = 60.0
# Tokens of the chat template around the prompt (system prompt "You are a helpful assistant." and
# the role markers: 20 in Qwen2's template, 41 in the tiny test tokenizer's); kept out of the
# memory's budget. The exact prompt length, where the model gives one, is checked after assembly.
TEMPLATE_TOKENS = 64
# A span over two dates, the longest span text (retrieval/prompt.format_span).
_SPAN_BOUND_S = (0.0, 2 * 86_400.0)


def utf8_bytes(text: str) -> int:
    """Token bound of ``text`` for byte-level BPE tokenizers (Qwen2's, the tiny test one): one
    token never holds less than a byte, so the UTF-8 length bounds the count from above."""
    return len(text.encode("utf-8"))


class PromptTokenizer(Protocol):
    """The part of ``vlm.models.VisionLanguageModel`` that counts a prompt exactly."""

    def prompt_ids(self, parts: Sequence[PromptPart]) -> Tensor: ...

    @property
    def tokenizer(self) -> Any: ...


def exact_prompt_length(vlm: PromptTokenizer, parts: Sequence[PromptPart]) -> int:
    """Tokens the model reads for ``parts``: the chat's ids with each visual placeholder replaced
    by that part's tokens (``VisionLanguageModel.assemble`` does the same)."""
    visuals = [p for p in parts if isinstance(p, VisualPart)]
    return int(vlm.prompt_ids(parts).shape[0]) - len(visuals) + sum(int(p.tokens.shape[0]) for p in visuals)


def text_token_counter(vlm: PromptTokenizer) -> Callable[[str], int]:
    """Exact token count of a text with the model's tokenizer (no special tokens)."""

    def count(text: str) -> int:
        return len(vlm.tokenizer(text, add_special_tokens=False)["input_ids"])

    return count


@dataclass(frozen=True)
class Question:
    """A validated question, as the MQTT API hands it over. Times are UTC epoch seconds."""

    text: str
    cameras: list[str] | None = None
    after_s: float | None = None
    before_s: float | None = None
    top_k: int | None = None
    stream: bool = False


@dataclass(frozen=True)
class Citation:
    """A chunk the answer was based on: camera, span (UTC epoch seconds) and retrieval score."""

    camera: str
    start_s: float
    end_s: float
    score: float


@dataclass(frozen=True)
class Latest:
    """A camera's newest memory shown for a question about now, and whether it still shows now."""

    camera: str
    end_s: float  # UTC epoch seconds
    age_s: float  # seconds between end_s and when the question was answered
    fresh: bool  # age_s <= the answerer's fresh_within_s


@dataclass
class Answer:
    """The model's answer, the chunks it saw, the outages in its window and how long each step took.

    ``about_now`` says the question was read as about the present; then ``latest`` has each cited
    camera's newest memory with its age, and :attr:`fresh` says whether all of them still show now.
    """

    text: str
    citations: list[Citation]
    after_s: float | None
    before_s: float | None
    timing_ms: dict[str, float] = field(default_factory=dict)
    offline: list[Outage] = field(default_factory=list)  # outages of the selected cameras in the window
    about_now: bool = False
    latest: list[Latest] = field(default_factory=list)
    window_phrase: str | None = None  # the question's words the window was read from (retrieval/timephrases.py)
    prompt_tokens: int | None = None  # tokens of the prompt the model read (exact where the model counts them)
    planned: bool = False  # the long-window path chose the memory (retrieval/coverage.py)

    @property
    def fresh(self) -> bool | None:
        """None when not about now; else whether memory exists and every camera's newest is fresh."""
        if not self.about_now:
            return None
        return bool(self.latest) and all(item.fresh for item in self.latest)

    @property
    def age_s(self) -> float | None:
        """Age of the stalest camera's newest memory (None when not about now or nothing was found)."""
        if not self.about_now or not self.latest:
            return None
        return max(item.age_s for item in self.latest)


def latest_memories(spans: list[tuple[str, float]], *, now_s: float, fresh_within_s: float) -> list[Latest]:
    """(camera, end_s) of the chunks shown → each camera's newest, with its age at ``now_s``, by camera."""
    newest: dict[str, float] = {}
    for camera, end_s in spans:
        newest[camera] = max(end_s, newest.get(camera, end_s))
    return [
        Latest(camera, end_s, max(0.0, now_s - end_s), now_s - end_s <= fresh_within_s)
        for camera, end_s in sorted(newest.items())
    ]


class Generator(Protocol):
    """The part of ``vlm.models.VisionLanguageModel`` the answerer uses."""

    def generate_stream(
        self, parts: list[PromptPart], *, max_new_tokens: int, deadline_s: float | None = None
    ) -> Iterator[str]: ...


_DONE = object()


class StreamTrimmer:
    """Strips a streamed answer the way the final answer is stripped, delta by delta.

    Leading whitespace is dropped; trailing whitespace is held back until more text follows it,
    so the streamed pieces add up to exactly ``"".join(deltas).strip()``.
    """

    def __init__(self) -> None:
        self._started = False
        self._held = ""

    def feed(self, delta: str) -> str:
        """The part of ``delta`` that can be sent now ("" when nothing can)."""
        text = self._held + delta if self._started else delta.lstrip()
        visible = text.rstrip()
        if not visible:
            self._held = text
            return ""
        self._started = True
        self._held = text[len(visible) :]
        return visible


class Answerer:
    """Question → retrieved memory → prompt → streamed model answer."""

    def __init__(
        self,
        vlm: Generator,
        retriever: Retriever,
        *,
        tz: ZoneInfo,
        max_new_tokens: int,
        generation_timeout_s: float,
        fresh_within_s: float = FRESH_WITHIN_S,
        max_prompt_tokens: int | None = None,
        count_text: Callable[[str], int] = utf8_bytes,
        prompt_length: Callable[[Sequence[PromptPart]], int] | None = None,
    ) -> None:
        """``max_prompt_tokens`` turns on the long-window path (retrieval/coverage.py); None keeps
        every question on the top-k path. ``count_text`` counts a text's tokens (an upper bound is
        enough); ``prompt_length`` counts an assembled prompt exactly (``exact_prompt_length``),
        else the prompt is counted with ``count_text`` plus ``TEMPLATE_TOKENS``."""
        self._vlm = vlm
        self._retriever = retriever
        self._tz = tz
        self._max_new_tokens = max_new_tokens
        self._generation_timeout_s = generation_timeout_s
        self._fresh_within_s = fresh_within_s
        self._max_prompt_tokens = max_prompt_tokens
        self._count_text = count_text
        self._prompt_length = prompt_length or self._estimate_length
        # One thread: one answer at a time leaves the cores to ingest (generation is stateless,
        # docs/models.md, so this is about CPU, not safety); max_in_flight bounds the queue.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vigil-generate")
        self._closing = threading.Event()  # set by close(): a running generation stops at its next token

    def close(self) -> None:
        """Stop the generation thread: a running generation ends at its next token.

        Called when the daemon stops, also after an unexpected error, when the answer's own task
        may not have been cancelled yet: waiting for the generation's deadline (up to
        ``generation_timeout_s``) would hold the exit for that long.
        """
        self._closing.set()
        self._executor.shutdown(wait=True, cancel_futures=True)

    async def answer(self, question: Question, on_delta: Callable[[str], Awaitable[None]] | None = None) -> Answer:
        """Answer one question; ``on_delta`` receives text pieces as they are generated."""
        timing: dict[str, float] = {}
        started = time.perf_counter()
        after_s, before_s, phrase = question.after_s, question.before_s, None
        # An explicit after/before wins; without either, the question's own time words set the window.
        if after_s is None and before_s is None:
            # Off the loop: dateparser takes milliseconds a phrase (more on the first call, which
            # loads its language data), and MQTT and the cameras' ingest must not wait on it.
            read = await asyncio.to_thread(read_window, question.text, now_s=time.time(), tz=self._tz)
            if read is not None:
                after_s, before_s, phrase = read.after_s, read.before_s, read.phrase
        retrieved = await self._retriever.retrieve(
            question.text,
            cameras=question.cameras,
            after_s=after_s,
            before_s=before_s,
            top_k=question.top_k,
            budget=self._budget(question.text),
        )
        timing["retrieve"] = (time.perf_counter() - started) * 1000.0
        latest: list[Latest] = []
        if retrieved.about_now:
            latest = latest_memories(
                [(c.camera, c.end_s) for c in retrieved.chunks], now_s=time.time(), fresh_within_s=self._fresh_within_s
            )
        stale = [StaleCamera(item.camera, item.end_s, item.age_s) for item in latest if not item.fresh]
        # Off the loop, on the generation thread: counting tokenizes the whole prompt (milliseconds
        # for a long window), and one answer is generated at a time anyway.
        parts, prompt_tokens, shown = await asyncio.get_running_loop().run_in_executor(
            self._executor, self._fit, question.text, retrieved, stale
        )
        gen_started = time.perf_counter()
        pieces: list[str] = []
        first_token_s: float | None = None
        trim = StreamTrimmer()
        async for delta in self._generate(parts):
            if first_token_s is None:
                first_token_s = time.perf_counter()
            visible = trim.feed(delta)
            if not visible:
                continue
            pieces.append(visible)
            if on_delta is not None:
                await on_delta(visible)
        done = time.perf_counter()
        if first_token_s is not None:
            timing["first_token"] = (first_token_s - started) * 1000.0
        timing["generate"] = (done - gen_started) * 1000.0
        timing["total"] = (done - started) * 1000.0
        citations = [Citation(c.camera, c.start_s, c.end_s, c.score) for c in shown]
        return Answer(
            text="".join(pieces),
            citations=citations,
            after_s=retrieved.after_s,
            before_s=retrieved.before_s,
            timing_ms=timing,
            offline=list(retrieved.outages),
            about_now=retrieved.about_now,
            latest=latest,
            window_phrase=phrase,
            prompt_tokens=prompt_tokens,
            planned=retrieved.planned,
        )

    def _budget(self, question: str) -> PromptBudget | None:
        """What the memory may cost within ``max_prompt_tokens`` (None: no budget, the top-k path)."""
        if self._max_prompt_tokens is None:
            return None
        zone = datetime.now(self._tz).tzname() or str(self._tz)
        fixed = (
            self._count_text(PREAMBLE.format(zone=zone) + "\n")
            + self._count_text(f"Question: {question.strip()}\nAnswer:")
            + TEMPLATE_TOKENS
        )

        def header(camera: str, grain: str) -> int:
            # build_prompt writes the header line, the tokens, then a newline.
            return self._count_text(chunk_header(camera, *_SPAN_BOUND_S, self._tz, grain)) + self._count_text("\n")

        return PromptBudget(
            tokens=max(0, self._max_prompt_tokens - fixed),
            header_tokens=header,
            outage_tokens=lambda outage: self._count_text(outage_line(outage, self._tz)),
        )

    def _estimate_length(self, parts: Sequence[PromptPart]) -> int:
        """Prompt tokens without the model's tokenizer: ``count_text`` of the text plus visual tokens."""
        return TEMPLATE_TOKENS + sum(
            self._count_text(p.text) if isinstance(p, TextPart) else int(p.tokens.shape[0]) for p in parts
        )

    def _fit(
        self, question: str, retrieved: Retrieved, stale: Sequence[StaleCamera]
    ) -> tuple[list[PromptPart], int, list[RetrievedChunk]]:
        """The prompt, its length and the chunks it shows.

        A long-window prompt over the budget loses its weakest fine hits until it fits (the plan's
        bounds make that rare: a tokenizer counting more than ``count_text`` said).
        """
        chunks = list(retrieved.chunks)
        while True:
            parts = build_prompt(question, chunks, retrieved.outages, tz=self._tz, stale=stale)
            length = self._prompt_length(parts)
            if self._max_prompt_tokens is None or not retrieved.planned or length <= self._max_prompt_tokens:
                return parts, length, chunks
            fine = [c for c in chunks if c.fine]
            if not fine:
                log.warning("long-window prompt of %d tokens is over the budget of %d", length, self._max_prompt_tokens)
                return parts, length, chunks
            weakest = min(fine, key=lambda c: (c.score, -c.start_s))
            chunks = [c for c in chunks if c is not weakest]

    async def _generate(self, parts: list[PromptPart]) -> AsyncIterator[str]:
        """Run ``generate_stream`` on the generation thread, yielding its deltas on the loop."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[object] = asyncio.Queue()
        cancelled = threading.Event()
        deadline_s = time.monotonic() + self._generation_timeout_s

        def put(item: object) -> None:
            # The loop may be gone when an abandoned generation ends (vigil stopping): drop it.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(queue.put_nowait, item)

        def produce() -> None:
            try:
                for delta in self._vlm.generate_stream(
                    parts, max_new_tokens=self._max_new_tokens, deadline_s=deadline_s
                ):
                    if cancelled.is_set() or self._closing.is_set():
                        break
                    put(delta)
            except Exception as exc:  # handed to the loop and re-raised there
                put(exc)
            finally:
                put(_DONE)

        future = loop.run_in_executor(self._executor, produce)
        try:
            while True:
                remaining = deadline_s + GENERATION_GRACE_S - time.monotonic()
                # asyncio.timeout, not asyncio.wait_for: on Python 3.11 wait_for returns an item
                # that arrived together with a cancellation of the caller and drops the
                # cancellation (https://github.com/python/cpython/issues/86296), so the MQTT
                # API's answer timeout was lost while deltas were queued.
                try:
                    async with asyncio.timeout(max(remaining, 0.0)):
                        item = await queue.get()
                except TimeoutError:
                    log.warning(
                        "generation overran its deadline by %.1f s; answering with what came", GENERATION_GRACE_S
                    )
                    return
                if item is _DONE:
                    return
                if isinstance(item, Exception):
                    raise item
                yield str(item)
        finally:
            # A cancelled or timed-out answer stops the model at its next token.
            cancelled.set()
            if future.done() and not future.cancelled():
                future.exception()
