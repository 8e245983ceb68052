"""Batch encoder: frames of every camera through the VLM vision path and the embedder together.

Camera tasks call ``await encoder.encode(frames)`` concurrently. Requests wait in one bounded
queue; a collector task takes the first, then gathers more until ``max_batch_frames`` frames are
in hand or ``max_wait_ms`` has passed, and runs the whole batch on one dedicated worker thread
(the models are used by one thread at a time, the event loop never blocks). Results are split
back per caller. A request whose frames are invalid fails alone; an exception in the models fails
the callers of that batch only, and the encoder goes on with the next batch.

A full queue makes ``encode`` wait (backpressure): camera workers drop frames upstream, in their
own bounded frame queues, so a slow encoder never stalls a decoder.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol, Self

import numpy as np
import torch
from torch import Tensor

from vlm.preprocess import check_frames
from vlm.types import VisualTokens

logger = logging.getLogger(__name__)

# Requests (not frames) waiting for a batch; with the default 8-frame batches this holds about
# eight batches of single-chunk requests before ``encode`` starts to wait.
DEFAULT_QUEUE_REQUESTS = 64


class VisionEncoder(Protocol):
    """The part of ``vlm.models.VisionLanguageModel`` the encoder uses."""

    def preprocess(self, frames: np.ndarray) -> Tensor: ...  # [T, H, W, 3] uint8 → [T, 3, S, S]
    def encode_pixels(self, pixels: Tensor) -> VisualTokens: ...


class ImageEmbedder(Protocol):
    """The part of ``vlm.embedder.Embedder`` the encoder uses."""

    def preprocess(self, frames: np.ndarray) -> Tensor: ...  # [T, H, W, 3] uint8 → [T, 3, S, S]
    def embed_pixels(self, pixels: Tensor) -> np.ndarray: ...  # [T, D] float32


class EncoderClosedError(RuntimeError):
    """``encode`` was called on an encoder that is not running."""


@dataclass
class EncodedFrames:
    """What the encoder gives back for one caller's frames."""

    visual: VisualTokens  # tokens [T, N, C], global_feats [T, G]
    embeddings: np.ndarray  # [T, D] float32, L2-normalised retrieval embeddings


@dataclass
class EncoderStats:
    """Counters since start (read them from the loop thread)."""

    batches: int = 0  # executor calls
    requests: int = 0  # callers served, successfully or not
    frames: int = 0  # frames encoded successfully
    failed_requests: int = 0  # callers that got an exception
    largest_batch_frames: int = 0


@dataclass
class _Request:
    frames: np.ndarray
    future: asyncio.Future[EncodedFrames]


class BatchEncoder:
    """``async with BatchEncoder(vlm, embedder, ...) as enc: out = await enc.encode(frames)``."""

    def __init__(
        self,
        vlm: VisionEncoder,
        embedder: ImageEmbedder,
        *,
        max_batch_frames: int,
        max_wait_ms: float,
        queue_requests: int = DEFAULT_QUEUE_REQUESTS,
    ) -> None:
        if max_batch_frames < 1:
            raise ValueError(f"max_batch_frames must be >= 1, got {max_batch_frames}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        self._vlm = vlm
        self._embedder = embedder
        self._max_frames = max_batch_frames
        self._max_wait_s = max_wait_ms / 1000.0
        self._queue_requests = queue_requests
        self._queue: asyncio.Queue[_Request | None] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._collector: asyncio.Task[None] | None = None
        self._carry: _Request | None = None
        self.stats = EncoderStats()

    async def __aenter__(self) -> Self:
        self._queue = asyncio.Queue(maxsize=self._queue_requests)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vigil-encoder")
        self._collector = asyncio.create_task(self._collect(self._queue), name="encoder:collector")
        logger.info(
            "encoder started: batches of up to %d frames, wait %.0f ms",
            self._max_frames,
            self._max_wait_s * 1e3,
        )
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        """Stop accepting, finish every request already queued, then stop the thread."""
        queue, collector, executor = self._queue, self._collector, self._executor
        self._queue = None
        if queue is not None and collector is not None:
            await queue.put(None)  # after every queued request: they are all served first
            try:
                await collector
            except asyncio.CancelledError:
                self._fail_pending(queue, EncoderClosedError("encoder stopped"))
                raise
        if executor is not None:
            await asyncio.to_thread(executor.shutdown, wait=True)
        s = self.stats
        logger.info(
            "encoder stopped: %d batches, %d requests, %d frames, %d failed requests",
            s.batches, s.requests, s.frames, s.failed_requests,
        )  # fmt: skip

    async def encode(self, frames: np.ndarray) -> EncodedFrames:
        """frames [T, H, W, 3] uint8 RGB (any H, W) → EncodedFrames for exactly these frames."""
        queue = self._queue
        if queue is None:
            raise EncoderClosedError("the encoder is not running (use `async with BatchEncoder(...)`)")
        future: asyncio.Future[EncodedFrames] = asyncio.get_running_loop().create_future()
        await queue.put(_Request(frames, future))
        return await future

    # ---- collector (loop side)

    async def _collect(self, queue: asyncio.Queue[_Request | None]) -> None:
        # The queue is handed over, not read from self: __aexit__ clears self._queue, possibly
        # before this task first runs (an encoder opened and closed at once).
        loop = asyncio.get_running_loop()
        stopping = False
        while not stopping:
            first = self._carry or await queue.get()
            self._carry = None
            if first is None:
                return
            batch = [first]
            frames = _frame_count(first)
            deadline = loop.time() + self._max_wait_s
            while frames < self._max_frames:
                remaining = deadline - loop.time()
                try:
                    # get_nowait once the wait is over: a zero timeout would not take a queued item.
                    # asyncio.timeout, not wait_for: see memory/aio.py (python/cpython#86296).
                    if remaining <= 0:
                        item = queue.get_nowait()
                    else:
                        async with asyncio.timeout(remaining):
                            item = await queue.get()
                except (TimeoutError, asyncio.QueueEmpty):
                    break
                if item is None:
                    stopping = True
                    break
                if frames + _frame_count(item) > self._max_frames:
                    self._carry = item  # it starts the next batch; order is kept
                    break
                batch.append(item)
                frames += _frame_count(item)
            await self._run(loop, batch)

    async def _run(self, loop: asyncio.AbstractEventLoop, batch: list[_Request]) -> None:
        assert self._executor is not None
        live = [r for r in batch if not r.future.done()]  # a caller may have been cancelled
        if not live:
            return
        self.stats.batches += 1
        self.stats.largest_batch_frames = max(self.stats.largest_batch_frames, sum(map(_frame_count, live)))
        try:
            results = await loop.run_in_executor(self._executor, self._encode_batch, [r.frames for r in live])
        except Exception as exc:  # a model failure belongs to this batch's callers only
            logger.warning("encoder batch of %d requests failed: %s", len(live), exc)
            results = [exc] * len(live)
        for request, result in zip(live, results, strict=True):
            self.stats.requests += 1
            if request.future.done():
                continue
            if isinstance(result, BaseException):
                self.stats.failed_requests += 1
                request.future.set_exception(result)
            else:
                self.stats.frames += result.embeddings.shape[0]
                request.future.set_result(result)

    @staticmethod
    def _fail_pending(queue: asyncio.Queue[_Request | None], exc: BaseException) -> None:
        while not queue.empty():
            item = queue.get_nowait()
            if item is not None and not item.future.done():
                item.future.set_exception(exc)

    # ---- worker thread

    def _encode_batch(self, requests: list[np.ndarray]) -> list[EncodedFrames | BaseException]:
        """Runs on the encoder thread: one vision and one embedder call for all valid requests."""
        results: list[EncodedFrames | BaseException | None] = []  # None: valid, filled in below
        vision: list[Tensor] = []
        embed: list[Tensor] = []
        for frames in requests:
            try:
                check_frames(frames)
                vision.append(self._vlm.preprocess(frames))  # [T_i, 3, S, S]
                embed.append(self._embedder.preprocess(frames))  # [T_i, 3, S', S']
            except ValueError as exc:  # bad input fails its own caller, not the batch
                results.append(exc)
                continue
            results.append(None)
        if vision:
            self._encode_valid(results, vision, embed)
        return [r for r in results if r is not None]  # every slot is filled by now

    def _encode_valid(
        self, results: list[EncodedFrames | BaseException | None], vision: list[Tensor], embed: list[Tensor]
    ) -> None:
        """Fill the None slots of ``results`` in order, one model call each for all of them."""
        visual = self._vlm.encode_pixels(torch.cat(vision))  # tokens [ΣT, N, C]
        embeddings = self._embedder.embed_pixels(torch.cat(embed))  # [ΣT, D]
        counts = [v.shape[0] for v in vision]
        tokens = torch.split(visual.tokens, counts)
        feats = torch.split(visual.global_feats, counts)
        offsets = np.cumsum([0, *counts])
        slots = [index for index, result in enumerate(results) if result is None]
        for i, index in enumerate(slots):
            results[index] = EncodedFrames(
                visual=VisualTokens(tokens[i], feats[i], visual.grid),
                embeddings=embeddings[offsets[i] : offsets[i + 1]],
            )


def _frame_count(request: _Request) -> int:
    shape = getattr(request.frames, "shape", ())
    return int(shape[0]) if len(shape) == 4 else 1
