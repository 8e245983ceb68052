"""Baselines at the same token budget as the compressor (pure torch).

`uniform_pool` averages each frame's grid over equal rectangles (the "2-D average pooling"
baseline of the reference notes); `random_keep` keeps tokens drawn uniformly at random through an
explicit generator. Both return a `CompressedChunk` so the benchmark measures them like ours.
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


def _pool_shape(k: int, rows: int, cols: int) -> tuple[int, int]:
    """The largest (h, w) grid with h * w <= k that keeps the aspect ratio of (rows, cols)."""
    h = max(1, min(rows, math.floor(math.sqrt(k * rows / cols))))
    w = max(1, min(cols, k // h))
    return h, w


def uniform_pool(
    tokens: Tensor, t_start: Tensor, t_end: Tensor, weight: Tensor, grid: tuple[int, int], *, budget: int
) -> CompressedChunk:
    """Uniform spatial pooling to at most `budget` tokens.

    Frames are split into min(T, budget) consecutive groups; each group's tokens are averaged
    (weighted by frame weight) over an h x w partition of the grid with h * w <= budget // groups.
    Bins partition the grid exactly, so counts add up to N * sum(weight).

    Args:
        tokens: [T, N, C]; t_start, t_end: [T] float64; weight: [T] int; grid: (rows, cols).

    Returns:
        A CompressedChunk of kind CONTEXT tokens, anchored at each group's first frame and the
        centre cell of each bin.
    """
    _check(tokens, t_start, t_end, weight, grid, budget=budget)
    t_frames, n, c = tokens.shape
    rows, cols = grid
    n_groups = min(t_frames, budget)
    h, w = _pool_shape(budget // n_groups, rows, cols)
    r_idx = torch.arange(rows)[:, None].expand(rows, cols)
    c_idx = torch.arange(cols)[None, :].expand(rows, cols)
    bin_of_cell = ((r_idx * h // rows) * w + (c_idx * w // cols)).reshape(-1)  # [N] bin of each cell
    group_of_frame = torch.arange(t_frames) * n_groups // t_frames  # [T]
    n_bins = h * w
    target = (group_of_frame[:, None] * n_bins + bin_of_cell[None, :]).reshape(-1)  # [T*N]
    wt = weight.to(torch.float64)[:, None].expand(t_frames, n).reshape(-1)  # [T*N]
    m = n_groups * n_bins
    count = torch.zeros(m, dtype=torch.float64).index_add_(0, target, wt)
    feat = torch.zeros(m, c, dtype=torch.float64).index_add_(
        0, target, tokens.reshape(-1, c).double() * wt[:, None]
    )
    feat = (feat / count[:, None]).to(tokens.dtype)
    g = torch.arange(m) // n_bins
    b = torch.arange(m) % n_bins
    first_frame = torch.searchsorted(group_of_frame, g)  # [M] first frame of each group
    last_frame = torch.searchsorted(group_of_frame, g, right=True) - 1
    # Anchor each bin at its centre cell.
    bin_row = ((2 * (b // w) + 1) * rows) // (2 * h)
    bin_col = ((2 * (b % w) + 1) * cols) // (2 * w)
    return CompressedChunk(
        tokens=feat,
        t_first=t_start.to(torch.float64)[first_frame],
        t_last=t_end.to(torch.float64)[last_frame],
        frame=first_frame.to(torch.int32),
        row=bin_row.to(torch.int16),
        col=bin_col.to(torch.int16),
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
    """Keep `budget` tokens drawn uniformly without replacement; the rest are dropped.

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
