"""Compression benchmark: vigil's compressor against uniform pooling, random keep and FastVID at equal budgets.

    .venv/bin/python bench/compress.py [--json OUT] [--encoder pixel|llava-ov-0.5b] [--max-frames N]
    .venv/bin/python bench/compress.py --calibrate        # choose thresholds on the calibration clips

Held out: thresholds are chosen on CALIBRATION_CLIPS (`--calibrate`) and every figure of a normal
run is over EVALUATION_CLIPS, with the daemon's shipped settings exactly (`CompressorConfig` as
`streamer.settings.CompressionSettings` builds it, and `SkipConfig()`); `--set` overrides mark the
run `"defaults": false` in the JSON.

Over each clip (tests/data/*.mp4) sampled at 1 fps in chunks of 8 frames, the pipeline's order is
reproduced: skip unchanged frames (memory.skip) -> encode -> compress (memory.compress, then each
other method with exactly the number of tokens vigil kept for that chunk) -> payload
(memory.codec). Printed per method: tokens in and out, kept ratio, bytes per camera-hour,
coverage (cosine of each input token to its nearest kept token: mean and 5th percentile),
attention fidelity (bench/fidelity.py: cosine of the LLM's attention readout over the kept tokens
to the readout over all tokens, mean and 5th percentile over queries x chunks), needle survival
over NEEDLE_POSITIONS x chunks placements, scene-cut recall, ms per chunk; random keep over
RANDOM_SEEDS seeds with its spread; plus the encoder calls and time that skipping saved.

Methods: vigil (memory.compress), uniform (memory.baselines.uniform_pool), random
(memory.baselines.random_keep), fastvid (memory.fastvid, FastVID's official defaults, per chunk;
ATS by `probe_attention`, since neither encoder here has a pooling head).

Encoders:
  pixel          a deterministic pixel-patch featurizer (14x14 patches of 16 px, seeded random
                 projection to 64 dims), the same stand-in the tests use; fast, whole clips.
  llava-ov-0.5b  LLaVA-OneVision-0.5B's video path with RANDOM weights built from a transformers
                 config: SigLIP-so400m vision tower (384 px, 27x27 patches, 26 layers), the 2-layer
                 projector to 896 dims, 2x2 bilinear pooling to 14x14 = 196 tokens per frame.
                 Real token shapes and costs, not real semantics. ~3-5 s per frame on 2 CPU cores,
                 hence --max-frames (default 40 per clip).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import io
import itertools
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import av
import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.fidelity import attention_fidelity, query_vectors  # noqa: E402
from memory.baselines import random_keep, uniform_pool  # noqa: E402
from memory.codec import decode_chunk, encode_chunk  # noqa: E402
from memory.compress import CompressorConfig, CompressorState, compress_chunk  # noqa: E402
from memory.fastvid import FastVIDConfig, fastvid_compress  # noqa: E402
from memory.skip import SkipConfig, plan_skips, thumbnail  # noqa: E402
from memory.types import CompressedChunk  # noqa: E402
from streamer.settings import CompressionSettings  # noqa: E402

DATA = ROOT / "tests" / "data"
SAMPLE_FPS = 1.0
CHUNK_FRAMES = 8
GRID = (14, 14)
SEED = 0
# Empty stretches of one-by-one-person-detection.mp4 at 1 fps (tests/data/SOURCES.md; the seconds
# in which a person is still leaving are motion, not empty).
EMPTY_STRETCHES_S = ((0.0, 6.0), (46.0, 51.0), (71.0, 75.0), (138.0, 140.0))
SCENE_CUTS_S = (10.0, 20.0)  # scene-change_3cuts.mp4 ground truth
CUT_TOLERANCE_S = 1.0  # one sampled frame at 1 fps
# Held-out split: thresholds are calibrated on the first two (busy scenes, no cut), figures are
# reported on the other three, which hold the annotated empty stretches and the scene cuts.
CALIBRATION_CLIPS = ("bottle-detection.mp4", "car-detection.mp4")
EVALUATION_CLIPS = ("one-by-one-person-detection.mp4", "person-bicycle-car-detection.mp4", "scene-change_3cuts.mp4")
# The needle: a 2x2-cell red/green checker pasted into frames 3 and 4 of a chunk, at each of
# these top-left cells, in every full chunk after a clip's first (which has no state yet).
NEEDLE_FRAMES = (3, 4)
NEEDLE_POSITIONS = ((2, 2), (2, 10), (6, 4), (10, 7), (11, 11))
NEEDLE_SLACK_S = 1.0 / SAMPLE_FPS  # how far beyond the needle's frames a remembering token may reach
METHODS = ("vigil", "uniform", "random", "fastvid")
RANDOM_SEEDS = 5
LLAVA_OV_DIM = 896  # LLaVA-OV-0.5B's LLM width: the token size bytes per camera-hour is judged at
FP16_BYTES = 2
INT8_SCALE_BYTES = 4  # memory.codec's int8 stores one fp32 scale per channel
STORAGE_TARGET_MB_H = 20.0
NEEDLE_TARGET = 0.95
# Calibration grid (`--calibrate`): the thresholds issue 7 names, around the shipped values.
CALIBRATION_GRID: dict[str, tuple[float, ...]] = {
    "tau_static": (0.85, 0.90, 0.95),
    "tau_segment": (0.5, 0.9),
    "salient_share": (0.3, 0.4, 0.6),
    "cell_diff_threshold": (8.0, 12.0, 16.0),
}


def shipped_config() -> CompressorConfig:
    """The CompressorConfig the daemon builds from default settings (streamer/ingest.py)."""
    settings = CompressionSettings()
    thresholds = {
        name: value
        for name, value in (("tau_static", settings.tau_static), ("tau_segment", settings.tau_segment))
        if value is not None
    }
    return CompressorConfig(keep_ratio=settings.keep_ratio, **thresholds)


@dataclass
class Encoder:
    name: str
    encode: Callable[[np.ndarray], tuple[torch.Tensor, torch.Tensor]]  # [T,H,W,3] -> ([T,N,C], [T,G])


class CachedEncoder:
    """Remembers each frame's encoding (by content hash) and the seconds it took, on disk.

    Lets a slow encoder's run be repeated with other compressor settings; the encoder time of a
    cached frame is the time measured when it was encoded, so the time figures stay honest.
    """

    def __init__(self, encoder: Encoder, path: Path | None) -> None:
        self.encoder = encoder
        self.name = encoder.name
        self.path = path
        self.entries: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
        if path is not None and path.exists():
            self.entries = torch.load(path)

    def encode(self, images: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, float]:
        """[T, H, W, 3] -> tokens [T, N, C], global [T, G], encoder seconds for these frames."""
        keys = [hashlib.sha1(image.tobytes()).hexdigest() for image in images]
        missing = [i for i, key in enumerate(keys) if key not in self.entries]
        if missing:
            t0 = time.perf_counter()
            toks, glob = self.encoder.encode(images[missing])
            per_frame = (time.perf_counter() - t0) / len(missing)
            for j, i in enumerate(missing):
                self.entries[keys[i]] = (toks[j].clone(), glob[j].clone(), per_frame)
        rows = [self.entries[key] for key in keys]
        return torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows]), sum(r[2] for r in rows)

    def save(self) -> None:
        if self.path is not None:
            torch.save(self.entries, self.path)


def pixel_encoder() -> Encoder:
    """The tests' pixel-patch featurizer (tests/test_compress.py), repeated so bench runs alone."""
    proj = torch.randn(3 * 16 * 16, 64, generator=torch.Generator().manual_seed(SEED))

    def encode(images: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0 - 0.5  # [T, 3, H, W]
        x = F.adaptive_avg_pool2d(x, (224, 224))
        patches = F.unfold(x, 16, stride=16).transpose(1, 2)  # [T, 196, 768]
        tokens = patches @ proj / math.sqrt(patches.shape[-1])  # [T, 196, 64]
        return tokens, tokens.mean(dim=1)

    return Encoder("pixel", encode)


def llava_ov_encoder(dtype: torch.dtype) -> Encoder:
    """LLaVA-OneVision-0.5B video path with random weights (see the module docstring)."""
    from transformers import LlavaOnevisionConfig, SiglipVisionModel
    from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionMultiModalProjector

    # Shapes of llava-hf/llava-onevision-qwen2-0.5b-ov-hf: its tower keeps 26 of so400m's 27 layers.
    config = LlavaOnevisionConfig(
        vision_config={
            "model_type": "siglip_vision_model",
            "hidden_size": 1152,
            "intermediate_size": 4304,
            "num_hidden_layers": 26,
            "num_attention_heads": 16,
            "image_size": 384,
            "patch_size": 14,
            "vision_use_head": False,
        },
        text_config={"model_type": "qwen2", "hidden_size": 896},
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
    )
    torch.manual_seed(SEED)
    tower = SiglipVisionModel(config.vision_config).to(dtype).eval()
    projector = LlavaOnevisionMultiModalProjector(config).to(dtype).eval()
    side = config.vision_config.image_size
    patches = side // config.vision_config.patch_size  # 27

    @torch.inference_mode()
    def encode(images: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0  # [T, 3, H, W]
        x = F.interpolate(x, size=(side, side), mode="bilinear", antialias=True)
        x = ((x - 0.5) / 0.5).to(dtype)  # SigLIP normalisation
        hidden = tower(pixel_values=x, output_hidden_states=True).hidden_states[-1]  # [T, 729, 1152]
        feats = projector(hidden)  # [T, 729, 896]
        t, _, c = feats.shape
        grid = feats.view(t, patches, patches, c).permute(0, 3, 1, 2)  # [T, C, 27, 27]
        pooled = F.interpolate(grid, size=GRID, mode="bilinear")  # LLaVA-OV apply_pooling: [T, C, 14, 14]
        tokens = pooled.permute(0, 2, 3, 1).reshape(t, -1, c).float()  # [T, 196, 896]
        return tokens, tokens.mean(dim=1)

    return Encoder("llava-ov-0.5b", encode)


def _no_encoder(images: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    raise RuntimeError("a frame is missing from --cache: run once without the cache file to fill it")


def sample_frames(path: Path, max_frames: int | None) -> tuple[np.ndarray, np.ndarray]:
    images, times = [], []
    with av.open(str(path)) as container:
        next_s = 0.0
        for frame in container.decode(video=0):
            if frame.time is None or frame.time + 1e-6 < next_s:
                continue
            images.append(frame.to_ndarray(format="rgb24"))
            times.append(frame.time)
            next_s += 1.0 / SAMPLE_FPS
            if max_frames is not None and len(images) >= max_frames:
                break
    return np.stack(images), np.asarray(times, dtype=np.float64)


def paste_needle(image: np.ndarray, cell: tuple[int, int]) -> np.ndarray:
    """A 2x2-cell red/green checker with its top-left at grid `cell` ([H, W, 3] -> copy)."""
    out = image.copy()
    h, w = image.shape[:2]
    r0, c0 = cell
    y0, y1 = r0 * h // GRID[0], (r0 + 2) * h // GRID[0]
    x0, x1 = c0 * w // GRID[1], (c0 + 2) * w // GRID[1]
    yy, xx = np.mgrid[y0:y1, x0:x1]
    checker = ((yy - y0) * 4 // (y1 - y0) + (xx - x0) * 4 // (x1 - x0)) % 2 == 0
    out[y0:y1, x0:x1] = np.where(checker[..., None], [255, 0, 0], [0, 255, 0]).astype(np.uint8)
    return out


@dataclass
class MethodStats:
    tokens_in: int = 0
    tokens_out: int = 0
    payload_bytes: int = 0
    payload_int8_bytes: int = 0
    payload_896_bytes: int = 0  # fp16 payload had the tokens LLaVA-OV-0.5B's 896 dims
    payload_896_int8_bytes: int = 0  # the same as int8 (one byte per value, one fp32 scale per channel)
    start_896_bytes: int = 0  # of that, the first chunk of each clip (a stream start)
    coverage: list[torch.Tensor] = field(default_factory=list)
    coverage_centred: list[torch.Tensor] = field(default_factory=list)
    coverage_int8: list[torch.Tensor] = field(default_factory=list)  # against the int8 round trip
    int8_error: list[torch.Tensor] = field(default_factory=list)  # [M] relative L2 error per token
    attention: list[torch.Tensor] = field(default_factory=list)  # [Q] readout cosine per chunk
    attention_centred: list[torch.Tensor] = field(default_factory=list)
    ms: list[float] = field(default_factory=list)
    needle_count: int = 0  # placements
    needle_cells: int = 0
    needle_found: int = 0
    cuts_found: int = 0
    cuts_expected: int = 0
    false_cuts: int = 0


def method_keys(methods: tuple[str, ...]) -> list[str]:
    """Stats keys: one per method, random once per seed ("random/0" ...)."""
    return [k for m in methods for k in ([f"random/{s}" for s in range(RANDOM_SEEDS)] if m == "random" else [m])]


@dataclass
class Totals:
    methods: dict[str, MethodStats]
    sampled_frames: int = 0
    start_frames: int = 0  # sampled frames in the first chunk of each clip
    encoded_frames: int = 0
    encoder_s: float = 0.0
    empty_frames: int = 0
    empty_encoded: int = 0


@dataclass(frozen=True)
class Run:
    """What one bench run compares, and against what."""

    encoder: CachedEncoder
    config: CompressorConfig
    skip: SkipConfig
    methods: tuple[str, ...]
    max_frames: int | None
    # Score against every sampled frame's tokens (skip-unchanged's loss included) instead of the
    # encoded ones: used by --calibrate, where the skip threshold varies.
    reference_all: bool = False
    fastvid: FastVIDConfig = field(default_factory=FastVIDConfig)
    needle_slack_s: float = NEEDLE_SLACK_S


def coverage(inputs: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """[K, C] inputs, [M, C] kept -> [K] cosine of each input to its nearest kept token."""
    return (F.normalize(inputs.float(), dim=-1) @ F.normalize(kept.float(), dim=-1).T).max(dim=1).values


_QUERIES: dict[int, torch.Tensor] = {}


def queries_for(dim: int) -> torch.Tensor:
    if dim not in _QUERIES:
        _QUERIES[dim] = query_vectors(dim, SEED)
    return _QUERIES[dim]


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` torch threads, then restore the previous count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def run_methods(
    tokens: torch.Tensor,
    glob: torch.Tensor,
    spans: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    state: CompressorState | None,
    run: Run,
) -> tuple[dict[str, tuple[CompressedChunk, float]], CompressorState]:
    """Compress one chunk with every method; returns {key: (chunk, ms)} and vigil's new state.

    Every method but vigil gets exactly vigil's token count for this chunk. The compressor works
    on small tensors: thread fan-out costs more than it saves there (and on a shared CPU it stalls
    on busy cores), so callers run this inside ``torch_threads(1)``.
    """
    t_start, t_end, weight = spans
    t0 = time.perf_counter()
    ours, new_state = compress_chunk(tokens, glob, t_start, t_end, weight, grid=GRID, state=state, config=run.config)
    out = {"vigil": (ours, (time.perf_counter() - t0) * 1e3)}
    budget = ours.n_tokens
    if "uniform" in run.methods:
        t0 = time.perf_counter()
        pooled = uniform_pool(tokens, t_start, t_end, weight, GRID, budget=budget)
        out["uniform"] = (pooled, (time.perf_counter() - t0) * 1e3)
    if "random" in run.methods:
        for s in range(RANDOM_SEEDS):
            generator = torch.Generator().manual_seed(SEED + 1000 * s + int(t_start[0]))
            t0 = time.perf_counter()
            picked = random_keep(tokens, t_start, t_end, weight, GRID, budget=budget, generator=generator)
            out[f"random/{s}"] = (picked, (time.perf_counter() - t0) * 1e3)
    if "fastvid" in run.methods:
        t0 = time.perf_counter()
        fast = fastvid_compress(tokens, glob, t_start, t_end, weight, grid=GRID, budget=budget, config=run.fastvid)
        out["fastvid"] = (fast, (time.perf_counter() - t0) * 1e3)
    for key, (chunk, _) in out.items():
        if key != "vigil" and chunk.n_tokens != budget:
            raise AssertionError(f"{key} kept {chunk.n_tokens} tokens, vigil {budget}: budgets must be equal")
    return out, new_state


def run_clip(path: Path, run: Run, totals: Totals) -> None:
    images, times = sample_frames(path, run.max_frames)
    thumbs = [thumbnail(image, run.skip) for image in images]
    period = 1.0 / SAMPLE_FPS
    # A sampled frame lasts until the next one (frame times jitter around the 1 s grid).
    ends = np.append(times[1:], times[-1] + period)
    encoded: dict[int, torch.Tensor] = {}  # sampled frame -> its tokens [N, C] (what the pipeline caches)
    encoded_glob: dict[int, torch.Tensor] = {}
    reference: np.ndarray | None = None
    last_encoded: int | None = None
    state: CompressorState | None = None
    found_cuts: list[float] = []
    clip_out: dict[str, int] = {}  # method -> tokens kept over this clip
    for k, i in enumerate(range(0, len(images), CHUNK_FRAMES)):
        chunk_thumbs = thumbs[i : i + CHUNK_FRAMES]
        saved = (state, reference, last_encoded)
        plan = plan_skips(chunk_thumbs, reference, run.skip)
        reference = plan.reference
        todo = [i + j for j in plan.encode]
        if todo:
            toks, glob, seconds = run.encoder.encode(images[todo])
            totals.encoder_s += seconds
            for j, idx in enumerate(todo):
                encoded[idx], encoded_glob[idx] = toks[j], glob[j]
            totals.encoded_frames += len(todo)
        sources = ([last_encoded] if plan.reuse_first else []) + todo
        last_encoded = todo[-1] if todo else last_encoded
        totals.sampled_frames += len(chunk_thumbs)
        totals.start_frames += len(chunk_thumbs) if k == 0 else 0
        if path.name == "one-by-one-person-detection.mp4":
            for j in range(len(chunk_thumbs)):
                if any(a <= times[i + j] < b for a, b in EMPTY_STRETCHES_S):
                    totals.empty_frames += 1
                    totals.empty_encoded += int(j in plan.encode)
        tokens = torch.stack([encoded[s] for s in sources])  # [T', N, C]
        glob = torch.stack([encoded_glob[s] for s in sources])  # [T', G]
        first = torch.tensor([i + a for a in plan.first])
        last = torch.tensor([i + b for b in plan.last])
        t_start = torch.from_numpy(times)[first]
        spans = (t_start, torch.from_numpy(ends)[last], torch.tensor(plan.weight, dtype=torch.int64))
        with torch_threads(1):
            results, state = run_methods(tokens, glob, spans, state, run)
        found_cuts += [float(t_start[f]) for f in state.cuts.nonzero().squeeze(1).tolist()]
        if run.reference_all:  # every sampled frame, each once
            ref_tokens = run.encoder.encode(images[i : i + CHUNK_FRAMES])[0]  # [T, N, C]
            ref_weight = torch.ones(ref_tokens.shape[0], dtype=torch.int64)
        else:
            ref_tokens, ref_weight = tokens, spans[2]
        flat = ref_tokens.reshape(-1, ref_tokens.shape[-1])
        queries = queries_for(tokens.shape[-1])
        for name, (chunk, ms) in results.items():
            stats = totals.methods[name]
            stats.tokens_in += chunk.n_input
            stats.tokens_out += chunk.n_tokens
            fp16 = len(encode_chunk(chunk, "fp16"))
            stats.payload_bytes += fp16
            at_896 = fp16 + chunk.n_tokens * (LLAVA_OV_DIM - chunk.tokens.shape[1]) * FP16_BYTES
            stats.payload_896_bytes += at_896
            stats.start_896_bytes += at_896 if k == 0 else 0
            int8_payload = encode_chunk(chunk, "int8")
            int8 = len(int8_payload)
            stats.payload_int8_bytes += int8
            extra_dims = LLAVA_OV_DIM - chunk.tokens.shape[1]
            stats.payload_896_int8_bytes += int8 + (chunk.n_tokens + INT8_SCALE_BYTES) * extra_dims
            clip_out[name] = clip_out.get(name, 0) + chunk.n_tokens
            stats.coverage.append(coverage(flat, chunk.tokens))
            plain, centred = attention_fidelity(queries, ref_tokens, ref_weight, chunk.tokens, chunk.count)
            stats.attention.append(plain)
            stats.attention_centred.append(centred)
            stats.ms.append(ms)
            if run.reference_all:
                continue  # calibration needs neither the int8 nor the centred figures
            restored = decode_chunk(int8_payload).tokens.float()  # [M, C]
            stats.coverage_int8.append(coverage(flat, restored))
            original = chunk.tokens.float()
            stats.int8_error.append((restored - original).norm(dim=1) / original.norm(dim=1).clamp_min(1e-12))
            # Random towers give anisotropic features (any two tokens have cosine ~0.9), which
            # saturates plain coverage; subtracting the chunk's mean token shows the differences.
            centre = flat.float().mean(dim=0)
            stats.coverage_centred.append(coverage(flat - centre, chunk.tokens.float() - centre))
        if k >= 1 and len(chunk_thumbs) == CHUNK_FRAMES:
            # Replays of this chunk; what they encode is not counted as pipeline cost.
            for cell in NEEDLE_POSITIONS:
                needle_trial(
                    images[i : i + CHUNK_FRAMES],
                    times[i : i + CHUNK_FRAMES],
                    ends=ends[i : i + CHUNK_FRAMES],
                    offset=i,
                    cell=cell,
                    saved=saved,
                    cache=(encoded, encoded_glob),
                    run=run,
                    totals=totals,
                )
    if path.name == "scene-change_3cuts.mp4":
        # Only vigil reports cuts (FastVID's DySeg segments inside a chunk but carries nothing out).
        stats = totals.methods["vigil"]
        stats.cuts_expected += len(SCENE_CUTS_S)
        hits = [c for c in SCENE_CUTS_S if any(abs(c - f) <= CUT_TOLERANCE_S for f in found_cuts)]
        stats.cuts_found += len(hits)
        stats.false_cuts += sum(all(abs(c - f) > CUT_TOLERANCE_S for c in SCENE_CUTS_S) for f in found_cuts)
    share = clip_out["vigil"] / (len(images) * GRID[0] * GRID[1])
    print(f"  {path.name}: {len(images)} frames, {share:.1%} of sampled tokens kept, cuts at {found_cuts}", flush=True)


def needle_trial(
    images: np.ndarray,
    times: np.ndarray,
    *,
    ends: np.ndarray,
    offset: int,
    cell: tuple[int, int],
    saved: tuple[CompressorState | None, np.ndarray | None, int | None],
    cache: tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]],
    run: Run,
    totals: Totals,
) -> None:
    """Replay one chunk with a needle at `cell` in two frames; count needle cells each method remembers.

    Frames the main pass encoded and the needle did not touch reuse their cached tokens; the
    needle frames (and any frame the needle made "changed") are encoded here.
    """
    state, reference, last_encoded = saved
    cached, cached_glob = cache
    originals = images
    images = images.copy()
    for f in NEEDLE_FRAMES:
        images[f] = paste_needle(images[f], cell)
    plan = plan_skips([thumbnail(image, run.skip) for image in images], reference, run.skip)
    needle_from, needle_to = float(times[NEEDLE_FRAMES[0]]), float(ends[NEEDLE_FRAMES[1]])
    r0, c0 = cell
    cells = [(r0 + dr) * GRID[1] + c0 + dc for dr in (0, 1) for dc in (0, 1)]
    if NEEDLE_FRAMES[0] not in plan.encode:  # the skip check missed it: lost for every method
        for stats in totals.methods.values():
            stats.needle_count += 1
            stats.needle_cells += len(cells)
        return
    fresh = [j for j in plan.encode if j in NEEDLE_FRAMES or offset + j not in cached]
    new_t, new_g, _ = run.encoder.encode(
        np.concatenate([images[fresh], originals[NEEDLE_FRAMES[0] : NEEDLE_FRAMES[0] + 1]])
    )
    by_frame = {j: (new_t[n], new_g[n]) for n, j in enumerate(fresh)}
    rows = []
    if plan.reuse_first:
        assert last_encoded is not None
        rows.append((cached[last_encoded], cached_glob[last_encoded]))
    rows += [by_frame.get(j, (cached.get(offset + j), cached_glob.get(offset + j))) for j in plan.encode]
    toks = torch.stack([r[0] for r in rows])  # [T', N, C]
    glob = torch.stack([r[1] for r in rows])  # [T', G]
    clean = new_t[-1]  # [N, C] the first needle frame without the needle
    t_start = torch.from_numpy(times)[torch.tensor(plan.first)]
    t_end = torch.from_numpy(ends)[torch.tensor(plan.last)]
    with torch_threads(1):
        results, _ = run_methods(toks, glob, (t_start, t_end, torch.tensor(plan.weight, dtype=torch.int64)), state, run)
    k = plan.first.index(NEEDLE_FRAMES[0])
    for name, (chunk, _) in results.items():
        stats = totals.methods[name]
        stats.needle_count += 1
        # A token remembers the needle only if it also says when: its span overlaps the needle's
        # and reaches at most one sampled frame beyond it either side (a context token merged
        # over the whole chunk may hold the look but not the time; tests/test_compress.py asks
        # the same of the compressor).
        overlaps = (chunk.t_first < needle_to) & (chunk.t_last > needle_from)  # [M]
        overlaps &= (chunk.t_first >= needle_from - run.needle_slack_s) & (
            chunk.t_last <= needle_to + run.needle_slack_s
        )
        kept = F.normalize(chunk.tokens.float(), dim=-1)  # [M, C]
        for c in cells:
            needle = F.normalize(toks[k, c].float(), dim=-1)
            background = F.normalize(clean[c].float(), dim=-1)
            # Remembered: a kept token of the needle's time is closer to the needle than the
            # background was (halfway to identical), whatever the feature space's cosine scale.
            bar = (1.0 + float(needle @ background)) / 2.0
            stats.needle_cells += 1
            stats.needle_found += int(bool((overlaps & (kept @ needle >= bar)).any()))


def _p5(values: list[torch.Tensor]) -> float:
    return float(torch.quantile(torch.cat(values).float(), 0.05))


def _figures(s: MethodStats, hours: float) -> dict[str, float | int | None]:
    cov, att = torch.cat(s.coverage), torch.cat(s.attention)
    out: dict[str, float | int | None] = {
        "tokens_in": s.tokens_in,
        "tokens_out": s.tokens_out,
        "kept_ratio": s.tokens_out / s.tokens_in,
        "coverage_mean": float(cov.mean()),
        "coverage_p5": _p5(s.coverage),
        "attention_fidelity_mean": float(att.mean()),
        "attention_fidelity_p5": _p5(s.attention),
        "attention_fidelity_centred_mean": float(torch.cat(s.attention_centred).mean()),
        "attention_fidelity_centred_p5": _p5(s.attention_centred),
        "needle_survival": s.needle_found / s.needle_cells if s.needle_cells else None,
        "needle_count": s.needle_count,
        "needle_cells": s.needle_cells,
        "scene_cut_recall": s.cuts_found / s.cuts_expected if s.cuts_expected else None,
        "bytes_per_camera_hour": s.payload_bytes / hours,
        "bytes_per_camera_hour_896_fp16": s.payload_896_bytes / hours,
        "bytes_per_camera_hour_896_int8": s.payload_896_int8_bytes / hours,
        "ms_per_chunk": statistics.fmean(s.ms),
    }
    if s.coverage_int8:
        out |= {
            "coverage_centred_mean": float(torch.cat(s.coverage_centred).mean()),
            "coverage_centred_p5": _p5(s.coverage_centred),
            "coverage_int8_mean": float(torch.cat(s.coverage_int8).mean()),
            "coverage_int8_p5": _p5(s.coverage_int8),
            "int8_relative_error_mean": float(torch.cat(s.int8_error).mean()),
        }
    return out


def summarise(totals: Totals, hours: float) -> dict[str, dict[str, object]]:
    """Per method figures; random is the mean over its seeds, with each figure's [min, max] in `spread`."""
    out: dict[str, dict[str, object]] = {}
    seeds = []
    for key, s in totals.methods.items():
        if key.startswith("random/"):
            seeds.append(_figures(s, hours))
        else:
            out[key] = dict(_figures(s, hours))
    if seeds:
        merged: dict[str, object] = {}
        spread: dict[str, list[float]] = {}
        for name, value in seeds[0].items():
            values = [f[name] for f in seeds]
            if value is None:
                merged[name] = None
            elif isinstance(value, int):
                merged[name] = value  # counts: equal across seeds
            else:
                merged[name] = statistics.fmean(values)  # type: ignore[arg-type]
                spread[name] = [min(values), max(values)]  # type: ignore[type-var]
        merged["seeds"] = len(seeds)
        merged["spread"] = spread
        order = {m: i for i, m in enumerate(METHODS)}
        out["random"] = merged
        out = dict(sorted(out.items(), key=lambda kv: order.get(kv[0], 99)))
    return out


def run_all(run: Run, clips: tuple[str, ...]) -> tuple[Totals, dict[str, dict[str, object]]]:
    totals = Totals(methods={k: MethodStats() for k in method_keys(run.methods)})
    for name in clips:
        run_clip(DATA / name, run, totals)
    run.encoder.save()
    hours = totals.sampled_frames / SAMPLE_FPS / 3600.0
    return totals, summarise(totals, hours)


def calibrate(encoder: CachedEncoder, base: CompressorConfig, max_frames: int | None) -> dict[str, object]:
    """Grid search on CALIBRATION_CLIPS: vigil alone, scored against every sampled frame.

    Objective: attention fidelity mean + p5 + coverage mean + p5, among the settings that keep
    the int8 storage at 896 dims within STORAGE_TARGET_MB_H and the needle survival at least
    NEEDLE_TARGET (the targets the defaults must meet).
    """
    rows = []
    names = list(CALIBRATION_GRID)
    for values in itertools.product(*(CALIBRATION_GRID[n] for n in names)):
        setting = dict(zip(names, values, strict=True))
        skip = SkipConfig(cell_diff_threshold=setting["cell_diff_threshold"])
        config = dataclasses.replace(base, **{k: v for k, v in setting.items() if k != "cell_diff_threshold"})
        run = Run(encoder, config, skip, ("vigil",), max_frames, reference_all=True)
        with contextlib.redirect_stdout(io.StringIO()):
            _, figures = run_all(run, CALIBRATION_CLIPS)
        f = figures["vigil"]
        score = sum(
            float(f[k]) for k in ("attention_fidelity_mean", "attention_fidelity_p5", "coverage_mean", "coverage_p5")
        )  # type: ignore[arg-type]
        mb_h = float(f["bytes_per_camera_hour_896_int8"]) / 1e6  # type: ignore[arg-type]
        ok = mb_h <= STORAGE_TARGET_MB_H and float(f["needle_survival"] or 0.0) >= NEEDLE_TARGET  # type: ignore[arg-type]
        rows.append((ok, score, setting, f, mb_h))
    shipped = {
        "tau_static": base.tau_static,
        "tau_segment": base.tau_segment,
        "salient_share": base.salient_share,
        "cell_diff_threshold": SkipConfig().cell_diff_threshold,
    }
    # Best first; among equal scores (a threshold the clips cannot tell apart), the setting that
    # differs least from what ships.
    rows.sort(key=lambda r: (not r[0], -round(r[1], 6), sum(r[2][k] != shipped[k] for k in shipped)))
    print(
        f"calibration on {', '.join(CALIBRATION_CLIPS)}: {len(rows)} settings, vigil scored against every sampled frame"
    )
    print(f"{'tau_static':>10} {'tau_seg':>7} {'salient':>7} {'skip_diff':>9} {'kept':>6} {'MB/h int8':>9} "
          f"{'attn mean':>9} {'attn p5':>7} {'cov mean':>8} {'cov p5':>7} {'needle':>6} {'score':>6} ok")  # fmt: skip
    for ok, score, setting, f, mb_h in rows:
        mark = " <- shipped" if setting == shipped else ""
        print(
            f"{setting['tau_static']:>10.2f} {setting['tau_segment']:>7.2f} {setting['salient_share']:>7.2f} "
            f"{setting['cell_diff_threshold']:>9.0f} {float(f['kept_ratio']):>6.2%} {mb_h:>9.2f} "  # type: ignore[arg-type]
            f"{float(f['attention_fidelity_mean']):>9.4f} {float(f['attention_fidelity_p5']):>7.4f} "  # type: ignore[arg-type]
            f"{float(f['coverage_mean']):>8.4f} {float(f['coverage_p5']):>7.4f} "  # type: ignore[arg-type]
            f"{float(f['needle_survival'] or 0):>6.0%} {score:>6.4f} {'yes' if ok else 'no'}{mark}"  # type: ignore[arg-type]
        )
    best = rows[0][2]
    print(f"\nbest held-out setting: {best}; shipped: {shipped}; {'the same' if best == shipped else 'DIFFERENT'}")
    return {"best": best, "shipped": shipped}


def _parse_set(config: CompressorConfig, items: list[str]) -> CompressorConfig:
    for item in items:
        key, _, value = item.partition("=")
        current = getattr(config, key)
        if value.lower() == "none":
            parsed: object = None
        elif isinstance(current, bool):
            parsed = value.lower() == "true"
        elif current is None or isinstance(current, float):
            parsed = float(value)
        elif isinstance(current, str):
            parsed = value
        else:
            parsed = type(current)(value)
        config = dataclasses.replace(config, **{key: parsed})
    return config


def _fmt(f: dict[str, object], key: str, spec: str) -> str:
    value = f[key]
    text = format(value, spec)
    spread = f.get("spread")
    if isinstance(spread, dict) and key in spread:
        lo, hi = spread[key]
        text += f"±{format((hi - lo) / 2, spec).lstrip('0') or '0'}"
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write the per-method figures here")
    parser.add_argument("--encoder", choices=("pixel", "llava-ov-0.5b"), default="pixel")
    parser.add_argument("--max-frames", type=int, help="sampled frames per clip (default: all; 40 for llava-ov-0.5b)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="FIELD=VALUE", help="override a CompressorConfig field"
    )
    parser.add_argument("--skip-diff", type=float, help="override SkipConfig.cell_diff_threshold")
    parser.add_argument(
        "--needle-slack-s",
        type=float,
        default=NEEDLE_SLACK_S,
        help="how far beyond the needle's frames a remembering token may reach (inf: content only)",
    )
    parser.add_argument(
        "--fastvid-set", action="append", default=[], metavar="FIELD=VALUE", help="override a FastVIDConfig field"
    )
    parser.add_argument("--calibrate", action="store_true", help="grid search on the calibration clips, then stop")
    parser.add_argument(
        "--clips", choices=("evaluation", "calibration", "all"), default="evaluation", help="clips to score"
    )
    parser.add_argument("--cache", type=Path, help="file of cached encodings: reused if present, written after the run")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    max_frames = args.max_frames or (40 if args.encoder == "llava-ov-0.5b" else None)
    if args.encoder == "pixel":
        encoder = CachedEncoder(pixel_encoder(), args.cache)
    elif args.cache is not None and args.cache.exists():
        encoder = CachedEncoder(Encoder("llava-ov-0.5b", _no_encoder), args.cache)
    else:
        encoder = CachedEncoder(llava_ov_encoder(torch.bfloat16), args.cache)
    shipped = shipped_config()
    if args.calibrate:
        result = calibrate(encoder, shipped, max_frames)
        if args.json:
            args.json.write_text(json.dumps({"calibration": result, "clips": list(CALIBRATION_CLIPS)}, indent=2) + "\n")
        return 0
    config = _parse_set(shipped, args.set)
    skip = SkipConfig() if args.skip_diff is None else SkipConfig(cell_diff_threshold=args.skip_diff)
    defaults = config == shipped and skip == SkipConfig()
    clips = {
        "evaluation": EVALUATION_CLIPS,
        "calibration": CALIBRATION_CLIPS,
        "all": CALIBRATION_CLIPS + EVALUATION_CLIPS,
    }[args.clips]
    fastvid = FastVIDConfig()
    for item in args.fastvid_set:
        key, _, value = item.partition("=")
        current = getattr(fastvid, key)
        fastvid = dataclasses.replace(fastvid, **{key: value if isinstance(current, str) else type(current)(value)})
    run = Run(encoder, config, skip, METHODS, max_frames, fastvid=fastvid, needle_slack_s=args.needle_slack_s)
    print(
        f"encoder {encoder.name}, {max_frames or 'all'} frames per clip at {SAMPLE_FPS:g} fps, "
        f"chunks of {CHUNK_FRAMES}; "
        f"{'shipped defaults' if defaults else 'OVERRIDES'}: {config}, {skip}; {fastvid}; clips: {', '.join(clips)}"
    )
    totals, figures = run_all(run, clips)
    hours = totals.sampled_frames / SAMPLE_FPS / 3600.0

    sampled_tokens = totals.sampled_frames * GRID[0] * GRID[1]
    print(f"\n{'method':<8} {'tok in':>7} {'tok out':>7} {'kept':>6} {'of smpl':>7} {'MB/h int8':>9} "
          f"{'attn mean':>11} {'attn p5':>11} {'cov mean':>11} {'cov p5':>11} "
          f"{'needle':>7} {'cuts':>5} {'ms/chunk':>8}")  # fmt: skip
    for name, f in figures.items():
        needle = "-" if f["needle_survival"] is None else f"{f['needle_survival']:.1%}"
        cuts = "-" if f["scene_cut_recall"] is None else f"{f['scene_cut_recall']:.0%}"
        out = int(f["tokens_out"])  # type: ignore[call-overload]
        print(
            f"{name:<8} {f['tokens_in']:>7} {out:>7} {f['kept_ratio']:>6.2%} {out / sampled_tokens:>7.2%} "
            f"{float(f['bytes_per_camera_hour_896_int8']) / 1e6:>9.2f} "  # type: ignore[arg-type]
            f"{_fmt(f, 'attention_fidelity_mean', '.4f'):>11} {_fmt(f, 'attention_fidelity_p5', '.4f'):>11} "
            f"{_fmt(f, 'coverage_mean', '.4f'):>11} {_fmt(f, 'coverage_p5', '.4f'):>11} "
            f"{needle:>7} {cuts:>5} {float(f['ms_per_chunk']):>8.2f}"  # type: ignore[arg-type]
        )
    vigil_f = figures["vigil"]
    print(
        f"\nneedles: {vigil_f['needle_count']} placements ({vigil_f['needle_cells']} needle cells) per method; "
        f"random: mean over {RANDOM_SEEDS} seeds, ± half its min-max spread"
    )
    print("\nattention fidelity after subtracting the chunk's mean token (centred readouts): mean / p5")
    for name, f in figures.items():
        mean, p5 = _fmt(f, "attention_fidelity_centred_mean", ".4f"), _fmt(f, "attention_fidelity_centred_p5", ".4f")
        print(f"  {name:<8} {mean:>12} {p5:>12}")
    steady_hours = (totals.sampled_frames - totals.start_frames) / SAMPLE_FPS / 3600.0
    print(
        "\nbytes per camera-hour (MB): fp16 / int8 at this encoder's width; fp16 at 896 dims; "
        "the same without each clip's first chunk (a stream start); int8 at 896 dims"
    )
    for name, s in totals.methods.items():
        if name.startswith("random/") and name != "random/0":
            continue
        print(
            f"  {name.split('/')[0]:<8} {s.payload_bytes / hours / 1e6:8.2f} {s.payload_int8_bytes / hours / 1e6:8.2f} "
            f"{s.payload_896_bytes / hours / 1e6:8.2f} "
            f"{(s.payload_896_bytes - s.start_896_bytes) / steady_hours / 1e6:8.2f} "
            f"{s.payload_896_int8_bytes / hours / 1e6:8.2f}"
        )
    print("\nint8 round trip: coverage mean / 5th percentile; relative L2 error per token mean / max")
    for name, s in totals.methods.items():
        if name.startswith("random/") and name != "random/0":
            continue
        cov, err = torch.cat(s.coverage_int8), torch.cat(s.int8_error)
        print(
            f"  {name.split('/')[0]:<8} {float(cov.mean()):8.3f} {float(torch.quantile(cov, 0.05)):8.3f} "
            f"{float(err.mean()):8.4f} {float(err.max()):8.4f}"
        )
    print("\ncoverage after subtracting each chunk's mean token: mean / 5th percentile")
    for name, f in figures.items():
        print(f"  {name:<8} {_fmt(f, 'coverage_centred_mean', '.3f'):>10} {_fmt(f, 'coverage_centred_p5', '.3f'):>10}")
    vigil = totals.methods["vigil"]
    saved_calls = 1 - totals.encoded_frames / totals.sampled_frames
    per_frame_s = totals.encoder_s / max(totals.encoded_frames, 1)
    n_chunks = len(vigil.ms)
    print(f"\nvigil false scene cuts: {vigil.false_cuts}")
    print(
        f"skip unchanged: encoded {totals.encoded_frames}/{totals.sampled_frames} sampled frames "
        f"({saved_calls:.0%} encoder calls saved, ~{saved_calls * totals.sampled_frames * per_frame_s:.1f} s "
        f"of {totals.sampled_frames * per_frame_s:.1f} s encoder time at {per_frame_s * 1e3:.1f} ms/frame)"
    )
    if totals.empty_frames:
        print(
            f"  over the empty stretches of one-by-one-person-detection.mp4: "
            f"{1 - totals.empty_encoded / totals.empty_frames:.0%} saved "
            f"({totals.empty_encoded}/{totals.empty_frames} encoded)"
        )
    encoder_ms_per_chunk = totals.encoder_s * 1e3 / n_chunks
    full_chunk_ms = per_frame_s * 1e3 * CHUNK_FRAMES
    print(
        f"compression time: {statistics.fmean(vigil.ms):.1f} ms/chunk = "
        f"{statistics.fmean(vigil.ms) / encoder_ms_per_chunk:.1%} of the encoder time per chunk after skipping "
        f"({encoder_ms_per_chunk:.0f} ms), {statistics.fmean(vigil.ms) / full_chunk_ms:.1%} of encoding "
        f"all {CHUNK_FRAMES} frames ({full_chunk_ms:.0f} ms)"
    )
    if args.json:
        doc = {
            "defaults": defaults,
            "clips": {"calibration": list(CALIBRATION_CLIPS), "evaluation": list(EVALUATION_CLIPS)},
            "scored_clips": list(clips),
            "encoder": encoder.name,
            "config": dataclasses.asdict(config),
            "skip": dataclasses.asdict(skip),
            "fastvid": dataclasses.asdict(fastvid),
            "needle_slack_s": args.needle_slack_s,
            "methods": figures,
        }
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
