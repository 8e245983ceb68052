"""Coverage plans for long-window questions (retrieval/coverage.py): pure invariants."""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from retrieval.coverage import (
    MAX_MERGE_MEMBERS,
    Hit,
    Piece,
    WindowChunk,
    describe_grain,
    plan_cost,
    plan_coverage,
    spread,
    time_bins,
    window_cost,
)

HOUR_S = 3600.0
DAY_S = 24 * HOUR_S
HEADER = 40  # tokens of one piece's header line


def day_of_chunks(camera: str = "gate", *, chunk_s: float = 8.0, per_hour: int = 450, tokens: int = 60, tier: int = 0):
    """A day of back-to-back chunks, ``per_hour`` of them each hour."""
    step = HOUR_S / per_hour
    return [
        WindowChunk(camera, i, i * step, i * step + min(chunk_s, step), tokens, tier, 8 if tier else 0)
        for i in range(24 * per_hour)
    ]


def test_a_window_that_fits_is_left_to_the_usual_path() -> None:
    window = day_of_chunks(per_hour=2, tokens=10)  # 48 chunks x 50 = 2,400 tokens
    assert window_cost(window, HEADER) == 2400
    assert plan_coverage(window, [], budget_tokens=2400, piece_text_tokens=HEADER, top_k=6) is None
    assert plan_coverage([], [], budget_tokens=100, piece_text_tokens=HEADER, top_k=6) is None
    assert plan_coverage(window, [], budget_tokens=2399, piece_text_tokens=HEADER, top_k=6) is not None


def test_a_whole_day_is_covered_hour_by_hour_within_the_budget() -> None:
    window = day_of_chunks()  # 10,800 chunks, 648,000 visual tokens
    hits = [Hit("gate", i, 1.0 - i / 20_000) for i in range(0, 10_800, 997)]
    plan = plan_coverage(window, hits, budget_tokens=8000, piece_text_tokens=HEADER, top_k=6)
    assert plan is not None
    assert plan_cost(plan, HEADER) <= 8000
    coverage = [p for p in plan if not p.fine]
    assert {int(p.start_s // HOUR_S) for p in coverage} == set(range(24))
    # Coverage spans tile the window in time order, each made of at most MAX_MERGE_MEMBERS reads.
    assert coverage[0].start_s == 0.0
    assert coverage[-1].end_s == window[-1].end_s
    assert all(a.end_s <= b.start_s for a, b in itertools.pairwise(coverage))
    assert sum(p.n_covered for p in coverage) == len(window)
    assert all(len(p.members) <= MAX_MERGE_MEMBERS and p.merged for p in coverage)
    # Then the best hits at their stored grain, best first, while they fit.
    fine = [p for p in plan if p.fine]
    assert 0 < len(fine) <= 6
    assert sorted(p.score for p in fine) == sorted(h.score for h in hits)[-len(fine) :]
    assert [p.start_s for p in plan] == sorted(p.start_s for p in plan)


def test_coverage_prefers_stored_chunks_when_they_fit_and_names_their_grain() -> None:
    # A day consolidated to tier 2 (one chunk about every 8.5 minutes): 169 chunks of 60 tokens.
    window = [WindowChunk("gate", i, i * 512.0, (i + 1) * 512.0, 60, 2, 8) for i in range(169)]
    plan = plan_coverage(window, [], budget_tokens=8000, piece_text_tokens=HEADER, top_k=0)
    assert plan is not None
    assert plan_cost(plan, HEADER) <= 8000
    assert all(p.merged for p in plan)  # 169 x 100 tokens do not fit: pieces merge neighbours
    assert describe_grain(plan[0]).startswith(f"summary of {plan[0].n_covered} chunks (tier 2)")
    shown_as_stored = Piece("gate", 0.0, 512.0, (window[0],), 1, 60)
    assert describe_grain(shown_as_stored) == "consolidated from 8 chunks (tier 2)"
    fresh = WindowChunk("gate", 7, 0.0, 8.0, 30)
    assert describe_grain(Piece("gate", 0.0, 8.0, (fresh,), 1, 30)) == "as recorded"
    sampled = Piece("gate", 0.0, 80.0, (fresh, fresh), 10, 20)
    assert describe_grain(sampled) == "summary of 10 chunks (as recorded), 2 of them read"


def test_cameras_share_the_coverage() -> None:
    window = [*day_of_chunks("gate", per_hour=60), *day_of_chunks("yard", per_hour=60)]
    plan = plan_coverage(window, [], budget_tokens=6000, piece_text_tokens=HEADER, top_k=0)
    assert plan is not None
    assert plan_cost(plan, HEADER) <= 6000
    for camera in ("gate", "yard"):
        hours = {int(p.start_s // HOUR_S) for p in plan if p.camera == camera}
        assert len(hours) >= 12


def test_more_cameras_than_pieces_spread_the_pieces_over_time() -> None:
    window = [WindowChunk(f"cam{i:02d}", i, i * 600.0, i * 600.0 + 8, 60) for i in range(40)]
    plan = plan_coverage(
        window, [], budget_tokens=10 * (HEADER + 16), piece_text_tokens=HEADER, top_k=0, coverage_share=1.0
    )
    assert plan is not None
    assert len(plan) == 10
    assert plan_cost(plan, HEADER) <= 10 * (HEADER + 16)
    assert plan[0].start_s == 0.0
    assert plan[-1].start_s == 39 * 600.0


def test_a_budget_too_small_for_one_piece_plans_nothing() -> None:
    assert plan_coverage(day_of_chunks(per_hour=1), [], budget_tokens=HEADER, piece_text_tokens=HEADER, top_k=6) == []


def test_hits_outside_the_window_or_already_shown_are_not_added_twice() -> None:
    window = [WindowChunk("gate", i, i * 100.0, i * 100.0 + 8, 20) for i in range(10)]
    budget = 9 * (HEADER + 20)  # one short of showing everything: coverage shows some as stored
    plan = plan_coverage(
        window,
        [Hit("gate", 99, 0.9), *(Hit("gate", i, 0.5) for i in range(10))],
        budget_tokens=budget,
        piece_text_tokens=HEADER,
        top_k=6,
        coverage_share=0.5,
    )
    assert plan is not None
    assert plan_cost(plan, HEADER) <= budget
    stored = [(p.members[0].chunk_id) for p in plan if not p.merged]
    assert len(stored) == len(set(stored))  # a hit already shown as stored is not repeated
    assert all(p.members[0].chunk_id != 99 for p in plan)


def test_the_plan_is_deterministic_and_ignores_input_order() -> None:
    window = day_of_chunks(per_hour=30)
    hits = [Hit("gate", i, (i * 7919 % 1000) / 1000) for i in range(0, 720, 13)]
    first = plan_coverage(window, hits, budget_tokens=5000, piece_text_tokens=HEADER, top_k=4)
    shuffled = list(window)
    random.Random(0).shuffle(shuffled)
    again = plan_coverage(shuffled, list(reversed(hits)), budget_tokens=5000, piece_text_tokens=HEADER, top_k=4)
    assert first == again


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 400),
    tokens=st.integers(1, 200),
    budget=st.integers(0, 20_000),
    header=st.integers(0, 80),
    top_k=st.integers(0, 8),
    share=st.sampled_from([0.25, 0.5, 0.75, 1.0]),
    seed=st.integers(0, 10_000),
)
def test_budget_is_never_exceeded(n, tokens, budget, header, top_k, share, seed) -> None:
    rng = random.Random(seed)
    t = 0.0
    window = []
    for i in range(n):
        length = rng.uniform(1.0, 600.0)
        window.append(WindowChunk(rng.choice(["a", "b", "c"]), i, t, t + length, rng.randint(1, tokens)))
        t += length + rng.choice([0.0, 0.0, 5000.0])
    hits = [Hit(c.camera, c.chunk_id, rng.random()) for c in rng.sample(window, min(n, 20))]
    plan = plan_coverage(
        window, hits, budget_tokens=budget, piece_text_tokens=header, top_k=top_k, coverage_share=share
    )
    if plan is None:
        assert window_cost(window, header) <= budget
        return
    assert plan_cost(plan, header) <= budget
    assert sum(p.fine for p in plan) <= top_k
    by_id = {c.chunk_id: c for c in window}
    for piece in plan:
        assert all(by_id[m.chunk_id] == m for m in piece.members)
        assert piece.start_s <= min(m.start_s for m in piece.members)
        assert piece.end_s >= max(m.end_s for m in piece.members)
        assert piece.tokens >= 1


def test_spread_and_time_bins() -> None:
    assert spread(10, 3) == [0, 4, 9]  # round(4.5) is 4: banker's rounding, still deterministic
    assert spread(5, 9) == [0, 1, 2, 3, 4]
    assert spread(7, 1) == [3]
    assert spread(7, 0) == []
    with pytest.raises(ValueError, match=">= 0"):
        spread(-1, 2)
    chunks = [WindowChunk("a", i, float(s), float(s) + 1, 1) for i, s in enumerate([0, 1, 50, 98])]
    assert [[c.chunk_id for c in b] for b in time_bins(chunks, 4, 0.0, 100.0)] == [[0, 1], [2], [3]]
    with pytest.raises(ValueError, match="n_bins"):
        time_bins(chunks, 0, 0.0, 1.0)
