"""Streaming, training-free compression of one chunk of visual tokens (pure torch, deterministic).

The compressor sees the current chunk and what memory holds of the previous one (a
`CompressorState` carried between the chunks of one camera), never the future. Steps, each after
a published training-free method (docs/compression.md has the details and numbers):

1. Causal temporal segmentation: a frame whose global feature is far from the previous frame's
   (the first frame compared with the state's last one) starts a new scene (FastVID's DySeg with
   its threshold rule only, since its "c-1 smallest" rule needs the whole video).
2. Static-token absorption: each grid cell keeps a run HEAD (the first token of its current run).
   A token close to its cell's head joins the run: it extends the run's time span and count
   instead of being stored again. Comparing with the head rather than the previous frame catches
   slow drift (TimeChat-Online's DTD and FrameFusion compare with t-1; HoliTom and the reference
   notes compare with the whole window). A scene cut resets every head. Heads are carried across
   chunks in the state; a run that continues from the previous chunk is re-emitted in this chunk
   (as a STATIC candidate starting at frame 0), so every chunk is self-contained and retention
   can delete old chunks independently.
3. Adaptive budget: changed tokens (new runs) buy `keep_ratio / expected_change` slots each,
   unchanged carried runs `static_keep` each, capped at `keep_ratio` of the input by default
   (`max_ratio` may raise the cap), so the budget only adapts downward: a static scene keeps few
   tokens and a busy one at most `keep_ratio`.
4. Per segment, the budget is split between SALIENT tokens (the most novel new runs, kept
   verbatim) and CONTEXT tokens: density-peak centres (DPC-kNN) of the remaining runs, each
   absorbing the runs most similar to it by a size-weighted blend (FastVID's STPrune: ATS + DTM;
   HoliTom's spatial merge).
5. One SUMMARY token per chunk: the count-weighted mean of the chunk's tokens (LLaVA-MLB's visual
   summarisation tail).

Every memory token carries provenance: time span, anchor frame, grid cell, and how many encoder
tokens (counted in sampled frames) it absorbed. Merging follows ToMe's `merge.py` style: a plan
(run ids, centre assignment) is computed once and applied to features, counts and provenance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F  # noqa: N812 - the usual alias
from torch import Tensor

from memory.types import CompressedChunk, TokenKind


@dataclass(frozen=True, slots=True)
class CompressorConfig:
    """Compressor knobs. Similarity thresholds depend on the feature space: calibrate them.

    Attributes:
        keep_ratio: share of the encoder's tokens kept for a chunk of typical change, and the
            cap for busier ones. 4% meets the storage target of 20 MB per camera-hour at
            LLaVA-OV-0.5B's 196 x 896 tokens with the int8 codec (15.7 MB/h on the evaluation
            clips, 27.5 MB/h as fp16), with coverage and attention fidelity above uniform
            pooling, random keep and FastVID at the same budget (docs/compression.md, section 4). FastVID, HoliTom
            and VisionZip report near-lossless answers at 10%: raise it where storage allows.
        expected_change: share of tokens that start a new run in a chunk that should get the
            full `keep_ratio`; a chunk with less change keeps proportionally fewer (each new run
            buys keep_ratio / expected_change slots). TimeChat-Online finds about 80% of
            streaming tokens redundant (0.2); at 0.25 the shared clips keep 2-3.5% per clip at
            keep_ratio 0.04, the empty room least.
        static_keep: slots per unchanged run carried in from the previous chunk. 0.05 keeps about
            10 tokens of a fully static 196-token grid per chunk: enough to describe the
            background, small enough for a static camera to cost little.
        max_ratio: cap on the kept share of a busy chunk. None (default) caps at `keep_ratio`,
            so the budget adapts only downward and `keep_ratio` is a guarantee, not an average
            (storage planning needs the bound; docs/compression.md). A value above `keep_ratio`
            lets busy chunks keep more (up to 25% is published), at a higher storage cost.
        tau_static: cosine to the run head above which a token is absorbed as unchanged. 0.85 is
            the best held-out setting of `bench/compress.py --calibrate` (chosen on two clips,
            scored on three others; docs/compression.md, section 4): 0.90 kept 3.6% and 20.7
            MB/h on the busy calibration clips, over the 20 MB/h target. It was calibrated on
            the bench's pixel featurizer (HoliTom uses 0.65-0.8 between adjacent frames of
            trained features): re-run the calibration with your model's features.
        tau_segment: cosine between consecutive frames' global features below which a new
            scene starts (FastVID's 0.9 on SigLIP's pooled features; the calibration clips have
            no cut, so they could not choose it, and 0.5 and 0.9 scored the same there).
        salient_share: share of a segment's slots given to salient tokens. FastVID gives 40% to
            its attention-salient tokens (its official `stprune_d`); with novelty in place of
            attention, 30% scored best held out (0.3 > 0.4 > 0.6 in attention fidelity and
            coverage at every tau_static tried) and met the 95% needle constraint there (97%).
        dpc_k: neighbours for the density estimate of DPC-kNN (FastVID 4, HoliTom 7).
        beta: minimum weight of a centre in its merged token (FastVID and HoliTom: 0.6), so a
            centre absorbing many tokens stays recognisable.
        summary_token: emit the per-chunk summary token (counts towards the budget).
        context_selection: how context centres are chosen. "dpc": density peaks (FastVID's DTM,
            HoliTom); "maxmin": greedy max-min diversity seeded with the salient tokens
            (DivPrune), which raises the worst-case coverage a little (docs/compression.md).
    """

    keep_ratio: float = 0.04
    expected_change: float = 0.25
    static_keep: float = 0.05
    max_ratio: float | None = None
    tau_static: float = 0.85
    tau_segment: float = 0.90
    salient_share: float = 0.3
    dpc_k: int = 5
    beta: float = 0.6
    summary_token: bool = True
    context_selection: Literal["dpc", "maxmin"] = "dpc"

    def __post_init__(self) -> None:
        for name in ("keep_ratio", "expected_change", "max_ratio", "salient_share", "beta"):
            value = getattr(self, name)
            if value is None and name == "max_ratio":
                continue
            if not 0 < value <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {value}")
        if self.max_ratio is not None and self.max_ratio < self.keep_ratio:
            raise ValueError(f"max_ratio ({self.max_ratio}) must be >= keep_ratio ({self.keep_ratio}) or None")
        if not 0 <= self.static_keep <= 1:
            raise ValueError(f"static_keep must be in [0, 1], got {self.static_keep}")
        for name in ("tau_static", "tau_segment"):
            value = getattr(self, name)
            if not -1 <= value <= 1:
                raise ValueError(f"{name} is a cosine and must be in [-1, 1], got {value}")
        if self.dpc_k < 1:
            raise ValueError(f"dpc_k must be >= 1, got {self.dpc_k}")

    @property
    def cap_ratio(self) -> float:
        """Largest share of a chunk's input tokens kept (before the one-per-segment floor)."""
        return self.keep_ratio if self.max_ratio is None else self.max_ratio

    @property
    def new_run_keep(self) -> float:
        """Slots bought by each new run, so a chunk of typical change lands at keep_ratio."""
        return min(1.0, self.keep_ratio / self.expected_change)


@dataclass(frozen=True, slots=True)
class CompressorState:
    """What the compressor remembers of one camera between chunks.

    Attributes:
        head: [N, C] float32 L2-normalised run head of every grid cell after the last chunk.
        last_global: [G] float32 L2-normalised global feature of the last frame.
        cuts: [T] bool, frames of the last chunk that started a new scene (for logs and evaluation).
        grid: (rows, cols) the heads belong to.
    """

    head: Tensor
    last_global: Tensor
    cuts: Tensor
    grid: tuple[int, int]


@dataclass(frozen=True, slots=True)
class _Runs:
    """Runs of absorbed tokens of one chunk; R runs, each a candidate memory token."""

    feat: Tensor  # [R, C] float32 count-weighted mean of the run's tokens
    count: Tensor  # [R] float64 sampled-frame tokens absorbed
    frame: Tensor  # [R] int64 frame where the run starts in this chunk
    cell: Tensor  # [R] int64 grid cell (row * cols + col)
    t_first: Tensor  # [R] float64
    t_last: Tensor  # [R] float64
    novelty: Tensor  # [R] float32 how different the run's first token is from what the cell showed
    carried: Tensor  # [R] bool run continues from the previous chunk
    n_frames: Tensor  # [R] int64 encoded frames in the run
    segment: Tensor  # [R] int64


def segment_by_similarity(global_feats: Tensor, last_global: Tensor | None, tau: float) -> Tensor:
    """Causal scene cuts from global features (FastVID DySeg, threshold rule).

    Args:
        global_feats: [T, G] L2-normalised global feature per frame.
        last_global: [G] L2-normalised feature of the frame before this chunk, or None.
        tau: a frame whose cosine to the previous frame is below tau starts a new scene.

    Returns:
        [T] bool: True where frame t starts a new scene (frame 0 only if it differs from last_global).
    """
    prev = torch.roll(global_feats, shifts=1, dims=0)  # [T, G]; row 0 replaced below
    sim = (global_feats * prev).sum(-1)  # [T]
    if last_global is None:
        sim[0] = 1.0  # nothing before the stream: no cut
    else:
        sim[0] = (global_feats[0] * last_global).sum()
    return sim < tau


def dpc_knn(x: Tensor, m: int, k: int) -> Tensor:
    """Density-peak clustering centres (Rodriguez & Laio 2014; kNN density as in FastVID/HoliTom).

    Ties are broken by index instead of the papers' random noise, so the result is deterministic.

    Args:
        x: [n, C] L2-normalised features.
        m: number of centres, 1 <= m <= n.
        k: neighbours for the density (itself included), clipped to n.

    Returns:
        [m] int64 indices of the centres, best first.
    """
    n = x.shape[0]
    if not 1 <= m <= n:
        raise ValueError(f"dpc_knn needs 1 <= m <= n, got m={m}, n={n}")
    d2 = (2.0 - 2.0 * (x @ x.T)).clamp_min(0.0)  # [n, n] squared distance of unit vectors
    knn = torch.topk(d2, k=min(k, n), dim=1, largest=False).values  # [n, k]
    rho = torch.exp(-knn.mean(dim=1))  # [n] local density
    order = torch.argsort(-rho, stable=True)  # densest first, ties by index
    rank = torch.empty_like(order)
    rank[order] = torch.arange(n)
    denser = rank[None, :] < rank[:, None]  # [n, n] j is denser than i
    dist = d2.sqrt()  # [n, n]
    delta = torch.where(denser, dist, torch.full_like(dist, math.inf)).min(dim=1).values  # [n]
    delta = torch.where(torch.isinf(delta), dist.max(), delta)  # the densest point
    score = rho * delta  # [n]
    return torch.argsort(-score, stable=True)[:m]


def max_min_diverse(x: Tensor, m: int, seeds: Tensor | None = None) -> Tensor:
    """Greedy max-min diverse selection (DivPrune; Gonzalez's k-centre heuristic).

    Each pick is the point least covered by everything picked so far (and by `seeds`), which
    directly bounds the worst coverage: a 2-approximation of the best k-centre radius.

    Args:
        x: [n, C] L2-normalised features.
        m: points to pick, 1 <= m <= n.
        seeds: [s, C] L2-normalised features already kept (e.g. salient tokens), or None.

    Returns:
        [m] int64 indices into x, in pick order. Deterministic (ties go to the lowest index).
    """
    n = x.shape[0]
    if not 1 <= m <= n:
        raise ValueError(f"max_min_diverse needs 1 <= m <= n, got m={m}, n={n}")
    if seeds is not None and seeds.shape[0] > 0:
        covered = (x @ seeds.T).max(dim=1).values  # [n] best cosine to what is kept
    else:
        # Nothing kept yet: start from the point closest to the mean (the most typical one).
        covered = torch.full((n,), -math.inf)
        centre = F.normalize(x.mean(dim=0), dim=0)
        covered[int(torch.argmax(x @ centre))] = math.inf
    picks = torch.empty(m, dtype=torch.int64)
    for i in range(m):
        pick = (
            int(torch.argmin(covered))
            if i or (seeds is not None and seeds.shape[0] > 0)
            else int(torch.argmax(covered))
        )
        picks[i] = pick
        covered = torch.maximum(covered, x @ x[pick])
        covered[pick] = math.inf
    return picks


def chunk_budget(n_input: int, n_new: int, n_carried: int, n_segments: int, *, config: CompressorConfig) -> int:
    """Memory tokens a chunk may keep (summary token included).

    Changed content buys `config.new_run_keep` slots per new run, unchanged carried runs
    `config.static_keep` each; the result is capped at `config.cap_ratio * n_input` (the summary
    included) and never below one token per segment (plus the summary), so no scene is left
    without a token.
    """
    extra = 1 if config.summary_token else 0
    floor = n_segments + extra
    raw = math.ceil(config.new_run_keep * n_new) + math.ceil(config.static_keep * n_carried) + extra
    cap = max(floor, math.floor(config.cap_ratio * n_input))
    return max(floor, min(raw, cap))


def check_inputs(
    tokens: Tensor,
    global_feats: Tensor,
    t_start: Tensor,
    t_end: Tensor,
    weight: Tensor,
    *,
    grid: tuple[int, int],
) -> None:
    """ValueError unless the inputs are one chunk's encoded frames (shapes as in ``compress_chunk``).

    Shared by every compressor of a chunk (vigil's, memory/fastvid.py), so both refuse the same inputs.
    """
    if tokens.dim() != 3:
        raise ValueError(f"tokens must be [T, N, C], got shape {tuple(tokens.shape)}")
    t, n, _ = tokens.shape
    if t == 0 or n == 0:
        raise ValueError(f"tokens must hold at least one frame and one token, got shape {tuple(tokens.shape)}")
    if len(grid) != 2 or grid[0] * grid[1] != n:
        raise ValueError(f"grid {grid} must have rows * cols == N = {n}")
    if global_feats.dim() != 2 or global_feats.shape[0] != t:
        raise ValueError(f"global_feats must be [T={t}, G], got shape {tuple(global_feats.shape)}")
    for name, value in (("t_start", t_start), ("t_end", t_end), ("weight", weight)):
        if value.shape != (t,):
            raise ValueError(f"{name} must be [T={t}], got shape {tuple(value.shape)}")
    if weight.dtype.is_floating_point or bool((weight < 1).any()):
        raise ValueError("weight must be integers >= 1 (sampled frames each encoded frame stands for)")
    # Spans may overlap a little (wall-clock jitter between ts_s and 1 / sample_fps), but time
    # must not run backwards.
    if bool((t_end < t_start).any()) or bool((t_start[1:] < t_start[:-1]).any()):
        raise ValueError("frame spans must be ordered: t_start <= t_end and t_start non-decreasing")
    if not bool(torch.isfinite(tokens).all()) or not bool(torch.isfinite(global_feats).all()):
        raise ValueError("tokens and global_feats must be finite (NaN or inf from the encoder?)")


def _build_runs(
    x: Tensor,
    xn: Tensor,
    *,
    cuts: Tensor,
    segment: Tensor,
    t_start: Tensor,
    t_end: Tensor,
    weight: Tensor,
    head: Tensor,
    valid: Tensor,
    tau_static: float,
) -> tuple[_Runs, Tensor]:
    """Static-token absorption against run heads. Returns the runs and the heads after the chunk."""
    t_frames, n, c = x.shape
    starts = torch.zeros(t_frames, n, dtype=torch.bool)  # [T, N] token starts a new run
    novelty = torch.zeros(t_frames, n)  # [T, N]
    frame_mean = F.normalize(xn.mean(dim=1), dim=-1)  # [T, C]
    carried = torch.zeros(n, dtype=torch.bool)  # [N] frame 0 continues the previous chunk's run
    # The heads memory held when the chunk began: a cell returning to them (the background after
    # someone walked past) is not news, so it must not take a salient slot from the passer-by.
    head0, valid0 = head, valid
    for t in range(t_frames):
        if bool(cuts[t]):
            valid = torch.zeros_like(valid)  # a new scene: nothing held before it is comparable
            valid0 = valid
        sim = (xn[t] * head).sum(-1)  # [N]
        cont = valid & (sim > tau_static)
        if t == 0:
            carried = cont
        start = ~cont
        # Novelty of a new run: how far it is from what the cell showed before (the current and
        # the chunk-start heads), or, with no history (stream start, scene cut), how far it is
        # from the frame's average token.
        seen = torch.maximum(sim, torch.where(valid0, (xn[t] * head0).sum(-1), sim))  # [N]
        novelty[t] = torch.where(valid, 1.0 - seen, 1.0 - xn[t] @ frame_mean[t])
        head = torch.where(start[:, None], xn[t], head)
        valid = torch.ones_like(valid)
        starts[t] = start

    run_start = starts.clone()
    run_start[0] = True  # carried runs begin again in this chunk: every chunk stands alone
    ids = torch.cumsum(run_start.reshape(-1).long(), 0).reshape(t_frames, n) - 1  # [T, N]
    run_of = torch.cummax(torch.where(run_start, ids, torch.full_like(ids, -1)), dim=0).values  # [T, N]
    r = run_of.reshape(-1)  # [T*N]
    n_runs = int(run_start.sum())

    w = weight.to(torch.float64)[:, None].expand(t_frames, n).reshape(-1)  # [T*N]
    count = torch.zeros(n_runs, dtype=torch.float64).index_add_(0, r, w)  # [R]
    feat_sum = torch.zeros(n_runs, c, dtype=torch.float64).index_add_(0, r, x.reshape(-1, c).double() * w[:, None])
    feat = (feat_sum / count[:, None]).float()  # [R, C]
    t_last = torch.full((n_runs,), -math.inf, dtype=torch.float64).scatter_reduce_(
        0, r, t_end.to(torch.float64)[:, None].expand(t_frames, n).reshape(-1), reduce="amax"
    )
    n_frames = torch.zeros(n_runs, dtype=torch.int64).index_add_(0, r, torch.ones_like(r))
    where = run_start.nonzero()  # [R, 2] (t, cell), row-major like the ids
    frame, cell = where[:, 0], where[:, 1]
    is_carried = (frame == 0) & carried[cell]
    runs = _Runs(
        feat=feat,
        count=count,
        frame=frame,
        cell=cell,
        t_first=t_start.to(torch.float64)[frame],
        t_last=t_last,
        novelty=torch.where(is_carried, torch.zeros(()), novelty[frame, cell]),
        carried=is_carried,
        n_frames=n_frames,
        segment=segment[frame],
    )
    return runs, head


def _split_budget(slots: int, sizes: Tensor) -> list[int]:
    """Split `slots` over groups proportionally to `sizes`, at least 1 each (largest remainder)."""
    k = sizes.numel()
    share = sizes.double() / sizes.sum() * (slots - k)  # the floor of 1 each is given first
    alloc = share.floor().long() + 1
    left = slots - int(alloc.sum())
    if left > 0:
        order = torch.argsort(-(share - share.floor()), stable=True)
        alloc[order[:left]] += 1
    return [min(int(a), int(s)) for a, s in zip(alloc, sizes, strict=True)]


def _plan_segment(
    runs: _Runs, idx: Tensor, slots: int, *, config: CompressorConfig, owner: Tensor, kind: Tensor
) -> None:
    """Decide which runs of one segment become memory tokens and which they absorb.

    Writes `owner[r]` (the run whose token absorbs run r; itself for kept runs) and `kind[r]` for
    the kept runs. Salient runs are the most novel new runs (FastVID's ATS, with novelty in place
    of attention since memory has no query); the rest go to DPC-kNN centres (FastVID's DTM).
    """
    if idx.numel() <= slots:
        owner[idx] = idx
        kind[idx] = TokenKind.FULL
        return
    new_idx = idx[~runs.carried[idx]]
    n_salient = min(round(config.salient_share * slots), new_idx.numel(), slots - 1)
    salient = new_idx[torch.argsort(-runs.novelty[new_idx], stable=True)[:n_salient]]
    owner[salient] = salient
    kind[salient] = TokenKind.SALIENT
    rest = idx[~torch.isin(idx, salient)]  # [n] runs left for the context tokens
    xn = F.normalize(runs.feat[rest], dim=-1)  # [n, C]
    if config.context_selection == "dpc":
        centres = dpc_knn(xn, slots - n_salient, config.dpc_k)  # [m] positions in rest
    else:
        seeds = F.normalize(runs.feat[salient], dim=-1)  # [s, C]
        centres = max_min_diverse(xn, slots - n_salient, seeds)  # [m] positions in rest
    assign = torch.argmax(xn @ xn[centres].T, dim=1)  # [n] nearest centre by cosine
    assign[centres] = torch.arange(centres.numel())  # a centre owns itself even on ties
    owner[rest] = rest[centres][assign]
    kind[rest[centres]] = TokenKind.CONTEXT


def _apply_plan(runs: _Runs, owner: Tensor, kind: Tensor, beta: float) -> tuple[Tensor, ...]:
    """Merge runs into their owners' tokens (features, counts and spans with one plan, as ToMe).

    A token that absorbed m other runs is w * own + (1 - w) * count-weighted mean of the others,
    w = max(1 / (m + 1), beta) (FastVID/HoliTom): the anchor stays recognisable.

    Returns:
        kept run ids [M], feat [M, C], count [M], t_first [M], t_last [M], kind [M] (int64).
    """
    kept = (owner == torch.arange(owner.numel())).nonzero().squeeze(1)  # [M] run ids, in run order
    slot = torch.full_like(owner, -1)
    slot[kept] = torch.arange(kept.numel())
    target = slot[owner]  # [R] output slot of every run
    m = kept.numel()
    count = torch.zeros(m, dtype=torch.float64).index_add_(0, target, runs.count)
    t_first = torch.full((m,), math.inf, dtype=torch.float64).scatter_reduce_(0, target, runs.t_first, reduce="amin")
    t_last = torch.full((m,), -math.inf, dtype=torch.float64).scatter_reduce_(0, target, runs.t_last, reduce="amax")
    absorbed = owner != torch.arange(owner.numel())  # [R] runs merged into another
    a_target = target[absorbed]
    a_count = runs.count[absorbed]
    members = torch.zeros(m, dtype=torch.float64).index_add_(0, a_target, torch.ones_like(a_count))  # [M]
    m_count = torch.zeros(m, dtype=torch.float64).index_add_(0, a_target, a_count)  # [M]
    m_sum = torch.zeros(m, runs.feat.shape[1], dtype=torch.float64).index_add_(
        0, a_target, runs.feat[absorbed].double() * a_count[:, None]
    )  # [M, C]
    mean = m_sum / m_count.clamp_min(1.0)[:, None]  # [M, C]
    w = torch.where(members > 0, torch.clamp(1.0 / (members + 1.0), min=beta), torch.ones_like(members))  # [M]
    feat = (w[:, None] * runs.feat[kept].double() + (1.0 - w[:, None]) * mean).float()  # [M, C]
    out_kind = kind[kept].clone()
    # Unmerged tokens that stand for several frames (or continue the last chunk) are STATIC runs.
    static = (members == 0) & (out_kind == TokenKind.FULL) & (runs.carried[kept] | (runs.n_frames[kept] > 1))
    out_kind[static] = TokenKind.STATIC
    return kept, feat, count, t_first, t_last, out_kind


def compress_chunk(
    tokens: Tensor,
    global_feats: Tensor,
    t_start: Tensor,
    t_end: Tensor,
    weight: Tensor,
    *,
    grid: tuple[int, int],
    state: CompressorState | None = None,
    config: CompressorConfig = CompressorConfig(),
) -> tuple[CompressedChunk, CompressorState]:
    """Compress one chunk of one camera.

    Args:
        tokens: [T, N, C] LLM input-space tokens of the encoded frames.
        global_feats: [T, G] one feature per frame (for scene cuts).
        t_start: [T] float64 UTC seconds where each encoded frame's span starts.
        t_end: [T] float64 UTC seconds where it ends (after skip-unchanged it may cover several
            sampled frames).
        weight: [T] int sampled frames each encoded frame stands for (>= 1).
        grid: (rows, cols) with rows * cols == N.
        state: what the previous chunk of this camera left (None at stream start). A state of
            another grid or channel count (the encoder changed) is ignored: the stream restarts.
        config: thresholds and budget.

    Returns:
        (chunk, state): M memory tokens sorted by (frame, row, col) with the summary last, and
        the state to pass with the next chunk. sum(chunk.count) == N * sum(weight).
    """
    check_inputs(tokens, global_feats, t_start, t_end, weight, grid=grid)
    t_frames, n, c = tokens.shape
    x = tokens.float()  # [T, N, C]
    xn = F.normalize(x, dim=-1)  # [T, N, C]
    g = F.normalize(global_feats.float(), dim=-1)  # [T, G]

    usable = (
        state is not None
        and state.grid == grid
        and state.head.shape == (n, c)
        and state.last_global.shape == (g.shape[1],)
    )
    if usable:
        assert state is not None
        head, valid, last_global = state.head, torch.ones(n, dtype=torch.bool), state.last_global
    else:
        head, valid, last_global = torch.zeros(n, c), torch.zeros(n, dtype=torch.bool), None

    cuts = segment_by_similarity(g, last_global, config.tau_segment)  # [T]
    segment = torch.cumsum(cuts.long(), 0)  # [T]
    segment = segment - segment[0]  # frame 0 is always segment 0
    runs, head = _build_runs(
        x,
        xn,
        cuts=cuts,
        segment=segment,
        t_start=t_start,
        t_end=t_end,
        weight=weight,
        head=head,
        valid=valid,
        tau_static=config.tau_static,
    )

    n_segments = int(segment[-1]) + 1
    budget = chunk_budget(
        n_input=t_frames * n,
        n_new=int((~runs.carried).sum()),
        n_carried=int(runs.carried.sum()),
        n_segments=n_segments,
        config=config,
    )
    slots = budget - (1 if config.summary_token else 0)
    n_runs = runs.count.numel()
    owner = torch.full((n_runs,), -1, dtype=torch.int64)  # [R] run whose token absorbs each run
    kind = torch.full((n_runs,), int(TokenKind.FULL), dtype=torch.int64)  # [R]
    seg_sizes = torch.bincount(runs.segment, minlength=n_segments)  # [S], every segment has runs
    for s, b in enumerate(_split_budget(slots, seg_sizes)):
        _plan_segment(runs, (runs.segment == s).nonzero().squeeze(1), b, config=config, owner=owner, kind=kind)
    run_ids, out_feat, out_count, out_first, out_last, out_kind = _apply_plan(runs, owner, kind, config.beta)
    frame = runs.frame[run_ids]
    cell = runs.cell[run_ids]
    out_seg = runs.segment[run_ids]
    order = torch.argsort(frame * n + cell, stable=True)
    rows, cols = grid
    row = (cell // cols)[order]
    col = (cell % cols)[order]
    frame, out_feat, out_count = frame[order], out_feat[order], out_count[order]
    out_first, out_last, out_kind, out_seg = (
        out_first[order],
        out_last[order],
        out_kind[order],
        out_seg[order],
    )

    if config.summary_token:
        w = weight.to(torch.float64)[:, None, None]  # [T, 1, 1]
        summary = ((x.double() * w).sum(dim=(0, 1)) / (w.sum() * n)).float()  # [C]
        out_feat = torch.cat([out_feat, summary[None]])
        frame = torch.cat([frame, torch.tensor([t_frames - 1])])
        row = torch.cat([row, torch.tensor([-1])])
        col = torch.cat([col, torch.tensor([-1])])
        out_count = torch.cat([out_count, torch.zeros(1, dtype=torch.float64)])
        out_first = torch.cat([out_first, t_start[:1].to(torch.float64)])
        out_last = torch.cat([out_last, t_end[-1:].to(torch.float64)])
        out_kind = torch.cat([out_kind, torch.tensor([int(TokenKind.SUMMARY)])])
        out_seg = torch.cat([out_seg, segment[-1:]])

    chunk = CompressedChunk(
        tokens=out_feat.to(tokens.dtype if tokens.dtype.is_floating_point else torch.float32),
        t_first=out_first,
        t_last=out_last,
        frame=frame.to(torch.int32),
        row=row.to(torch.int16),
        col=col.to(torch.int16),
        count=out_count.round().to(torch.int32),
        kind=out_kind.to(torch.int8),
        segment=out_seg.to(torch.int16),
        grid=(rows, cols),
        n_input=t_frames * n,
    )
    new_state = CompressorState(head=head, last_global=g[-1].clone(), cuts=cuts, grid=(rows, cols))
    return chunk, new_state
