"""Progressive consolidation: neighbouring chunks of one camera merged into one coarser chunk (pure).

TempMe (Shen et al., "TempMe: Video Temporal Token Merging", ICLR 2025) merges neighbouring clips
progressively into coarser levels; vigil does the same with old memory (issue 10): K neighbouring
compressed chunks of a camera become one chunk holding ``keep_ratio`` of their tokens, and the
result can itself be consolidated again at the next tier.

The merge reuses the compressor's machinery (memory/compress.py) so both stages treat provenance
alike: density-peak centres (DPC-kNN, FastVID's DTM) over the members' non-summary tokens, each
remaining token absorbed by its most similar centre with the count-weighted, anchor-preserving
blend of `_apply_plan` (ToMe-style: one plan applied to features, counts and spans). Provenance
is kept: a token's time span is the union of the spans it absorbed, its count their sum, and its
kind stays what it was unless it absorbed another token (then CONTEXT). The members' SUMMARY
tokens become one SUMMARY token: the mean of the members' summaries weighted by the encoder
tokens each stands for, which is the exact count-weighted mean of everything the members saw.

Frames and segments are renumbered so they stay increasing across members (member k's frame 0
follows member k-1's last frame), which keeps prompt positions in time order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 - the usual alias
from torch import Tensor

from memory.compress import _apply_plan, _Runs, dpc_knn
from memory.types import CompressedChunk, TokenKind

# Anchor weight of a centre in its merged token: the compressor's default (FastVID/HoliTom 0.6).
DEFAULT_BETA = 0.6
# Neighbours for DPC-kNN's density, as the compressor's default.
DEFAULT_DPC_K = 5


@dataclass(frozen=True, slots=True)
class ConsolidatedChunk:
    """One coarser chunk and what it was made of.

    Attributes:
        chunk: the merged memory tokens with their provenance (M' tokens).
        member_spans: [K, 2] float64 UTC seconds (start, end) of each member, in time order.
        member_tokens: [K] int64 memory tokens each member held before the merge.
    """

    chunk: CompressedChunk
    member_spans: Tensor
    member_tokens: Tensor

    @property
    def start_s(self) -> float:
        """Start of the first member."""
        return float(self.member_spans[0, 0])

    @property
    def end_s(self) -> float:
        """End of the last member."""
        return float(self.member_spans[-1, 1])


def consolidation_budget(n_tokens: int, keep_ratio: float) -> int:
    """Memory tokens a consolidation of ``n_tokens`` member tokens keeps: floor(keep_ratio * n), at least 1.

    Never more than ``n_tokens`` (nothing is invented). The summary token, when there is one, is
    part of the budget.
    """
    if not 0 < keep_ratio <= 1:
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
    if n_tokens < 1:
        raise ValueError(f"n_tokens must be >= 1, got {n_tokens}")
    return min(n_tokens, max(1, math.floor(keep_ratio * n_tokens)))


def chunk_span(chunk: CompressedChunk) -> tuple[float, float]:
    """(start, end) UTC seconds a chunk's tokens cover."""
    if chunk.n_tokens == 0:
        raise ValueError("an empty chunk has no span")
    return float(chunk.t_first.min()), float(chunk.t_last.max())


def _check_members(members: Sequence[CompressedChunk]) -> None:
    if len(members) == 0:
        raise ValueError("consolidation needs at least one member chunk")
    grid, channels = members[0].grid, members[0].tokens.shape[1]
    previous_start = -math.inf
    for k, member in enumerate(members):
        if member.n_tokens == 0:
            raise ValueError(f"member {k} holds no tokens")
        if member.grid != grid:
            raise ValueError(f"member {k} has grid {member.grid}, member 0 has {grid}: one camera, one encoder")
        if member.tokens.shape[1] != channels:
            raise ValueError(f"member {k} has C={member.tokens.shape[1]}, member 0 has C={channels}")
        start, _ = chunk_span(member)
        if start < previous_start:
            raise ValueError(f"members must be in time order: member {k} starts at {start!r}, before member {k - 1}")
        previous_start = start
        if not bool(torch.isfinite(member.tokens).all()):
            raise ValueError(f"member {k} has non-finite tokens")


def _summary_feature(members: Sequence[CompressedChunk]) -> Tensor:
    """[C] mean of what the members saw: each member's summary (or, lacking one, the count-weighted
    mean of its tokens) weighted by the encoder tokens the member stands for."""
    feats: list[Tensor] = []
    weights: list[float] = []
    for member in members:
        is_summary = member.kind == TokenKind.SUMMARY  # [M]
        count = member.count.to(torch.float64)  # [M]
        if bool(is_summary.any()):
            feat = member.tokens[is_summary].double().mean(dim=0)  # [C]
        else:
            feat = (member.tokens.double() * count[:, None]).sum(0) / count.sum().clamp_min(1.0)  # [C]
        feats.append(feat)
        weights.append(max(float(count.sum()), 1.0))
    w = torch.tensor(weights, dtype=torch.float64)  # [K]
    return ((torch.stack(feats) * w[:, None]).sum(0) / w.sum()).float()  # [C]


def consolidate(
    members: Sequence[CompressedChunk],
    keep_ratio: float,
    *,
    beta: float = DEFAULT_BETA,
    dpc_k: int = DEFAULT_DPC_K,
) -> ConsolidatedChunk:
    """Merge K neighbouring chunks of one camera into one chunk of ``consolidation_budget`` tokens.

    Args:
        members: K >= 1 compressed chunks of one camera and encoder, in time order (each [M_k, C]).
        keep_ratio: share of the members' tokens (summaries included) the result keeps.
        beta: minimum weight of a centre in its merged token (memory/compress.py `_apply_plan`).
        dpc_k: neighbours for the density of DPC-kNN.

    Returns:
        The merged chunk ([M', C], M' = consolidation_budget(sum M_k, keep_ratio), or fewer only
        when that exceeds the members' non-summary tokens plus one merged summary; tokens in time
        order with the summary last), the members' spans [K, 2] and token counts [K].
        sum(count) is conserved exactly; every token's span lies inside the members' overall span.
    """
    if not 0 < beta <= 1:
        raise ValueError(f"beta must be in (0, 1], got {beta}")
    if dpc_k < 1:
        raise ValueError(f"dpc_k must be >= 1, got {dpc_k}")
    _check_members(members)
    total = sum(m.n_tokens for m in members)
    budget = consolidation_budget(total, keep_ratio)

    # Concatenate the members' tokens with frames and segments renumbered to keep increasing.
    feats, counts, firsts, lasts, frames, rows, cols, kinds, segs = ([] for _ in range(9))
    frame_offset = 0
    seg_offset = 0
    for member in members:
        feats.append(member.tokens.float())
        counts.append(member.count.to(torch.float64))
        firsts.append(member.t_first)
        lasts.append(member.t_last)
        frames.append(member.frame.to(torch.int64) + frame_offset)
        rows.append(member.row)
        cols.append(member.col)
        kinds.append(member.kind.to(torch.int64))
        segs.append(member.segment.to(torch.int64) + seg_offset)
        frame_offset += int(member.frame.max()) + 1
        seg_offset += int(member.segment.max()) + 1
    feat = torch.cat(feats)  # [T_all, C]
    count = torch.cat(counts)  # [T_all]
    t_first, t_last = torch.cat(firsts), torch.cat(lasts)  # [T_all]
    frame, row, col = torch.cat(frames), torch.cat(rows), torch.cat(cols)  # [T_all]
    kind, segment = torch.cat(kinds), torch.cat(segs)  # [T_all]

    is_summary = kind == TokenKind.SUMMARY  # [T_all]
    # A summary token carries count 0; one merged summary replaces the members' ones when the
    # budget leaves room for a real token beside it (a budget of 1 must still hold every count).
    keep_summary = bool(is_summary.any()) and budget >= 2
    slots = budget - (1 if keep_summary else 0)
    # [n] tokens to merge: the non-summary ones, or all when no summary is kept (its features then
    # merge like any other token's).
    body = (~is_summary).nonzero().squeeze(1) if keep_summary else torch.arange(kind.numel())
    n = body.numel()
    runs = _Runs(
        feat=feat[body],
        count=count[body],
        frame=frame[body],
        cell=torch.zeros(n, dtype=torch.int64),
        t_first=t_first[body],
        t_last=t_last[body],
        novelty=torch.zeros(n),
        carried=torch.zeros(n, dtype=torch.bool),  # no STATIC re-labelling in _apply_plan
        n_frames=torch.ones(n, dtype=torch.int64),
        segment=segment[body],
    )
    owner = torch.arange(n)  # [n] token whose output absorbs each token; itself when kept
    if n > slots:
        xn = F.normalize(runs.feat, dim=-1)  # [n, C]
        centres = dpc_knn(xn, slots, dpc_k)  # [slots] positions in body
        assign = torch.argmax(xn @ xn[centres].T, dim=1)  # [n] nearest centre by cosine, first on ties
        assign[centres] = torch.arange(centres.numel())  # a centre owns itself even on ties
        owner = centres[assign]
    kept, out_feat, out_count, out_first, out_last, out_kind = _apply_plan(runs, owner, kind[body], beta)
    absorbed_any = torch.bincount(owner, minlength=n)[kept] > 1  # [M] kept tokens that merged others
    out_kind = torch.where(absorbed_any, torch.full_like(out_kind, int(TokenKind.CONTEXT)), out_kind)
    # Kept anchors come in input order, which is time order: members in order, each sorted by
    # (frame, row, col) with its summary last, frames renumbered to increase across members.
    idx = body[kept]  # [M] source positions of the kept anchors
    out_frame, out_row, out_col, out_seg = frame[idx], row[idx], col[idx], segment[idx]

    if keep_summary:
        out_feat = torch.cat([out_feat, _summary_feature(members)[None]])
        out_count = torch.cat([out_count, torch.zeros(1, dtype=torch.float64)])
        out_first = torch.cat([out_first, t_first.min()[None]])
        out_last = torch.cat([out_last, t_last.max()[None]])
        out_kind = torch.cat([out_kind, torch.tensor([int(TokenKind.SUMMARY)])])
        out_frame = torch.cat([out_frame, torch.tensor([frame_offset - 1])])
        out_row = torch.cat([out_row, torch.tensor([-1], dtype=out_row.dtype)])
        out_col = torch.cat([out_col, torch.tensor([-1], dtype=out_col.dtype)])
        out_seg = torch.cat([out_seg, torch.tensor([seg_offset - 1])])

    chunk = CompressedChunk(
        tokens=out_feat.to(members[0].tokens.dtype),
        t_first=out_first,
        t_last=out_last,
        frame=out_frame.to(torch.int32),
        row=out_row.to(torch.int16),
        col=out_col.to(torch.int16),
        count=out_count.round().to(torch.int32),
        kind=out_kind.to(torch.int8),
        segment=out_seg.to(torch.int16),
        grid=members[0].grid,
        n_input=sum(m.n_input for m in members),
    )
    spans = torch.tensor([chunk_span(m) for m in members], dtype=torch.float64)  # [K, 2]
    sizes = torch.tensor([m.n_tokens for m in members], dtype=torch.int64)  # [K]
    return ConsolidatedChunk(chunk=chunk, member_spans=spans, member_tokens=sizes)


def merge_vectors(vectors: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Retrieval vector of a consolidation: the members' vectors averaged by weight, re-normalised.

    Args:
        vectors: [K, D] float32 members' vectors (L2-normalised, as streamer/ingest.py writes them).
        weights: [K] > 0, e.g. each member's duration, so a long member counts for its length.

    Returns:
        [D] float32 unit vector (the plain mean when the weighted mean is zero).
    """
    vecs = np.asarray(vectors, dtype=np.float64)  # [K, D]
    w = np.asarray(weights, dtype=np.float64)  # [K]
    if vecs.ndim != 2 or vecs.shape[0] == 0 or w.shape != (vecs.shape[0],):
        raise ValueError(f"need vectors [K, D] and weights [K], got {vecs.shape} and {w.shape}")
    if not (np.isfinite(vecs).all() and np.isfinite(w).all() and (w > 0).all()):
        raise ValueError("vectors must be finite and weights finite and > 0")
    mean = (vecs * w[:, None]).sum(axis=0) / w.sum()  # [D]
    norm = float(np.linalg.norm(mean))
    return (mean / norm if norm > 0 else vecs.mean(axis=0)).astype(np.float32)
