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
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol
from zoneinfo import ZoneInfo

from memory.outage import Outage
from retrieval.prompt import StaleCamera, build_prompt
from retrieval.search import Retriever
from retrieval.timephrases import read_window

if TYPE_CHECKING:
    from vlm.types import PromptPart

log = logging.getLogger(__name__)

# A generation that ignores its deadline (a single slow decode step) still gets this much extra
# time before the answer is returned without it; the executor thread finishes on its own.
GENERATION_GRACE_S = 5.0
# A camera's newest memory older than this does not show "now". Chunks are stored when they end,
# plus encoding: with the default 8 s chunks the newest is 8-20 s old on a healthy camera. The
# daemon raises it for longer chunks (streamer/daemon.py).
FRESH_WITHIN_S = 60.0


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


def latest_memories(
    spans: list[tuple[str, float]], *, now_s: float, fresh_within_s: float
) -> list[Latest]:
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
    ) -> None:
        self._vlm = vlm
        self._retriever = retriever
        self._tz = tz
        self._max_new_tokens = max_new_tokens
        self._generation_timeout_s = generation_timeout_s
        self._fresh_within_s = fresh_within_s
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
        )
        timing["retrieve"] = (time.perf_counter() - started) * 1000.0
        latest: list[Latest] = []
        if retrieved.about_now:
            latest = latest_memories(
                [(c.camera, c.end_s) for c in retrieved.chunks], now_s=time.time(), fresh_within_s=self._fresh_within_s
            )
        stale = [StaleCamera(item.camera, item.end_s, item.age_s) for item in latest if not item.fresh]
        parts = build_prompt(question.text, retrieved.chunks, retrieved.outages, tz=self._tz, stale=stale)
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
        citations = [Citation(c.camera, c.start_s, c.end_s, c.score) for c in retrieved.chunks]
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
        )

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
