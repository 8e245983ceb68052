"""FastVID (Shen et al., NeurIPS 2025) as a reference compressor, per chunk, at a given budget.

Written from the paper and its official code (github.com/LunarShen/FastVID, `dyseg`, `stprune`,
`dtm`, `calc_density_score`) with its defaults, so the benchmark can compare vigil with the method
it builds on at the same token count. Pure torch, deterministic, no state between chunks: FastVID
sees a whole clip at once, and here a clip is one chunk (what it would get in a streaming daemon).

1. DySeg: a frame starts a segment where the transition cosine between consecutive global
   features is among the c - 1 lowest of the chunk or below tau. With c = 8 and chunks of at most
   8 frames, every transition is among the c - 1 lowest, so every frame is its own segment: that
   is what the official defaults do on a clip this short.
2. STPrune, per frame: ATS keeps the `d` share of the frame's tokens with the highest attention
   (the official code uses the attention of SigLIP's pooling head; callers pass it as
   `attention`, else the frame's mean token serves as the probe query, see `probe_attention`);
   DTM keeps the rest as density-peak anchors of every p-th frame of the segment (DPC-kNN with
   k neighbours), and every other non-salient token of the segment merges into its most similar
   anchor with the anchor's weight max(1 / (n + 1), beta), n the tokens assigned to it.

Differences from the official code, each so the comparison does not penalise FastVID for
something that is not its method:
- The budget is exactly the given count per chunk (the official one is `int(N * r)` per frame
  with floors): frames share it evenly, each segment's context slots go to its anchor frames.
- Merged features are the weighted mean of the raw tokens (the official DTM averages the
  L2-normalised tokens, which changes the tokens' scale the LLM reads); assignment and the
  anchor weight are as in the official code.
- Densities use the k nearest tokens (the paper's DPC-kNN); the official `calc_density_score`
  calls `torch.topk` without `largest=False`, i.e. the k farthest. `FastVIDConfig.density_from`
  selects it.
- Ties are broken by index instead of the official 1e-6 random noise.
- Skipped frames (weight > 1) count weight times in counts and means.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F  # noqa: N812 - the usual alias
from torch import Tensor

from memory.compress import check_inputs
from memory.types import CompressedChunk, TokenKind


@dataclass(frozen=True, slots=True)
class FastVIDConfig:
    """FastVID's knobs, defaults from its official code (`fastvid_*` arguments).

    Attributes:
        dyseg_c: DySeg cuts at the c - 1 lowest transition similarities (8).
        dyseg_tau: and at every transition cosine below tau (0.9).
        stprune_d: share of a frame's retained tokens chosen by attention (ATS) (0.4).
        dtm_p: anchor frames are every p-th frame of a segment (4).
        dtm_k: neighbours of the DPC-kNN density (4).
        dtm_beta: minimum weight of the anchor in its merged token (0.6).
        density_from: "nearest" (DPC-kNN as published) or "farthest" (what the official
            `calc_density_score` computes; see the module docstring).
    """

    dyseg_c: int = 8
    dyseg_tau: float = 0.9
    stprune_d: float = 0.4
    dtm_p: int = 4
    dtm_k: int = 4
    dtm_beta: float = 0.6
    density_from: Literal["nearest", "farthest"] = "nearest"

    def __post_init__(self) -> None:
        if self.dyseg_c < 1 or self.dtm_p < 1 or self.dtm_k < 1:
            raise ValueError(f"dyseg_c, dtm_p and dtm_k must be >= 1, got {self.dyseg_c}, {self.dtm_p}, {self.dtm_k}")
        for name in ("stprune_d", "dtm_beta"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")


def dyseg(global_feats: Tensor, c: int, tau: float) -> Tensor:
    """DySeg: frames that start a new segment.

    Args:
        global_feats: [T, G] one feature per frame (normalised here).
        c: cut at the c - 1 lowest transition cosines (all of them when T - 1 <= c - 1).
        tau: and at every transition cosine below tau.

    Returns:
        [T] bool, True where frame t starts a segment (frame 0 always does).
    """
    t = global_feats.shape[0]
    g = F.normalize(global_feats.float(), dim=-1)  # [T, G]
    sim = (g[:-1] * g[1:]).sum(-1)  # [T-1] transition t -> t+1
    starts = torch.zeros(t, dtype=torch.bool)
    starts[0] = True
    if t > 1:
        lowest = torch.argsort(sim, stable=True)[: max(c - 1, 0)]  # [<= c-1]
        starts[lowest + 1] = True
        starts[1:] |= sim < tau
    return starts


def probe_attention(tokens: Tensor) -> Tensor:
    """Stand-in for a pooling head's attention: each frame's mean token as the probe query.

    SigLIP's MAP head attends from a learned probe to the patch tokens, and FastVID's ATS keeps the
    tokens it attends to most. Encoders without such a head (LLaVA-OneVision drops SigLIP's; the
    bench's pixel featurizer has none) get the closest signal that needs no trained weights: the
    softmax of each token's scaled dot product with its frame's mean token.

    Args:
        tokens: [T, N, C].

    Returns:
        [T, N] attention weights, each row sums to 1.
    """
    x = tokens.float()
    probe = x.mean(dim=1, keepdim=True)  # [T, 1, C]
    return torch.softmax((x * probe).sum(-1) / math.sqrt(x.shape[-1]), dim=-1)  # [T, N]


def density_peak_scores(x: Tensor, k: int, *, farthest: bool = False) -> Tensor:
    """DPC-kNN score (density x distance to a denser token) of one frame's tokens (FastVID DTM).

    Args:
        x: [n, C] raw features (distances are divided by sqrt(C) as in the official code).
        k: neighbours of the density, clipped to n.
        farthest: use the k farthest tokens instead of the nearest (the official code's topk).

    Returns:
        [n] scores; the largest are the anchors. Ties in density go to the lower index.
    """
    n, c = x.shape
    dist = torch.cdist(x.float(), x.float()) / math.sqrt(c)  # [n, n]
    near = torch.topk(dist, k=min(k, n), dim=1, largest=farthest).values  # [n, k]
    rho = torch.exp(-(near**2).mean(dim=1))  # [n]
    rank = torch.empty(n, dtype=torch.int64)
    rank[torch.argsort(-rho, stable=True)] = torch.arange(n)  # 0 = densest
    denser = rank[None, :] < rank[:, None]  # [n, n] j is denser than i
    delta = torch.where(denser, dist, dist.max()).min(dim=1).values  # [n]
    return delta * rho


def _even_split(total: int, parts: int) -> Tensor:
    """[parts] integers summing to `total`, spread evenly (the larger ones evenly spaced)."""
    edges = (torch.arange(parts + 1) * total) // parts  # [parts + 1]
    return edges[1:] - edges[:-1]


def _capped_split(total: int, caps: Tensor) -> Tensor:
    """[K] integers summing to `total`, as even as possible, none above its cap (sum(caps) >= total)."""
    alloc = torch.zeros_like(caps)
    left = total
    while left > 0:
        room = (caps - alloc) > 0  # [K]
        share = _even_split(left, int(room.sum()))
        add = torch.zeros_like(caps)
        add[room] = torch.minimum(share, (caps - alloc)[room])
        alloc += add
        left = total - int(alloc.sum())
    return alloc


def fastvid_compress(
    tokens: Tensor,
    global_feats: Tensor,
    t_start: Tensor,
    t_end: Tensor,
    weight: Tensor,
    *,
    grid: tuple[int, int],
    budget: int,
    attention: Tensor | None = None,
    config: FastVIDConfig = FastVIDConfig(),
) -> CompressedChunk:
    """Compress one chunk the FastVID way to exactly min(budget, T * N) tokens.

    Args:
        tokens: [T, N, C] the encoded frames' tokens.
        global_feats: [T, G] one feature per frame (DySeg).
        t_start, t_end: [T] float64 span of each encoded frame; weight: [T] int sampled frames each
            stands for (>= 1).
        grid: (rows, cols), rows * cols == N.
        budget: tokens to keep (>= 1).
        attention: [T, N] the vision tower's pooling-head attention, or None for
            `probe_attention(tokens)`.
        config: FastVID's knobs.

    Returns:
        A CompressedChunk of SALIENT (ATS) and CONTEXT (DTM) tokens in (frame, row, col) order;
        sum(count) == N * sum(weight).
    """
    check_inputs(tokens, global_feats, t_start, t_end, weight, grid=grid)
    if budget < 1:
        raise ValueError(f"budget must be >= 1, got {budget}")
    t_frames, n, c = tokens.shape
    if attention is None:
        attention = probe_attention(tokens)
    elif attention.shape != (t_frames, n):
        raise ValueError(f"attention must be [T={t_frames}, N={n}], got shape {tuple(attention.shape)}")
    m = min(budget, t_frames * n)
    x = tokens.float()  # [T, N, C]
    xn = F.normalize(x, dim=-1)  # [T, N, C]
    w = weight.to(torch.float64)  # [T]

    per_frame = _even_split(m, t_frames)  # [T] retained tokens of each frame
    salient_n = (config.stprune_d * per_frame.double()).floor().long()  # [T] the official int(d * r)
    starts = dyseg(global_feats, config.dyseg_c, config.dyseg_tau)  # [T]
    # Every segment needs a slot (only budgets below T leave frames without one): a cut that
    # would close a segment holding none is dropped, and so is the last segment's if it holds none.
    held = 0
    for t in range(t_frames):
        if t and bool(starts[t]) and held == 0:
            starts[t] = False
        held = int(per_frame[t]) if bool(starts[t]) else held + int(per_frame[t])
    last = int(starts.nonzero().max())
    if last and int(per_frame[last:].sum()) == 0:
        starts[last] = False
    segment = torch.cumsum(starts.long(), 0) - 1  # [T]
    for s in range(int(segment[-1]) + 1):  # each segment keeps at least one context slot
        frames = (segment == s).nonzero().squeeze(1)
        if int((per_frame[frames] - salient_n[frames]).sum()) == 0:
            salient_n[frames[int(torch.argmax(salient_n[frames]))]] -= 1

    owner = torch.full((t_frames, n), -1, dtype=torch.int64)  # [T, N] output token of each input token
    kept: list[tuple[int, int, int, int]] = []  # (frame, cell, kind, segment) of each output token
    for t in range(t_frames):  # ATS: the most attended tokens of each frame, verbatim
        for cell in torch.topk(attention[t].float(), int(salient_n[t])).indices.sort().values.tolist():
            owner[t, cell] = len(kept)
            kept.append((t, cell, int(TokenKind.SALIENT), int(segment[t])))
    for s in range(int(segment[-1]) + 1):  # DTM per segment
        frames = (segment == s).nonzero().squeeze(1)  # [f]
        n_context = int((per_frame[frames] - salient_n[frames]).sum())  # >= 1, see above
        anchors = frames[:: config.dtm_p].tolist()
        room = {int(f): n - int(salient_n[f]) for f in frames}
        for f in frames.tolist():  # more anchor frames while the anchors cannot hold the slots
            if sum(room[a] for a in anchors) >= n_context:
                break
            if f not in anchors:
                anchors.append(f)
        anchors.sort()
        slots = _capped_split(n_context, torch.tensor([room[a] for a in anchors]))  # [A]
        anchor_ids = []
        for a, k in zip(anchors, slots.tolist(), strict=True):
            free = (owner[a] < 0).nonzero().squeeze(1)  # [n'] tokens ATS did not take
            score = density_peak_scores(x[a, free], config.dtm_k, farthest=config.density_from == "farthest")
            for cell in free[torch.argsort(-score, stable=True)[:k]].sort().values.tolist():
                anchor_ids.append((a, cell))
        # Every non-salient token of the segment joins its most similar anchor (cosine).
        anchor_feat = torch.stack([xn[a, cell] for a, cell in anchor_ids])  # [K, C]
        first_id = len(kept)
        for a, cell in anchor_ids:
            kept.append((a, cell, int(TokenKind.CONTEXT), s))
        members = owner[frames] < 0  # [f, N]
        nearest = torch.argmax(xn[frames] @ anchor_feat.T, dim=-1) + first_id  # [f, N]
        owner[frames] = torch.where(members, nearest, owner[frames])
        for j, (a, cell) in enumerate(anchor_ids):  # an anchor owns itself even on exact ties
            owner[a, cell] = first_id + j

    n_out = len(kept)
    frame_of = torch.tensor([k[0] for k in kept])  # [M]
    cell_of = torch.tensor([k[1] for k in kept])  # [M]
    flat_owner = owner.reshape(-1)  # [T*N]
    wt = w[:, None].expand(t_frames, n).reshape(-1)  # [T*N]
    count = torch.zeros(n_out, dtype=torch.float64).index_add_(0, flat_owner, wt)  # [M]
    members_n = torch.zeros(n_out, dtype=torch.float64).index_add_(0, flat_owner, torch.ones_like(wt))  # [M]
    mean = (
        torch.zeros(n_out, c, dtype=torch.float64).index_add_(0, flat_owner, x.reshape(-1, c).double() * wt[:, None])
        / count[:, None]
    )  # [M, C] weighted mean of what each token holds (itself included)
    own = x[frame_of, cell_of].double()  # [M, C]
    alpha = torch.clamp(1.0 / (members_n + 1.0), min=config.dtm_beta)[:, None]  # [M, 1]
    is_context = torch.tensor([k[2] == int(TokenKind.CONTEXT) for k in kept])  # [M]
    feat = torch.where(is_context[:, None], alpha * own + (1.0 - alpha) * mean, own)  # [M, C]
    frame_idx = torch.arange(t_frames)[:, None].expand(t_frames, n).reshape(-1)  # [T*N]
    t_first = torch.full((n_out,), math.inf, dtype=torch.float64).scatter_reduce_(
        0, flat_owner, t_start.to(torch.float64)[frame_idx], reduce="amin"
    )
    t_last = torch.full((n_out,), -math.inf, dtype=torch.float64).scatter_reduce_(
        0, flat_owner, t_end.to(torch.float64)[frame_idx], reduce="amax"
    )
    order = torch.argsort(frame_of * n + cell_of, stable=True)  # [M]
    cols = grid[1]
    return CompressedChunk(
        tokens=feat[order].to(tokens.dtype if tokens.dtype.is_floating_point else torch.float32),
        t_first=t_first[order],
        t_last=t_last[order],
        frame=frame_of[order].to(torch.int32),
        row=(cell_of[order] // cols).to(torch.int16),
        col=(cell_of[order] % cols).to(torch.int16),
        count=count[order].round().to(torch.int32),
        kind=torch.tensor([kept[i][2] for i in order.tolist()], dtype=torch.int8),
        segment=torch.tensor([kept[i][3] for i in order.tolist()], dtype=torch.int16),
        grid=grid,
        n_input=t_frames * n,
    )
