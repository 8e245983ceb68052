"""Retrieval: pure decisions (now-detection, windows, dedupe, selection, outages) and the Retriever
and Answerer over a real MemoryStore in Redis, a real VectorIndex and the tiny models."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import time
from datetime import datetime
from zoneinfo import ZoneInfo

import numpy as np
import pytest

from memory.codec import encode_chunk
from memory.index import VectorIndex
from memory.outage import Outage
from memory.store import ChunkMeta, MemoryStore
from retrieval.answer import Answerer, Question, exact_prompt_length, text_token_counter
from retrieval.search import (
    Candidate,
    PromptBudget,
    Retriever,
    clip_outages,
    dedupe,
    is_about_now,
    select,
)
from tests.test_prompt import make_chunk

TZ = ZoneInfo("Europe/Berlin")
T0 = datetime(2026, 11, 20, 10, 0, 0, tzinfo=TZ).timestamp()
STREAM_TIMEOUT_S = 0.05  # the answer timeout that 2 of 5 streamed answers outran
# Slower than the tiny model makes a token, so deltas are always queued when the timeout fires.
PUBLISH_S = 0.02


# --------------------------------------------------------------------------- pure parts


@pytest.mark.parametrize(
    ("question", "window", "expected"),
    [
        ("Is the garage door open right now?", (None, None), True),
        ("what is happening currently", (T0, None), True),  # a now-word wins over a window
        ("Is anyone at the door?", (None, None), True),  # present tense, no window
        ("Is the red car parked in the garage?", (None, None), True),  # "-ed" words are not the past
        ("Who was at the door?", (None, None), False),  # past tense
        ("Did a car arrive yesterday?", (None, None), False),
        ("Is anyone at the door?", (T0, T0 + 60), False),  # a window is not now
        ("cars and bicycles", (None, None), False),  # no verb, no now-word
    ],
)
def test_about_now_rule(question, window, expected):
    assert is_about_now(question, *window) is expected


def cand(camera: str, cid: int, start: float, score: float, *, length: float = 8.0, fresh: bool = False):
    return Candidate(camera, cid, start, start + length, score, fresh)


def test_dedupe_drops_same_id_and_overlapping_spans_of_one_camera():
    items = [
        cand("a", 1, 0.0, 0.9),
        cand("a", 1, 0.0, 0.1, fresh=True),  # same chunk again
        cand("a", 2, 3.0, 0.5),  # overlaps chunk 1 by 5/8 of the shorter span
        cand("b", 3, 0.0, 0.4),  # same time, other camera: kept
        cand("a", 4, 6.0, 0.3),  # overlaps chunk 1 by 2/8: kept
    ]
    assert [c.chunk_id for c in dedupe(items)] == [1, 3, 4]


def test_select_keeps_fresh_then_best_hits_in_time_order():
    hits = [cand("a", i, 100.0 * i, score=i / 10) for i in range(1, 8)]  # best: 7, 6, 5 …
    fresh = [cand("a", 100, 5000.0, 0.0, fresh=True), cand("b", 101, 5000.0, 0.0, fresh=True)]
    chosen = select(hits, fresh, top_k=3, max_chunks=4)
    assert [c.chunk_id for c in chosen] == [6, 7, 100, 101]  # top hits 7, 6 (5 cut by max), time order
    assert [c.start_s for c in chosen] == sorted(c.start_s for c in chosen)
    assert [c.chunk_id for c in select(hits, [], top_k=2, max_chunks=10)] == [6, 7]


def test_outages_are_clipped_to_the_window():
    outages = [
        Outage("a", 10.0, 20.0, "eof"),
        Outage("b", 50.0, None, "refused"),  # still offline
        Outage("a", 200.0, 300.0, "after the window"),
    ]
    assert clip_outages(outages, 15.0, 100.0) == [
        Outage("a", 15.0, 20.0, "eof"),
        Outage("b", 50.0, 100.0, "refused"),
    ]
    assert clip_outages(outages, 250.0, None)[-1] == Outage("b", 250.0, None, "refused")


# --------------------------------------------------------------------------- with Redis and models


async def fill(store: MemoryStore, index: VectorIndex, embedder, c: int) -> dict[str, ChunkMeta]:
    """Three stored chunks; each chunk's vector is the embedding of a caption of it."""
    captions = {
        "front_door": (T0, "a person at the front door"),
        "garage": (T0 + 60.0, "a red car in the garage"),
        "garage2": (T0 + 120.0, "an empty garage"),
    }
    metas = {}
    for n, (key, (start, caption)) in enumerate(captions.items()):
        camera = key.rstrip("2")
        chunk = make_chunk(10, c, t0=start, seed=n)
        meta = ChunkMeta.create(
            camera, start, start + 8.0, n_frames=3, n_input_tokens=chunk.n_input, n_tokens=10, codec="fp16/v1"
        )
        vector = embedder.embed_text([caption])[0]
        assert await store.put_chunk(meta, encode_chunk(chunk), vector)
        index.add(meta, vector)
        metas[key] = meta
    await store.put_outage(Outage("garage", T0 + 20.0, T0 + 50.0, "connection refused"))
    return metas


@pytest.fixture
async def memory(redis_client, prefix, tiny_embedder, tiny_vlm):
    store = MemoryStore(redis_client, key_prefix=prefix)
    index = VectorIndex(tiny_embedder.dim)
    metas = await fill(store, index, tiny_embedder, tiny_vlm.hidden_size)
    return store, index, metas


async def test_retriever_filters_fetches_and_reports_outages(memory, tiny_embedder):
    store, index, metas = memory
    retriever = Retriever(tiny_embedder, store, index, top_k=6, recent_chunks=1, max_chunks=12)
    everything = await retriever.retrieve("cars", cameras=None, after_s=None, before_s=None)
    assert [c.chunk_id for c in everything.chunks] == [metas[k].chunk_id for k in ("front_door", "garage", "garage2")]
    assert everything.chunks[0].chunk.tokens.shape == (10, everything.chunks[0].chunk.tokens.shape[1])
    assert [o.reason for o in everything.outages] == ["connection refused"]

    garage = await retriever.retrieve("cars", cameras=["garage"], after_s=T0 + 100, before_s=None)
    assert [c.chunk_id for c in garage.chunks] == [metas["garage2"].chunk_id]
    assert garage.outages == []  # the outage ended before the window

    # About now: the freshest chunk of each camera is included even when search ranks it out.
    now = await retriever.retrieve("what is happening now?", cameras=None, after_s=None, before_s=None, top_k=1)
    assert now.about_now
    ids = {c.chunk_id for c in now.chunks}
    assert {metas["front_door"].chunk_id, metas["garage2"].chunk_id} <= ids
    assert any(c.fresh for c in now.chunks)


async def test_a_corrupt_payload_is_skipped_not_fatal(memory, tiny_embedder, redis_client):
    store, index, metas = memory
    garage = metas["garage"]
    await redis_client.hset(store.keys.chunk("garage", garage.chunk_id), "payload", b"not a chunk")
    retriever = Retriever(tiny_embedder, store, index, top_k=6, recent_chunks=0, max_chunks=12)
    got = await retriever.retrieve("cars", cameras=None, after_s=None, before_s=None)
    assert [c.chunk_id for c in got.chunks] == [metas[k].chunk_id for k in ("front_door", "garage2")]


# --------------------------------------------------------------------------- long windows (issue 10)

LONG_CHUNKS = 90  # two hours, a chunk every 80 s
LONG_TOKENS = 12


async def fill_two_hours(store: MemoryStore, index: VectorIndex, dim: int, c: int) -> list[ChunkMeta]:
    rng = np.random.default_rng(5)
    metas = []
    for i in range(LONG_CHUNKS):
        start = T0 + 80.0 * i
        chunk = make_chunk(LONG_TOKENS, c, t0=start, seed=100 + i)
        meta = ChunkMeta.create(
            "gate", start, start + 8.0, n_frames=3, n_input_tokens=chunk.n_input, n_tokens=LONG_TOKENS, codec="fp16/v1"
        )
        vector = rng.standard_normal(dim).astype(np.float32)
        vector /= np.linalg.norm(vector)
        assert await store.put_chunk(meta, encode_chunk(chunk), vector)
        index.add(meta, vector)
        metas.append(meta)
    return metas


HEADER_TOKENS = 20
BUDGET = PromptBudget(tokens=600, header_tokens=lambda camera, grain: HEADER_TOKENS, outage_tokens=lambda o: 10)


async def test_a_long_window_is_covered_whole_within_the_budget(redis_client, prefix, tiny_embedder, tiny_vlm):
    store = MemoryStore(redis_client, key_prefix=prefix)
    index = VectorIndex(tiny_embedder.dim)
    metas = await fill_two_hours(store, index, tiny_embedder.dim, tiny_vlm.hidden_size)
    retriever = Retriever(tiny_embedder, store, index, top_k=3, recent_chunks=1, max_chunks=12)
    end = metas[-1].end_s
    got = await retriever.retrieve("what happened?", cameras=None, after_s=T0, before_s=end, budget=BUDGET)
    assert got.planned
    assert sum(c.chunk.n_tokens + HEADER_TOKENS for c in got.chunks) <= BUDGET.tokens
    coverage = [c for c in got.chunks if not c.fine]
    assert len(coverage) >= 10
    assert coverage[0].start_s == T0
    assert coverage[-1].end_s == end  # the whole window, in order, without overlaps
    assert all(a.end_s <= b.start_s for a, b in itertools.pairwise(coverage))
    for piece in coverage:  # merged on the fly from the stored chunks in its span
        assert piece.grain is not None
        assert piece.grain.startswith("summary of ")
        assert piece.chunk.n_tokens < LONG_TOKENS * int(piece.grain.split()[2])
        assert piece.chunk.t_first.min() >= piece.start_s
        assert piece.chunk.t_last.max() <= piece.end_s
    fine = [c for c in got.chunks if c.fine]
    assert 0 < len(fine) <= 3
    assert all(c.grain == "as recorded" and c.chunk.n_tokens == LONG_TOKENS for c in fine)

    # A window that fits takes the usual path, unchanged.
    short = {"cameras": None, "after_s": T0, "before_s": T0 + 500.0}
    with_budget = await retriever.retrieve("what happened?", **short, budget=BUDGET)
    without = await retriever.retrieve("what happened?", **short)
    assert not with_budget.planned
    assert [(c.chunk_id, c.start_s, c.score, c.grain) for c in with_budget.chunks] == [
        (c.chunk_id, c.start_s, c.score, None) for c in without.chunks
    ]
    # So does a question without a window, however much memory there is.
    assert not (
        await retriever.retrieve("what happened?", cameras=None, after_s=None, before_s=None, budget=BUDGET)
    ).planned


async def test_a_long_window_skips_pieces_it_cannot_build(redis_client, prefix, tiny_embedder, tiny_vlm):
    store = MemoryStore(redis_client, key_prefix=prefix)
    index = VectorIndex(tiny_embedder.dim)
    metas = await fill_two_hours(store, index, tiny_embedder.dim, tiny_vlm.hidden_size)
    # The first chunk's payload is damaged; the last one comes from another encoder (5 x 5 grid).
    await redis_client.hset(store.keys.chunk("gate", metas[0].chunk_id), "payload", b"not a chunk")
    other = make_chunk(LONG_TOKENS, tiny_vlm.hidden_size, t0=metas[-1].start_s, seed=7, rows=5, cols=5)
    await redis_client.hset(store.keys.chunk("gate", metas[-1].chunk_id), "payload", encode_chunk(other))
    retriever = Retriever(tiny_embedder, store, index, top_k=1, recent_chunks=1, max_chunks=12)
    end = metas[-1].end_s
    got = await retriever.retrieve("what happened?", cameras=None, after_s=T0, before_s=end, budget=BUDGET)
    assert got.planned
    coverage = [c for c in got.chunks if not c.fine]
    assert len(coverage) >= 10
    assert coverage[0].start_s == T0  # the first piece, built from its other members
    assert coverage[-1].end_s < end  # the last piece mixes two grids: left out, the rest answered


async def test_answerer_keeps_a_long_window_prompt_within_max_prompt_tokens(
    redis_client, prefix, tiny_embedder, tiny_vlm
):
    store = MemoryStore(redis_client, key_prefix=prefix)
    index = VectorIndex(tiny_embedder.dim)
    metas = await fill_two_hours(store, index, tiny_embedder.dim, tiny_vlm.hidden_size)
    retriever = Retriever(tiny_embedder, store, index, top_k=3, recent_chunks=1, max_chunks=12)
    exact = functools.partial(exact_prompt_length, tiny_vlm)
    answerer = Answerer(
        tiny_vlm,
        retriever,
        tz=TZ,
        max_new_tokens=2,
        generation_timeout_s=30.0,
        max_prompt_tokens=1500,
        count_text=text_token_counter(tiny_vlm),
        prompt_length=exact,
    )
    try:
        answer = await answerer.answer(Question("what happened?", after_s=T0, before_s=metas[-1].end_s))
    finally:
        answerer.close()
    assert answer.planned
    assert answer.prompt_tokens is not None
    assert answer.prompt_tokens <= 1500
    assert len(answer.citations) >= 8
    assert answer.citations[0].start_s == T0
    assert answer.citations[-1].end_s <= metas[-1].end_s


def make_answerer(vlm, embedder, store, index, *, max_new_tokens: int) -> Answerer:
    retriever = Retriever(embedder, store, index, top_k=2, recent_chunks=1, max_chunks=4)
    return Answerer(vlm, retriever, tz=TZ, max_new_tokens=max_new_tokens, generation_timeout_s=30.0)


async def test_answerer_answers_with_citations_and_streams(memory, tiny_embedder, tiny_vlm):
    store, index, metas = memory
    answerer = make_answerer(tiny_vlm, tiny_embedder, store, index, max_new_tokens=6)
    try:
        deltas: list[str] = []

        async def on_delta(text: str) -> None:
            deltas.append(text)

        question = Question("who came to the door?", cameras=["front_door"], after_s=None, before_s=None, top_k=None)
        answer = await answerer.answer(question, on_delta)
        assert [c.camera for c in answer.citations] == ["front_door"]
        assert answer.citations[0].start_s == metas["front_door"].start_s
        assert answer.text == "".join(deltas)  # the stream adds up to exactly the answer
        assert answer.timing_ms["total"] >= answer.timing_ms["generate"] > 0
        # Same question again without streaming: greedy decoding gives the same text.
        again = await answerer.answer(question)
        assert again.text == answer.text
    finally:
        answerer.close()


async def test_answerer_with_empty_memory_still_answers(redis_client, prefix, tiny_embedder, tiny_vlm):
    store = MemoryStore(redis_client, key_prefix=prefix)
    index = VectorIndex(tiny_embedder.dim)
    answerer = make_answerer(tiny_vlm, tiny_embedder, store, index, max_new_tokens=4)
    try:
        answer = await answerer.answer(Question("is the gate open?"))
    finally:
        answerer.close()
    assert answer.citations == []
    assert isinstance(answer.text, str)
    assert np.isfinite(answer.timing_ms["total"])


class EndlessModel:
    """A model that never stops on its own (only the deadline or the consumer end it)."""

    def generate_stream(self, parts, *, max_new_tokens, deadline_s=None):
        while deadline_s is None or time.monotonic() < deadline_s:
            time.sleep(0.02)
            yield "x"


async def test_close_ends_a_running_generation_at_once(memory, tiny_embedder):
    store, index, _ = memory
    retriever = Retriever(tiny_embedder, store, index, top_k=2, recent_chunks=0, max_chunks=4)
    answerer = Answerer(EndlessModel(), retriever, tz=TZ, max_new_tokens=10_000, generation_timeout_s=60.0)
    first = asyncio.Event()

    async def on_delta(text: str) -> None:
        first.set()

    job = asyncio.create_task(answerer.answer(Question("what now?"), on_delta))
    await asyncio.wait_for(first.wait(), 30)
    started = time.monotonic()
    answerer.close()  # the answer's task is still running, as when another daemon task failed
    assert time.monotonic() - started < 5.0  # not the 60 s generation deadline
    job.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await job


async def test_a_streamed_answer_past_its_deadline_always_times_out(redis_client, prefix, tiny_embedder, tiny_vlm):
    """The MQTT API bounds an answer with ``asyncio.timeout``; the answerer must never swallow it.

    Publishing a delta keeps the loop busy while the model runs on, so deltas pile up in the
    queue and the timeout fires when the next one is already there: on Python 3.11,
    ``asyncio.wait_for(queue.get())`` then returned that delta and dropped the cancellation, and
    the answer ran to its end.
    """
    store = MemoryStore(redis_client, key_prefix=prefix)
    index = VectorIndex(tiny_embedder.dim)
    answerer = make_answerer(tiny_vlm, tiny_embedder, store, index, max_new_tokens=300)
    published: list[str] = []

    async def streamed_answer() -> None:
        async with asyncio.timeout(None) as limit:

            async def publish(text: str) -> None:
                if limit.when() is None:  # the deadline passes while the answer streams
                    limit.reschedule(asyncio.get_running_loop().time() + STREAM_TIMEOUT_S)
                # Encoding and handing the reply to the client: the loop is busy meanwhile.
                time.sleep(PUBLISH_S)  # noqa: ASYNC251
                published.append(text)

            await answerer.answer(Question("describe everything", stream=True), publish)

    try:
        for _ in range(5):
            with pytest.raises(TimeoutError):
                await streamed_answer()
    finally:
        answerer.close()
    assert published


class RecordingModel:
    """Records the prompt it is given and answers "ok" (the prompt is under test, not generation)."""

    def __init__(self) -> None:
        self.parts: list = []

    def generate_stream(self, parts, *, max_new_tokens, deadline_s=None):
        self.parts = list(parts)
        yield "ok"


async def test_answer_about_now_says_how_old_memory_is_and_which_cameras_were_offline(memory, tiny_embedder):
    store, index, metas = memory
    retriever = Retriever(tiny_embedder, store, index, top_k=2, recent_chunks=1, max_chunks=6)
    model = RecordingModel()
    answerer = Answerer(model, retriever, tz=TZ, max_new_tokens=4, generation_timeout_s=30.0, fresh_within_s=60.0)
    try:
        now = await answerer.answer(Question("what is happening now?"))
        prompt = "".join(p.text for p in model.parts if hasattr(p, "text"))
        past = await answerer.answer(Question("who was at the door?"))
    finally:
        answerer.close()
    # The memory is from T0 (long before now): about now, but not fresh; each camera's newest.
    assert now.about_now
    assert now.fresh is False
    assert [(m.camera, m.end_s) for m in now.latest] == [
        ("front_door", metas["front_door"].end_s),
        ("garage", metas["garage2"].end_s),
    ]
    assert now.age_s == pytest.approx(time.time() - metas["front_door"].end_s, abs=60)
    assert "newest memory of camera garage ends" in prompt
    assert "does not show the present" in prompt
    assert [(o.camera, o.start_s, o.end_s) for o in now.offline] == [("garage", T0 + 20.0, T0 + 50.0)]
    assert (past.about_now, past.fresh, past.age_s, past.latest) == (False, None, None, [])


async def test_answer_about_now_with_recent_memory_is_fresh(memory, tiny_embedder):
    store, index, _ = memory
    retriever = Retriever(tiny_embedder, store, index, top_k=2, recent_chunks=1, max_chunks=6)
    model = RecordingModel()
    # Everything in the fixture counts as recent under a fresh_within_s longer than its age.
    answerer = Answerer(model, retriever, tz=TZ, max_new_tokens=4, generation_timeout_s=30.0, fresh_within_s=1e9)
    try:
        answer = await answerer.answer(Question("is anyone at the door now?", cameras=["front_door"]))
    finally:
        answerer.close()
    prompt = "".join(p.text for p in model.parts if hasattr(p, "text"))
    assert answer.fresh is True
    assert [m.camera for m in answer.latest] == ["front_door"]
    assert "does not show the present" not in prompt
    assert answer.offline == []  # the garage outage is not of the selected camera
