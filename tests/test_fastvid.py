"""memory/fastvid.py: FastVID at an exact budget, deterministic, with its DySeg and ATS rules."""

from __future__ import annotations

import pytest
import torch

from memory.fastvid import FastVIDConfig, dyseg, fastvid_compress, probe_attention
from memory.types import TokenKind

GRID = (14, 14)
N = GRID[0] * GRID[1]


def _chunk(t: int = 8, c: int = 32, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(1, N, c, generator=g) + 0.3 * torch.randn(t, N, c, generator=g)  # [T, N, C]
    weight = torch.tensor([1, 2, 1, 1, 3, 1, 1, 1][:t])
    t_start = torch.cumsum(weight.double(), 0) - weight.double()
    return tokens, tokens.mean(dim=1), t_start, t_start + weight.double(), weight


@pytest.mark.parametrize("budget", [1, 5, 8, 63, 200, 8 * N, 10_000])
def test_keeps_exactly_the_budget_with_shapes_and_counts(budget):
    tokens, glob, t_start, t_end, weight = _chunk()
    out = fastvid_compress(tokens, glob, t_start, t_end, weight, grid=GRID, budget=budget)
    m = min(budget, 8 * N)
    assert out.tokens.shape == (m, tokens.shape[2])
    assert out.n_tokens == m
    assert out.n_input == 8 * N
    assert int(out.count.sum()) == N * int(weight.sum())
    assert set(out.kind.tolist()) <= {int(TokenKind.SALIENT), int(TokenKind.CONTEXT)}
    key = out.frame.long() * N + out.row.long() * GRID[1] + out.col.long()
    assert bool((key[1:] > key[:-1]).all()), "one token per (frame, cell), in order"
    assert bool((out.t_first <= out.t_last).all())


def test_is_deterministic_and_depends_on_the_input():
    tokens, glob, t_start, t_end, weight = _chunk()
    a = fastvid_compress(tokens, glob, t_start, t_end, weight, grid=GRID, budget=60)
    b = fastvid_compress(tokens.clone(), glob.clone(), t_start, t_end, weight, grid=GRID, budget=60)
    assert torch.equal(a.tokens, b.tokens)
    assert torch.equal(a.count, b.count)
    other = _chunk(seed=1)
    c = fastvid_compress(other[0], other[1], t_start, t_end, weight, grid=GRID, budget=60)
    assert not torch.equal(a.tokens, c.tokens)


def test_dyseg_cuts_at_the_c_minus_1_lowest_and_below_tau():
    # Global features with transitions of known cosine: 0.99, 0.5, 0.95, 0.2, 0.97, 0.8.
    cosines = [0.99, 0.5, 0.95, 0.2, 0.97, 0.8]
    feats = [torch.tensor([1.0, 0.0])]
    angle = 0.0
    for cos in cosines:
        angle += float(torch.arccos(torch.tensor(cos)))
        feats.append(torch.tensor([float(torch.cos(torch.tensor(angle))), float(torch.sin(torch.tensor(angle)))]))
    g = torch.stack(feats)  # [7, 2]
    # c = 2: the single lowest (0.2, into frame 4) plus those below tau = 0.6 (0.5, into frame 2).
    assert dyseg(g, 2, 0.6).nonzero().squeeze(1).tolist() == [0, 2, 4]
    # c = 3 adds the second lowest (0.5, already there) and tau = 0.9 adds 0.8 (into frame 6).
    assert dyseg(g, 3, 0.9).nonzero().squeeze(1).tolist() == [0, 2, 4, 6]
    # The official c = 8 on a chunk of 7 transitions cuts everywhere.
    assert bool(dyseg(g, 8, 0.9).all())


def test_salient_tokens_follow_the_given_attention():
    tokens, glob, t_start, t_end, weight = _chunk()
    attention = torch.zeros(8, N)
    attention[:, 17] = 1.0  # every frame attends to cell 17 most, then cell 3
    attention[:, 3] = 0.5
    # 10 per frame -> floor(0.4 * 10) = 4 salient tokens per frame, cells 17 and 3 among them.
    out = fastvid_compress(tokens, glob, t_start, t_end, weight, grid=GRID, budget=80, attention=attention)
    salient = out.kind == int(TokenKind.SALIENT)
    assert int(salient.sum()) == 8 * 4
    cells = (out.row.long() * GRID[1] + out.col.long())[salient]
    for f in range(8):
        in_frame = cells[out.frame[salient] == f].tolist()
        assert 17 in in_frame
        assert 3 in in_frame
    with pytest.raises(ValueError, match="attention must be"):
        fastvid_compress(tokens, glob, t_start, t_end, weight, grid=GRID, budget=80, attention=attention[:, :5])


def test_probe_attention_rows_sum_to_one():
    tokens = _chunk()[0]
    att = probe_attention(tokens)
    assert att.shape == (8, N)
    assert torch.allclose(att.sum(dim=1), torch.ones(8))


def test_anchor_weight_keeps_the_anchor_recognisable():
    # One frame, one context slot (budget 1, d = 0.4 -> 0 salient): the single anchor absorbs
    # every token; its feature is 0.6 * itself + 0.4 * the mean.
    tokens, glob, t_start, t_end, weight = _chunk(t=1)
    out = fastvid_compress(tokens, glob, t_start, t_end, weight, grid=GRID, budget=1, config=FastVIDConfig())
    cell = int(out.row[0]) * GRID[1] + int(out.col[0])
    expected = 0.6 * tokens[0, cell] + 0.4 * tokens[0].mean(dim=0)
    assert torch.allclose(out.tokens[0], expected, atol=1e-5)
    assert int(out.count[0]) == N
