"""Prompt assembly: token order, time spans in the configured zone, outages in words, question last."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from zoneinfo import ZoneInfo

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from memory.outage import Outage
from memory.types import CompressedChunk, TokenKind
from retrieval.answer import StreamTrimmer
from retrieval.prompt import NO_MEMORY, build_prompt, chunk_header, format_span, token_order
from vlm.types import TextPart, VisualPart

TZ = ZoneInfo("Europe/Berlin")


def make_chunk(m: int, c: int, *, t0: float, seed: int, rows: int = 4, cols: int = 4, frames: int = 3):
    """A CompressedChunk of m tokens in shuffled order, the last two being summary tokens."""
    g = torch.Generator().manual_seed(seed)
    n_grid = m - 2
    frame = torch.randint(0, frames, (n_grid,), generator=g)
    row = torch.randint(0, rows, (n_grid,), generator=g)
    col = torch.randint(0, cols, (n_grid,), generator=g)
    perm = torch.randperm(m, generator=g)
    frame = torch.cat([frame, torch.tensor([1, 0])])[perm].to(torch.int32)
    row = torch.cat([row, torch.tensor([-1, -1])])[perm].to(torch.int16)
    col = torch.cat([col, torch.tensor([-1, -1])])[perm].to(torch.int16)
    kind = torch.where(row < 0, int(TokenKind.SUMMARY), int(TokenKind.CONTEXT)).to(torch.int8)
    return CompressedChunk(
        tokens=torch.randn(m, c, generator=g),
        t_first=torch.full((m,), t0, dtype=torch.float64),
        t_last=torch.full((m,), t0 + 8.0, dtype=torch.float64),
        frame=frame,
        row=row,
        col=col,
        count=torch.ones(m, dtype=torch.int32),
        kind=kind,
        segment=torch.zeros(m, dtype=torch.int16),
        grid=(rows, cols),
        n_input=frames * rows * cols,
    )


@dataclass(frozen=True)
class Item:
    camera: str
    start_s: float
    end_s: float
    chunk: CompressedChunk


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(-1, 6), st.integers(-1, 6)), max_size=40))
def test_token_order_matches_a_naive_sort(triples):
    frame = torch.tensor([t[0] for t in triples], dtype=torch.int32)
    row = torch.tensor([t[1] for t in triples], dtype=torch.int16)
    col = torch.tensor([t[2] for t in triples], dtype=torch.int16)
    order = token_order(frame, row, col).tolist()
    naive = sorted(range(len(triples)), key=lambda i: (triples[i][1] < 0, *triples[i], i))
    assert order == naive


def test_token_order_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="equal 1-D shapes"):
        token_order(torch.zeros(3, dtype=torch.int32), torch.zeros(2, dtype=torch.int16), torch.zeros(3))


def test_format_span_uses_the_zone_and_writes_the_date_once():
    start = datetime(2026, 7, 1, 14, 3, 5, tzinfo=TZ).timestamp()
    assert format_span(start, start + 8, TZ) == "2026-07-01 14:03:05–14:03:13 CEST"
    assert format_span(start, start + 86_400, TZ) == "2026-07-01 14:03:05–2026-07-02 14:03:05 CEST"
    assert format_span(start, None, TZ) == "2026-07-01 14:03:05 CEST until now"


def test_prompt_orders_chunks_by_time_and_ends_with_the_question():
    t0 = datetime(2026, 11, 20, 10, 0, 0, tzinfo=TZ).timestamp()
    late = Item("garage", t0 + 60, t0 + 68, make_chunk(12, 8, t0=t0 + 60, seed=1))
    early = Item("front_door", t0, t0 + 8, make_chunk(10, 8, t0=t0, seed=2))
    outage = Outage("garage", t0 + 10, t0 + 40, "connection refused")
    parts = build_prompt("  Who came to the door? ", [late, early], [outage], tz=TZ)

    texts = [p.text for p in parts if isinstance(p, TextPart)]
    visuals = [p for p in parts if isinstance(p, VisualPart)]
    assert isinstance(parts[-1], TextPart)
    assert parts[-1].text == "Question: Who came to the door?\nAnswer:"
    assert "CET" in texts[0]
    headers = [t for t in texts if t.startswith("[")]
    assert headers == [
        "[front_door] 2026-11-20 10:00:00–10:00:08 CET:\n",
        "[garage] 2026-11-20 10:01:00–10:01:08 CET:\n",
    ]
    assert any("garage was offline 2026-11-20 10:00:10–10:00:40 CET (connection refused)" in t for t in texts)
    # Each chunk's tokens follow its header, all of them, in (frame, row, col) order, summaries last.
    assert [v.tokens.shape[0] for v in visuals] == [10, 12]
    for visual, item in zip(visuals, [early, late], strict=True):
        keys = list(zip(visual.row.tolist(), visual.frame.tolist(), visual.col.tolist(), strict=True))
        grid = [(f, r, c) for r, f, c in keys if r >= 0]
        assert grid == sorted(grid)
        assert [r for r, _, _ in keys[-2:]] == [-1, -1]
        assert torch.allclose(visual.tokens.sum(0), item.chunk.tokens.sum(0), atol=1e-5)  # a permutation


@dataclass(frozen=True)
class GrainedItem(Item):
    grain: str | None = None


def test_long_window_pieces_say_their_span_and_grain():
    t0 = datetime(2026, 11, 20, 8, 0, 0, tzinfo=TZ).timestamp()
    merged = GrainedItem("gate", t0, t0 + 3850, make_chunk(6, 8, t0=t0, seed=3), "summary of 64 chunks (tier 1)")
    stored = GrainedItem("gate", t0 + 4000, t0 + 4008, make_chunk(6, 8, t0=t0 + 4000, seed=4), "as recorded")
    texts = [p.text for p in build_prompt("what happened?", [stored, merged], [], tz=TZ) if isinstance(p, TextPart)]
    assert [t for t in texts if t.startswith("[")] == [
        "[gate] 2026-11-20 08:00:00–09:04:10 CET, summary of 64 chunks (tier 1):\n",
        "[gate] 2026-11-20 09:06:40–09:06:48 CET, as recorded:\n",
    ]
    assert chunk_header("gate", t0, t0 + 8, TZ) == "[gate] 2026-11-20 08:00:00–08:00:08 CET:\n"  # no grain: as before


def test_prompt_without_memory_says_so():
    parts = build_prompt("is anyone there?", [], [], tz=TZ)
    assert [p.text for p in parts if isinstance(p, TextPart)][1] == NO_MEMORY + "\n"
    assert not any(isinstance(p, VisualPart) for p in parts)


@given(st.lists(st.text(alphabet=" \n\tab.", max_size=6), max_size=12))
def test_streamed_deltas_add_up_to_the_stripped_answer(deltas: list[str]) -> None:
    trim = StreamTrimmer()
    sent = [trim.feed(delta) for delta in deltas]
    assert "".join(sent) == "".join(deltas).strip()
    # No piece ends in whitespace: trailing whitespace waits until text follows it.
    assert all(piece == piece.rstrip() for piece in sent)
