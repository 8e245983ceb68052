"""Baselines at the same token budget as the compressor (pure torch).

Each returns exactly min(budget, T * N) tokens, so a benchmark that passes vigil's count per
chunk compares equal budgets (tests/test_baselines.py). `uniform_pool` averages each frame's grid
over near-equal rectangles (the "2-D average pooling" baseline of the reference notes);
`random_keep` keeps tokens drawn uniformly at random through an explicit generator. Both return a
`CompressedChunk` so the benchmark measures them like ours.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from memory.types import CompressedChunk, TokenKind


def _check(
    tokens: Tensor, t_start: Tensor, t_end: Tensor, weight: Tensor, grid: tuple[int, int], *, budget: int
) -> None:
    if tokens.dim() != 3:
        raise ValueError(f"tokens must be [T, N, C], got shape {tuple(tokens.shape)}")
    t, n, _ = tokens.shape
    if len(grid) != 2 or grid[0] * grid[1] != n:
        raise ValueError(f"grid {grid} must have rows * cols == N = {n}")
    for name, value in (("t_start", t_start), ("t_end", t_end), ("weight", weight)):
        if value.shape != (t,):
            raise ValueError(f"{name} must be [T={t}], got shape {tuple(value.shape)}")
    if budget < 1:
        raise ValueError(f"budget must be >= 1, got {budget}")


def _split_evenly(total: int, parts: int) -> list[int]:
    """`total` split into `parts` integers that differ by at most one, larger ones first."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def _partition_grid(k: int, rows: int, cols: int) -> Tensor:
    """Exactly `k` bins over a rows x cols grid: [N] bin id of each cell, N = rows * cols.

    The grid is cut into h horizontal strips (h chosen so bins are about square) and each strip
    into as many column ranges as its share of `k`; strips differ by at most one bin, so every
    bin is a near-equal rectangle. A fixed h x w grid could only give h * w <= k bins, which for
    most k is well below k (it emitted about 20% fewer tokens than the budget; issue 7).

    Args:
        k: bins wanted, 1 <= k <= rows * cols.
    """
    if not 1 <= k <= rows * cols:
        raise ValueError(f"bins must be in [1, {rows * cols}], got {k}")
    h = max(1, min(rows, k, round(math.sqrt(k * rows / cols))))
    while -(-k // h) > cols:  # a strip cannot hold more bins than it has columns
        h += 1
    per_strip = _split_evenly(k, h)  # [h] bins in each strip
    strip_of_row = torch.arange(rows) * h // rows  # [rows]
    offsets = torch.tensor([0, *per_strip]).cumsum(0)  # [h + 1] first bin id of each strip
    widths = torch.tensor(per_strip)[strip_of_row]  # [rows] bins in each row's strip
    col_bin = torch.arange(cols)[None, :] * widths[:, None] // cols  # [rows, cols]
    return (offsets[strip_of_row][:, None] + col_bin).reshape(-1)


def uniform_pool(
    tokens: Tensor, t_start: Tensor, t_end: Tensor, weight: Tensor, grid: tuple[int, int], *, budget: int
) -> CompressedChunk:
    """Uniform spatial pooling to exactly min(`budget`, T * N) tokens.

    Frames are split into G = min(T, budget) consecutive groups; the budget is split over the
    groups (sizes differ by at most one) and each group's tokens are averaged (weighted by frame
    weight) over a partition of the grid into exactly that many near-equal rectangles. Bins
    partition the grid exactly, so counts add up to N * sum(weight).

    Args:
        tokens: [T, N, C]; t_start, t_end: [T] float64; weight: [T] int; grid: (rows, cols).

    Returns:
        A CompressedChunk of M = min(budget, T * N) CONTEXT tokens, anchored at each group's
        first frame and the centre cell of each bin.
    """
    _check(tokens, t_start, t_end, weight, grid, budget=budget)
    t_frames, n, c = tokens.shape
    rows, cols = grid
    budget = min(budget, t_frames * n)
    n_groups = min(t_frames, budget)
    group_of_frame = torch.arange(t_frames) * n_groups // t_frames  # [T]
    # Pieces (frames, bins) that each get one grid partition. A group whose share exceeds N
    # (budgets near T * N) is split into its frames, each with at most N bins.
    pieces: list[tuple[Tensor, int]] = []
    for g, share in enumerate(_split_evenly(budget, n_groups)):
        frames = (group_of_frame == g).nonzero().squeeze(1)  # [f]
        if share <= n:
            pieces.append((frames, share))
        else:
            pieces += [(frames[i : i + 1], b) for i, b in enumerate(_split_evenly(share, frames.numel()))]
    target = torch.empty(t_frames, n, dtype=torch.int64)  # [T, N] output token of each input token
    first_parts, last_parts, row_parts, col_parts = [], [], [], []
    r_idx = (torch.arange(n) // cols).double()  # [N]
    c_idx = (torch.arange(n) % cols).double()  # [N]
    offset = 0
    for frames, bins in pieces:
        cell_bin = _partition_grid(bins, rows, cols)  # [N]
        target[frames] = offset + cell_bin
        first_parts.append(frames[:1].expand(bins))
        last_parts.append(frames[-1:].expand(bins))
        # Anchor each bin at the cell nearest its centre.
        size = torch.bincount(cell_bin, minlength=bins).double()  # [bins]
        row_parts.append((torch.zeros(bins, dtype=torch.float64).index_add_(0, cell_bin, r_idx) / size).floor())
        col_parts.append((torch.zeros(bins, dtype=torch.float64).index_add_(0, cell_bin, c_idx) / size).floor())
        offset += bins
    m = offset
    target = target.reshape(-1)  # [T*N]
    wt = weight.to(torch.float64)[:, None].expand(t_frames, n).reshape(-1)  # [T*N]
    count = torch.zeros(m, dtype=torch.float64).index_add_(0, target, wt)
    feat = torch.zeros(m, c, dtype=torch.float64).index_add_(0, target, tokens.reshape(-1, c).double() * wt[:, None])
    feat = (feat / count[:, None]).to(tokens.dtype)
    first_frame = torch.cat(first_parts)  # [M]
    last_frame = torch.cat(last_parts)  # [M]
    return CompressedChunk(
        tokens=feat,
        t_first=t_start.to(torch.float64)[first_frame],
        t_last=t_end.to(torch.float64)[last_frame],
        frame=first_frame.to(torch.int32),
        row=torch.cat(row_parts).to(torch.int16),
        col=torch.cat(col_parts).to(torch.int16),
        count=count.round().to(torch.int32),
        kind=torch.full((m,), int(TokenKind.CONTEXT), dtype=torch.int8),
        segment=torch.zeros(m, dtype=torch.int16),
        grid=(rows, cols),
        n_input=t_frames * n,
    )


def random_keep(
    tokens: Tensor,
    t_start: Tensor,
    t_end: Tensor,
    weight: Tensor,
    grid: tuple[int, int],
    *,
    budget: int,
    generator: torch.Generator,
) -> CompressedChunk:
    """Keep exactly min(`budget`, T * N) tokens drawn uniformly without replacement; the rest are dropped.

    Args:
        tokens: [T, N, C]; t_start, t_end: [T] float64; weight: [T] int; grid: (rows, cols).
        generator: the only source of randomness (seed it for reproducible runs).

    Returns:
        A CompressedChunk of kind FULL tokens in (frame, row, col) order; each counts only itself.
    """
    _check(tokens, t_start, t_end, weight, grid, budget=budget)
    t_frames, n, c = tokens.shape
    m = min(budget, t_frames * n)
    pick = torch.randperm(t_frames * n, generator=generator)[:m].sort().values  # [M] flat (t, cell)
    frame = pick // n
    cell = pick % n
    return CompressedChunk(
        tokens=tokens.reshape(-1, c)[pick].clone(),
        t_first=t_start.to(torch.float64)[frame],
        t_last=t_end.to(torch.float64)[frame],
        frame=frame.to(torch.int32),
        row=(cell // grid[1]).to(torch.int16),
        col=(cell % grid[1]).to(torch.int16),
        count=weight.to(torch.int32)[frame],
        kind=torch.full((m,), int(TokenKind.FULL), dtype=torch.int8),
        segment=torch.zeros(m, dtype=torch.int16),
        grid=grid,
        n_input=t_frames * n,
    )
