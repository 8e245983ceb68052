"""bench/fidelity.py: the attention-fidelity measure agrees with what it claims to measure."""

from __future__ import annotations

import torch

from bench.fidelity import QUESTIONS, attention_fidelity, query_vectors


def test_queries_are_fixed_unit_vectors():
    a, b = query_vectors(64, 0), query_vectors(64, 0)
    assert a.shape == (2 * len(QUESTIONS), 64)
    assert torch.equal(a, b)
    assert torch.allclose(a.norm(dim=1), torch.ones(a.shape[0]))


def test_keeping_everything_reads_the_same():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(4, 9, 16, generator=g)  # [T, N, C]
    weight = torch.tensor([1, 3, 1, 2])
    q = query_vectors(16, 1)
    kept = tokens.reshape(-1, 16)
    count = weight[:, None].expand(4, 9).reshape(-1)
    plain, centred = attention_fidelity(q, tokens, weight, kept, count)
    assert torch.allclose(plain, torch.ones_like(plain), atol=1e-5)
    assert torch.allclose(centred, torch.ones_like(centred), atol=1e-4)


def test_proportional_attention_makes_merging_duplicates_exact():
    # Frames 1-3 repeat frame 0: one copy of frame 0 with count 4 reads exactly like all four,
    # and the same copy counted once reads differently once other tokens compete.
    g = torch.Generator().manual_seed(2)
    frame = torch.randn(1, 9, 16, generator=g)
    other = torch.randn(1, 9, 16, generator=g)
    tokens = torch.cat([frame.expand(4, 9, 16), other])  # [5, 9, 16]
    weight = torch.ones(5, dtype=torch.int64)
    q = query_vectors(16, 3)
    kept = torch.cat([frame[0], other[0]])  # [18, 16]
    merged, _ = attention_fidelity(q, tokens, weight, kept, torch.tensor([4] * 9 + [1] * 9))
    unweighted, _ = attention_fidelity(q, tokens, weight, kept, torch.ones(18, dtype=torch.int64))
    assert torch.allclose(merged, torch.ones_like(merged), atol=1e-5)
    assert float(unweighted.min()) < 0.999
