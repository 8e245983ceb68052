"""Compressor and baselines: invariants on random tokens, behaviour on real clips.

Token features of real frames come from a small deterministic pixel-patch featurizer (no VLM):
frames are average-pooled to 224x224, cut into a 14x14 grid of 16x16-pixel patches (the grid of
LLaVA-OneVision's video path) and projected to C dims by a fixed seeded random matrix; the global
feature is the mean token. It is an honest stand-in for the compressor's logic: same grid, a
feature space where similar patches have high cosine.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from hypothesis import given, settings
from hypothesis import strategies as st

from memory.baselines import random_keep, uniform_pool
from memory.compress import CompressorConfig, CompressorState, compress_chunk, dpc_knn, max_min_diverse
from memory.types import CompressedChunk, TokenKind

DATA = Path(__file__).parent / "data"
GRID = (14, 14)
PATCH_PX = 16
FEAT_DIM = 64
T0 = 1_763_600_000.0  # an arbitrary UTC epoch for the first frame
# Pixel-feature thresholds, calibrated on tests/data (docs/compression.md): unchanged cells of the
# empty room stay above 0.97 cosine to their head, a person's cells drop below 0.6; consecutive
# frames' global features stay above 0.93 (auto-exposure included) and drop below 0 at hard cuts.
PIXEL_CONFIG = CompressorConfig(tau_static=0.95, tau_segment=0.5)


@pytest.fixture(autouse=True)
def single_thread():
    """The compressor's tensors are small: one thread is faster than two fighting on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.cache
def sample_frames(
    name: str, fps: float = 1.0, start_s: float = 0.0, stop_s: float = math.inf
) -> tuple[np.ndarray, np.ndarray]:
    """Frames of a clip sampled at `fps` by frame time: ([T, H, W, 3] uint8, [T] float64 seconds)."""
    images, times = [], []
    with av.open(str(DATA / name)) as container:
        next_s = start_s
        for frame in container.decode(video=0):
            if frame.time is None or frame.time + 1e-6 < next_s:
                continue
            if frame.time >= stop_s:
                break
            images.append(frame.to_ndarray(format="rgb24"))
            times.append(frame.time)
            next_s += 1.0 / fps
    return np.stack(images), np.asarray(times, dtype=np.float64)


def pixel_features(images: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, H, W, 3] uint8 -> (tokens [T, 196, C], global [T, C])."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0 - 0.5  # [T, 3, H, W], centred
    side = GRID[0] * PATCH_PX
    x = F.adaptive_avg_pool2d(x, (side, side))  # [T, 3, 224, 224]
    patches = F.unfold(x, PATCH_PX, stride=PATCH_PX).transpose(1, 2)  # [T, 196, 768]
    proj = torch.randn(patches.shape[-1], FEAT_DIM, generator=torch.Generator().manual_seed(0))
    tokens = patches @ proj / math.sqrt(patches.shape[-1])  # [T, 196, C]
    return tokens, tokens.mean(dim=1)


def spans(times: np.ndarray, period_s: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    t_start = torch.from_numpy(times).to(torch.float64) + T0
    return t_start, t_start + period_s, torch.ones(len(times), dtype=torch.int64)


def run_stream(
    tokens: torch.Tensor,
    glob: torch.Tensor,
    *,
    times: np.ndarray,
    chunk: int,
    config: CompressorConfig,
    period_s: float = 1.0,
):
    """Compress a stream chunk by chunk, carrying the state; yields (first frame index, chunk, state)."""
    state: CompressorState | None = None
    t_start, t_end, weight = spans(times, period_s)
    for i in range(0, tokens.shape[0], chunk):
        sl = slice(i, i + chunk)
        out, state = compress_chunk(
            tokens[sl], glob[sl], t_start[sl], t_end[sl], weight[sl], grid=GRID, state=state, config=config
        )
        yield i, out, state


def check_invariants(out: CompressedChunk, t_start: torch.Tensor, t_end: torch.Tensor, weight: torch.Tensor) -> None:
    n = GRID[0] * GRID[1] if out.grid == GRID else out.grid[0] * out.grid[1]
    assert int(out.count.sum()) == n * int(weight.sum())
    assert bool((out.t_first <= out.t_last).all())
    # Every input frame's span is covered by some token's span.
    for a, b in zip(t_start.tolist(), t_end.tolist(), strict=True):
        assert bool(((out.t_first <= a) & (out.t_last >= b)).any()), f"frame [{a}, {b}] not covered"
    content = out.kind != TokenKind.SUMMARY
    key = out.frame[content].long() * n + out.row[content].long() * out.grid[1] + out.col[content].long()
    assert bool((key[1:] >= key[:-1]).all()), "tokens are not in (frame, row, col) order"


@st.composite
def chunks(draw: st.DrawFn) -> tuple[torch.Tensor, ...]:
    t = draw(st.integers(1, 6))
    rows, cols = draw(st.sampled_from([(2, 3), (4, 4), (3, 5)]))
    c = draw(st.sampled_from([4, 8]))
    seed = draw(st.integers(0, 2**16))
    noise = draw(st.sampled_from([0.0, 0.05, 0.5, 2.0]))
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(1, rows * cols, c, generator=g)
    tokens = base + noise * torch.randn(t, rows * cols, c, generator=g)  # [T, N, C]
    weight = torch.tensor(draw(st.lists(st.integers(1, 4), min_size=t, max_size=t)), dtype=torch.int64)
    t_start = torch.cumsum(weight.double(), 0) - weight.double() + T0
    return tokens, tokens.mean(1), t_start, t_start + weight.double(), weight, (rows, cols)


@settings(max_examples=60, deadline=None)
@given(chunks(), st.sampled_from([0.05, 0.1, 0.3]))
def test_invariants_on_random_chunks(data, keep_ratio):
    tokens, glob, t_start, t_end, weight, grid = data
    config = CompressorConfig(keep_ratio=keep_ratio)
    out, state = compress_chunk(tokens, glob, t_start, t_end, weight, grid=grid, config=config)
    n_input = tokens.shape[0] * tokens.shape[1]
    assert out.n_input == n_input
    n_segments = int(out.segment.max()) + 1
    assert out.n_tokens <= max(n_segments + 1, math.floor(config.keep_ratio * n_input))
    assert int(out.count.sum()) == n_input // tokens.shape[0] * int(weight.sum())
    assert bool((out.t_first <= out.t_last).all())
    for a, b in zip(t_start.tolist(), t_end.tolist(), strict=True):
        assert bool(((out.t_first <= a) & (out.t_last >= b)).any())
    assert int((out.kind == TokenKind.SUMMARY).sum()) == 1
    # Deterministic: the same input and state give the same output, also for the next chunk.
    again, _ = compress_chunk(tokens, glob, t_start, t_end, weight, grid=grid, config=config)
    assert torch.equal(out.tokens, again.tokens)
    assert torch.equal(out.count, again.count)
    nxt = compress_chunk(tokens, glob, t_start + 100, t_end + 100, weight, grid=grid, state=state, config=config)[0]
    nxt2 = compress_chunk(tokens, glob, t_start + 100, t_end + 100, weight, grid=grid, state=state, config=config)[0]
    assert torch.equal(nxt.tokens, nxt2.tokens)
    assert torch.equal(nxt.t_first, nxt2.t_first)
    assert int(nxt.count.sum()) == int(out.count.sum())


def test_budget_adapts_only_downward_from_keep_ratio_by_default():
    # Independent noise frames: every token is a new run, which would buy 0.4 slots each.
    g = torch.Generator().manual_seed(3)
    tokens = torch.randn(8, 196, 16, generator=g)  # [T, N, C]
    t_start = torch.arange(8, dtype=torch.float64) + T0
    weight = torch.ones(8, dtype=torch.int64)
    args = (tokens, tokens.mean(1), t_start, t_start + 1.0, weight)
    n_input = 8 * 196
    capped, _ = compress_chunk(*args, grid=(14, 14), config=CompressorConfig(keep_ratio=0.1, tau_segment=-1.0))
    assert capped.n_tokens == math.floor(0.1 * n_input)  # busy: exactly at the cap, not above
    raised, _ = compress_chunk(
        *args, grid=(14, 14), config=CompressorConfig(keep_ratio=0.1, max_ratio=0.25, tau_segment=-1.0)
    )
    assert capped.n_tokens < raised.n_tokens <= math.floor(0.25 * n_input)
    with pytest.raises(ValueError, match="max_ratio"):
        CompressorConfig(keep_ratio=0.1, max_ratio=0.05)


def test_shape_errors_name_sizes():
    tokens = torch.randn(3, 6, 4)
    t_start = torch.arange(3, dtype=torch.float64)
    ones = torch.ones(3, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"rows \* cols == N = 6"):
        compress_chunk(tokens, tokens.mean(1), t_start, t_start + 1, ones, grid=(2, 2))
    with pytest.raises(ValueError, match=r"global_feats must be \[T=3, G\], got shape \(2, 4\)"):
        compress_chunk(tokens, torch.randn(2, 4), t_start, t_start + 1, ones, grid=(2, 3))
    with pytest.raises(ValueError, match=r"weight must be \[T=3\], got shape \(2,\)"):
        compress_chunk(tokens, tokens.mean(1), t_start, t_start + 1, ones[:2], grid=(2, 3))
    with pytest.raises(ValueError, match=r"\[T, N, C\]"):
        compress_chunk(tokens[0], tokens.mean(1), t_start, t_start + 1, ones, grid=(2, 3))
    with pytest.raises(ValueError, match="finite"):
        compress_chunk(tokens * math.nan, tokens.mean(1), t_start, t_start + 1, ones, grid=(2, 3))
    with pytest.raises(ValueError, match="ordered"):
        compress_chunk(tokens, tokens.mean(1), t_start.flip(0), t_start.flip(0) + 1, ones, grid=(2, 3))


def test_dpc_knn_picks_one_centre_per_cluster():
    g = torch.Generator().manual_seed(1)
    centres = F.normalize(torch.randn(3, 16, generator=g), dim=-1) * 10
    sizes = [20, 12, 6]
    x = torch.cat([c + 0.3 * torch.randn(s, 16, generator=g) for c, s in zip(centres, sizes, strict=True)])
    picks = dpc_knn(F.normalize(x, dim=-1), 3, k=5)
    labels = torch.repeat_interleave(torch.arange(3), torch.tensor(sizes))
    assert sorted(labels[picks].tolist()) == [0, 1, 2]


def test_max_min_diverse_covers_every_cluster_and_agrees_with_a_naive_loop():
    g = torch.Generator().manual_seed(2)
    centres = F.normalize(torch.randn(4, 16, generator=g), dim=-1) * 10
    sizes = [30, 10, 3, 1]  # a tiny cluster and a lone outlier must still be picked
    x = F.normalize(
        torch.cat([c + 0.3 * torch.randn(s, 16, generator=g) for c, s in zip(centres, sizes, strict=True)]), dim=-1
    )
    labels = torch.repeat_interleave(torch.arange(4), torch.tensor(sizes))
    picks = max_min_diverse(x, 4)
    assert sorted(labels[picks].tolist()) == [0, 1, 2, 3]
    # Naive reference: each pick is the point whose best cosine to the picks so far is lowest.
    seeds = x[:2]
    fast = max_min_diverse(x[2:], 5, seeds)
    chosen = list(seeds)
    naive = []
    for _ in range(5):
        best = torch.stack([torch.stack([xi @ c for c in chosen]).max() for xi in x[2:]])
        best[naive] = math.inf
        naive.append(int(torch.argmin(best)))
        chosen.append(x[2 + naive[-1]])
    assert fast.tolist() == naive


def test_maxmin_context_selection_keeps_the_invariants():
    images, times = sample_frames("one-by-one-person-detection.mp4", stop_s=32.0)
    tokens, glob = pixel_features(images)
    config = CompressorConfig(tau_static=0.95, tau_segment=0.5, context_selection="maxmin")
    t_start, t_end, weight = spans(times, 1.0)
    for i, out, _ in run_stream(tokens, glob, times=times, chunk=8, config=config):
        check_invariants(out, t_start[i : i + 8], t_end[i : i + 8], weight[i : i + 8])
        assert out.n_tokens <= math.floor(config.keep_ratio * out.n_input)


def test_static_chunks_keep_fewer_tokens_than_busy_ones():
    images, times = sample_frames("one-by-one-person-detection.mp4", stop_s=32.0)
    tokens, glob = pixel_features(images)
    kept = [out for _, out, _ in run_stream(tokens, glob, times=times, chunk=8, config=PIXEL_CONFIG)]
    # keep_ratio is a cap, and a room that is empty part of the time stays well under it.
    assert all(out.n_tokens <= math.floor(PIXEL_CONFIG.keep_ratio * out.n_input) for out in kept)
    assert sum(out.n_tokens for out in kept) <= 0.75 * PIXEL_CONFIG.keep_ratio * sum(out.n_input for out in kept)

    def second_chunk(frames: slice) -> CompressedChunk:
        """Compress `frames` twice in a row (as if the camera repeated them) and return the second."""
        seq = np.concatenate([times[frames], times[frames] + 100.0])
        idx = list(range(frames.start, frames.stop)) * 2
        half = frames.stop - frames.start
        return list(run_stream(tokens[idx], glob[idx], times=seq, chunk=half, config=PIXEL_CONFIG))[1][1]

    empty = second_chunk(slice(0, 6))  # the empty room
    busy = second_chunk(slice(18, 24))  # a person leaves, the next one enters
    assert empty.n_tokens < busy.n_tokens
    assert int(((empty.kind == TokenKind.STATIC) | (empty.kind == TokenKind.CONTEXT)).sum()) >= 1
    assert int((empty.kind == TokenKind.SALIENT).sum()) == 0  # nothing changed, nothing is novel


def test_needle_survives_with_its_time_span():
    images, times = sample_frames("one-by-one-person-detection.mp4", fps=2.0, stop_s=6.0)  # the empty room
    images = images[:12].copy()
    times = times[:12]
    # A 2x2-cell red/green checker (4 grid cells of the 14x14 grid) in frames 9 and 10 only.
    h, w = images.shape[1:3]
    y0, x0, ph, pw = h // 2, w // 3, 2 * h // 14, 2 * w // 14
    needle = np.zeros((ph, pw, 3), dtype=np.uint8)
    needle[: ph // 2, : pw // 2, 0] = needle[ph // 2 :, pw // 2 :, 0] = 255
    needle[: ph // 2, pw // 2 :, 1] = needle[ph // 2 :, : pw // 2, 1] = 255
    for i in (9, 10):
        images[i, y0 : y0 + ph, x0 : x0 + pw] = needle
    tokens, glob = pixel_features(images)
    full = F.normalize(tokens, dim=-1)
    changed = (full[9] * full[8]).sum(-1) < 0.8  # [N] the needle's cells
    assert 1 <= int(changed.sum()) <= 9
    # The needle keeps its own 1-s span only as a SALIENT token; at the default salient_share
    # (0.3, chosen held out for fidelity) it is merged into a 3-s context token here. The bench
    # counts that as lost (docs/compression.md, section 4: 92% of needle cells kept in time at
    # the defaults); this test pins 0.4, the share at which the mechanism is checked.
    config = dataclasses.replace(PIXEL_CONFIG, salient_share=0.4)
    stream = run_stream(tokens, glob, times=times, chunk=6, config=config, period_s=0.5)
    (_, _, _), (_, second, _) = stream
    assert second.n_tokens <= 0.25 * second.n_input
    kept = F.normalize(second.tokens.float(), dim=-1)
    t_start, t_end, _ = spans(times, 0.5)
    for cell in changed.nonzero().squeeze(1).tolist():
        sims = kept @ full[9, cell]  # [M]
        best = int(torch.argmax(sims))
        assert float(sims[best]) > 0.8, f"needle cell {cell} lost (best cosine {float(sims[best]):.2f})"
        assert float(second.t_first[best]) <= float(t_start[9])
        assert float(second.t_last[best]) >= float(t_end[10])
        assert float(second.t_last[best]) - float(second.t_first[best]) <= 1.0 + 1e-6  # frames 9-10 only
    check_invariants(second, t_start[6:], t_end[6:], torch.ones(6, dtype=torch.int64))


def test_scene_cuts_start_segments():
    images, times = sample_frames("scene-change_3cuts.mp4")
    tokens, glob = pixel_features(images)
    found: list[float] = []
    for i, out, state in run_stream(tokens, glob, times=times, chunk=8, config=PIXEL_CONFIG):
        cut_frames = state.cuts.nonzero().squeeze(1).tolist()
        found += [float(times[i + f]) for f in cut_frames]
        for f in cut_frames:
            # Tokens after the cut belong to a later segment than those before it, and nothing
            # kept from after the cut claims time before it (a cut resets the run heads).
            after = out.frame >= f
            if f > 0:
                assert int(out.segment[after].min()) > int(out.segment[~after].max())
            after_content = after & (out.kind != TokenKind.SUMMARY)
            assert bool((out.t_first[after_content] >= T0 + times[i + f]).all())
    assert found == [10.0, 20.0]


def test_baselines_respect_budget_and_provenance():
    images, times = sample_frames("car-detection.mp4", stop_s=8.0)
    tokens, _ = pixel_features(images)
    t_start, t_end, weight = spans(times, 1.0)
    weight = torch.tensor([1, 2, 1, 1, 3, 1, 1, 1])
    for budget in (1, 5, 20, 157):
        pooled = uniform_pool(tokens, t_start, t_end, weight, GRID, budget=budget)
        assert 1 <= pooled.n_tokens <= budget
        check_invariants(pooled, t_start, t_end, weight)
        picked = random_keep(
            tokens, t_start, t_end, weight, GRID, budget=budget, generator=torch.Generator().manual_seed(3)
        )
        assert picked.n_tokens == budget
        again = random_keep(
            tokens, t_start, t_end, weight, GRID, budget=budget, generator=torch.Generator().manual_seed(3)
        )
        assert torch.equal(picked.tokens, again.tokens)
    other = random_keep(tokens, t_start, t_end, weight, GRID, budget=20, generator=torch.Generator().manual_seed(4))
    assert not torch.equal(picked.tokens, other.tokens)
    with pytest.raises(ValueError, match="budget must be >= 1"):
        uniform_pool(tokens, t_start, t_end, weight, GRID, budget=0)
