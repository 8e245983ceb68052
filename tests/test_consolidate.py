"""Progressive consolidation (memory/consolidate.py): invariants on chunks the real compressor made."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from memory.codec import decode_chunk, encode_chunk
from memory.compress import CompressorConfig, CompressorState, compress_chunk
from memory.consolidate import consolidate, consolidation_budget
from memory.types import CompressedChunk, TokenKind

GRID = (4, 4)
C = 16
FRAMES = 8
CHUNK_S = 8.0
T0 = 1_763_600_000.0


def camera_chunks(k: int, seed: int = 0, *, summary: bool = True, keep_ratio: float = 0.25) -> list[CompressedChunk]:
    """K consecutive chunks of one synthetic camera compressed by the real compressor."""
    gen = torch.Generator().manual_seed(seed)
    n = GRID[0] * GRID[1]
    background = torch.randn(n, C, generator=gen)  # [N, C]
    config = CompressorConfig(keep_ratio=keep_ratio, summary_token=summary)
    state: CompressorState | None = None
    chunks: list[CompressedChunk] = []
    for i in range(k):
        # A static background with a few cells changing per frame: some runs, some novelty.
        tokens = background.expand(FRAMES, n, C).clone()  # [T, N, C]
        changed = torch.rand(FRAMES, n, generator=gen) < 0.3  # [T, N]
        tokens[changed] = torch.randn(int(changed.sum()), C, generator=gen)
        t_start = T0 + i * CHUNK_S + torch.arange(FRAMES, dtype=torch.float64)  # [T]
        chunk, state = compress_chunk(
            tokens,
            tokens.mean(dim=1),
            t_start,
            t_start + 1.0,
            torch.ones(FRAMES, dtype=torch.int64),
            grid=GRID,
            state=state,
            config=config,
        )
        chunks.append(chunk)
    return chunks


def test_counts_conserved_and_budget_exact():
    members = camera_chunks(8)
    total = sum(m.n_tokens for m in members)
    merged = consolidate(members, 0.125)
    assert merged.chunk.n_tokens == consolidation_budget(total, 0.125) == total // 8
    assert int(merged.chunk.count.sum()) == sum(int(m.count.sum()) for m in members)
    assert merged.chunk.n_input == sum(m.n_input for m in members)
    # One summary token, last, standing for the whole span.
    kinds = merged.chunk.kind.tolist()
    assert kinds.count(TokenKind.SUMMARY) == 1
    assert kinds[-1] == TokenKind.SUMMARY
    assert float(merged.chunk.t_first[-1]) == merged.start_s
    assert float(merged.chunk.t_last[-1]) == merged.end_s


def test_spans_ordered_and_covering_members():
    members = camera_chunks(8, seed=3)
    merged = consolidate(members, 0.125)
    spans = merged.member_spans  # [K, 2]
    assert spans.shape == (8, 2)
    assert bool((spans[:, 0] < spans[:, 1]).all())
    assert bool((spans[1:, 0] >= spans[:-1, 1]).all())  # members in order, not overlapping
    for member, (start, end) in zip(members, spans.tolist(), strict=True):
        assert start == float(member.t_first.min())
        assert end == float(member.t_last.max())
    assert merged.member_tokens.tolist() == [m.n_tokens for m in members]
    out = merged.chunk
    assert bool((out.t_first <= out.t_last).all())
    assert float(out.t_first.min()) >= merged.start_s
    assert float(out.t_last.max()) <= merged.end_s
    body = out.kind != TokenKind.SUMMARY
    # Every member token's span lies inside some merged token's span (the union of what was absorbed).
    for member in members:
        keep = member.kind != TokenKind.SUMMARY
        for first, last in zip(member.t_first[keep].tolist(), member.t_last[keep].tolist(), strict=True):
            inside = body & (out.t_first <= first) & (out.t_last >= last)
            assert bool(inside.any()), f"member span {first}..{last} is covered by no merged token"
    # Anchor frames increase across members (prompt positions stay in time order).
    assert bool((out.frame[1:] >= out.frame[:-1]).all())


def test_merged_tokens_marked_context_and_kept_full_tokens_untouched():
    members = camera_chunks(4, seed=1)
    merged = consolidate(members, 0.5)
    kinds = set(merged.chunk.kind.tolist())
    assert TokenKind.CONTEXT in kinds
    # A token kept without absorbing anything keeps its features exactly.
    unmerged = consolidate(members, 1.0)
    assert unmerged.chunk.n_tokens == sum(m.n_tokens for m in members) - (len(members) - 1)  # one summary
    body = torch.cat([m.tokens[m.kind != TokenKind.SUMMARY] for m in members])
    assert torch.equal(unmerged.chunk.tokens[:-1], body)


def test_deterministic():
    members = camera_chunks(8, seed=5)
    a = consolidate(members, 0.125)
    b = consolidate([dataclasses.replace(m) for m in members], 0.125)
    assert encode_chunk(a.chunk) == encode_chunk(b.chunk)
    assert torch.equal(a.member_spans, b.member_spans)


def test_second_tier_of_consolidated_chunks_and_codec_round_trip():
    level1 = [consolidate(camera_chunks(8, seed=s), 0.5).chunk for s in range(4)]
    # Re-time the groups so they follow each other like consecutive minutes.
    shifted = []
    for i, chunk in enumerate(level1):
        shift = i * 8 * CHUNK_S * 2
        shifted.append(dataclasses.replace(chunk, t_first=chunk.t_first + shift, t_last=chunk.t_last + shift))
    level2 = consolidate(shifted, 0.125)
    assert int(level2.chunk.count.sum()) == sum(int(c.count.sum()) for c in shifted)
    assert level2.chunk.n_tokens == consolidation_budget(sum(c.n_tokens for c in shifted), 0.125)
    back = decode_chunk(encode_chunk(level2.chunk))
    assert torch.equal(back.count, level2.chunk.count)
    assert torch.equal(back.t_first, level2.chunk.t_first)


def test_budget_of_one_keeps_every_count():
    members = camera_chunks(2, seed=2)
    merged = consolidate(members, 1e-6)
    assert merged.chunk.n_tokens == 1
    assert int(merged.chunk.count.sum()) == sum(int(m.count.sum()) for m in members)
    assert merged.chunk.kind.tolist() == [TokenKind.CONTEXT]


@settings(max_examples=25, deadline=None)
@given(
    k=st.integers(1, 6),
    keep=st.floats(0.01, 1.0),
    seed=st.integers(0, 1000),
    summary=st.booleans(),
)
def test_invariants_hold_for_any_group(k, keep, seed, summary):
    members = camera_chunks(k, seed=seed, summary=summary)
    total = sum(m.n_tokens for m in members)
    merged = consolidate(members, keep)
    budget = consolidation_budget(total, keep)
    # The members' summaries become one, so a budget near the total cannot be filled.
    body = sum(int((m.kind != TokenKind.SUMMARY).sum()) for m in members)
    assert merged.chunk.n_tokens == (min(budget, body + 1) if summary and budget >= 2 else budget)
    assert int(merged.chunk.count.sum()) == sum(int(m.count.sum()) for m in members)
    assert bool((merged.chunk.t_first <= merged.chunk.t_last).all())
    assert float(merged.chunk.t_first.min()) >= merged.start_s
    assert float(merged.chunk.t_last.max()) <= merged.end_s
    assert int((merged.chunk.kind == TokenKind.SUMMARY).sum()) <= 1


def test_bad_groups_rejected():
    members = camera_chunks(3)
    with pytest.raises(ValueError, match="at least one member"):
        consolidate([], 0.5)
    with pytest.raises(ValueError, match="keep_ratio"):
        consolidate(members, 0.0)
    with pytest.raises(ValueError, match="time order"):
        consolidate(members[::-1], 0.5)
    other = camera_chunks(1)[0]
    with pytest.raises(ValueError, match="grid"):
        consolidate([members[0], dataclasses.replace(other, grid=(2, 8))], 0.5)
