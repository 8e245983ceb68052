"""Answer latency with compressed memory against uncompressed frames: same model, same run.

An LLM of realistic size with random weights (Qwen2-0.5B shapes: hidden 896, 24 layers, 14/2
heads, intermediate 4864, vocab 151936) inside a LLaVA-OneVision checkpoint, saved and loaded
through ``load_vlm`` like a real checkpoint. Prompts go through the real path: ``build_prompt`` →
``VisionLanguageModel.generate_tokens``; each case reports time to first token and total latency
(first token + ``--new-tokens`` more).

Footage: the last 60 s of a real clip (default tests/data/one-by-one-person-detection.mp4) sampled
at 1 fps, encoded by bench/compress.py's pixel featurizer (196 tokens per frame, LLaVA-OV's 14×14
pooled video grid, 64 dims), lifted to the LLM's 896 dims by a seeded map with orthonormal rows,
which keeps every cosine, so the compressor sees exactly the featurizer's similarities. Memory:
8-s chunks compressed by ``memory.compress.compress_chunk`` with the default ``CompressorConfig``,
in camera order with the state carried between chunks (no skip-unchanged: every sampled frame is
encoded, so the compressor does all the reducing).

Cases (each memory twice: compressed by ``compress_chunk``, and a uniform 10% of every frame's
tokens, the compressor's target keep ratio, as the conservative comparison):
* last minute: the 60 frames' chunks vs the same 60 sampled frames uncompressed (60 × 196 tokens);
* 10-minute window: as many chunks as our path puts in a prompt (top_k = 6, RetrievalSettings'
  default), taken as the footage's first six chunks, NOT retrieved: the cost depends on how many
  tokens they hold, not on which chunks they are (retrieval's own latency: bench/search_latency.py);
  vs the model's usual 32 uniformly sampled frames (32 × 196 tokens; taken from the same minute: only their number
  matters to the cost).

    .venv/bin/python -m bench.answer [--threads 2] [--new-tokens 16] [--clip PATH] [--count-only]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from zoneinfo import ZoneInfo

import numpy as np
import torch
from transformers import AutoConfig, LlavaOnevisionForConditionalGeneration

from bench.compress import GRID, pixel_encoder, sample_frames
from memory.compress import CompressorConfig, CompressorState, compress_chunk
from memory.types import CompressedChunk, TokenKind
from retrieval.prompt import build_prompt
from vlm.models import VisionLanguageModel, load_vlm
from vlm.tiny import make_tiny

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CLIP = ROOT / "tests" / "data" / "one-by-one-person-detection.mp4"
QWEN2_05B = {
    "hidden_size": 896,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "intermediate_size": 4864,
    "vocab_size": 151936,
    "max_position_embeddings": 32768,
    "tie_word_embeddings": True,
}
WINDOW_S = 60.0  # "a question over the last minute"
FPS = 1.0  # bench/compress.py's SAMPLE_FPS: sample_fps 1, the daemon's default
CHUNK_FRAMES = 8  # chunk_s 8 at sample_fps 1
TOP_K = 6  # RetrievalSettings.top_k default
BASELINE_FRAMES = 32  # LLaVA-OneVision's usual uniform frame count for a video
UNIFORM_KEEP_EVERY = 10  # uniform 10%: the compressor's target keep_ratio
LIFT_SEED = 0
QUESTION = "What happened in front of the camera in the last minute?"
T0 = 1_763_632_800.0  # an arbitrary UTC start: the clip's second 0


def build_model(directory: Path) -> VisionLanguageModel:
    """Write (once) and load the realistic-size checkpoint, bf16 on CPU."""
    out = directory / "llava-qwen2-0.5b-random"
    if not (out / "config.json").exists():
        tiny = make_tiny(directory / "tiny")
        config = AutoConfig.from_pretrained(tiny.vlm)
        for key, value in QWEN2_05B.items():
            setattr(config.text_config, key, value)
        config.text_config.head_dim = QWEN2_05B["hidden_size"] // QWEN2_05B["num_attention_heads"]
        config.text_config.layer_types = ["full_attention"] * QWEN2_05B["num_hidden_layers"]
        # The composite model ties by its own flag: without it lm_head gets separate random weights.
        config.tie_word_embeddings = QWEN2_05B["tie_word_embeddings"]
        torch.manual_seed(0)
        model = LlavaOnevisionForConditionalGeneration(config).to(torch.bfloat16).eval()
        model.generation_config.eos_token_id = []  # random weights: never stop early
        model.save_pretrained(out)
        for f in tiny.vlm.iterdir():
            if not (out / f.name).exists():
                shutil.copy(f, out / f.name)
    return load_vlm(str(out), device="cpu", dtype="bfloat16")


@dataclass(frozen=True)
class Footage:
    """Sampled frames of a clip, encoded: what the pipeline would hand the compressor."""

    tokens: torch.Tensor  # [T, N, C] LLM-width visual tokens
    global_feats: torch.Tensor  # [T, G] one feature per frame (for segmentation)
    t_start: torch.Tensor  # [T] float64 UTC seconds of each sampled frame
    t_end: torch.Tensor  # [T] float64 end of the span each frame stands for (the next frame's time)


def lift(features: torch.Tensor, width: int) -> torch.Tensor:
    """[..., D] → [..., width] through a seeded map with orthonormal rows (keeps every cosine)."""
    g = torch.Generator().manual_seed(LIFT_SEED)
    q, _ = torch.linalg.qr(torch.randn(width, features.shape[-1], generator=g))  # [width, D], Q^T Q = I
    return features @ q.T  # [..., width]


def load_footage(clip: Path, width: int) -> Footage:
    """The last WINDOW_S seconds of ``clip`` at FPS, through the pixel featurizer, lifted to ``width``."""
    images, times = sample_frames(clip, None)  # [T_all, H, W, 3], [T_all]
    keep = times >= times[-1] + 1.0 / FPS - WINDOW_S
    images, times = images[keep], times[keep]
    tokens, global_feats = pixel_encoder().encode(images)  # [T, N, 64], [T, 64]
    ends = np.append(times[1:], times[-1] + 1.0 / FPS)  # a sampled frame lasts until the next one
    return Footage(
        tokens=lift(tokens, width),
        global_feats=global_feats,
        t_start=T0 + torch.from_numpy(times),
        t_end=T0 + torch.from_numpy(ends),
    )


def compress_footage(footage: Footage, config: CompressorConfig) -> list[CompressedChunk]:
    """Chunks of CHUNK_FRAMES compressed in order with the state carried."""
    chunks: list[CompressedChunk] = []
    state: CompressorState | None = None
    for start in range(0, footage.tokens.shape[0], CHUNK_FRAMES):
        span = slice(start, start + CHUNK_FRAMES)
        tokens = footage.tokens[span]  # [T, N, C]
        chunk, state = compress_chunk(
            tokens,
            footage.global_feats[span],
            footage.t_start[span],
            footage.t_end[span],
            torch.ones(tokens.shape[0], dtype=torch.int64),
            grid=GRID,
            state=state,
            config=config,
        )
        chunks.append(chunk)
    return chunks


def full_chunk(footage: Footage, frame_ids: list[int]) -> CompressedChunk:
    """Uncompressed frames as one chunk: every token kept (TokenKind.FULL)."""
    rows, cols = GRID
    t, n = len(frame_ids), rows * cols
    tokens = footage.tokens[frame_ids].reshape(t * n, -1)  # [T*N, C]
    ids = torch.tensor(frame_ids)
    return CompressedChunk(
        tokens=tokens,
        t_first=footage.t_start[ids].repeat_interleave(n),
        t_last=footage.t_end[ids].repeat_interleave(n),
        frame=torch.arange(t).repeat_interleave(n).to(torch.int32),
        row=torch.arange(rows).repeat_interleave(cols).repeat(t).to(torch.int16),
        col=torch.arange(cols).repeat(rows * t).to(torch.int16),
        count=torch.ones(t * n, dtype=torch.int32),
        kind=torch.full((t * n,), int(TokenKind.FULL), dtype=torch.int8),
        segment=torch.zeros(t * n, dtype=torch.int16),
        grid=GRID,
        n_input=t * n,
    )


def thin(chunk: CompressedChunk, keep_every: int = UNIFORM_KEEP_EVERY) -> CompressedChunk:
    """Every ``keep_every``-th token of a chunk (a uniform 1/keep_every subset)."""
    idx = torch.arange(0, chunk.n_tokens, keep_every)  # [M']
    return CompressedChunk(
        tokens=chunk.tokens[idx],
        t_first=chunk.t_first[idx],
        t_last=chunk.t_last[idx],
        frame=chunk.frame[idx],
        row=chunk.row[idx],
        col=chunk.col[idx],
        count=chunk.count[idx] * keep_every,
        kind=chunk.kind[idx],
        segment=chunk.segment[idx],
        grid=chunk.grid,
        n_input=chunk.n_input,
    )


@dataclass(frozen=True)
class Item:
    camera: str
    start_s: float
    end_s: float
    chunk: CompressedChunk


def items_of(chunks: list[CompressedChunk]) -> list[Item]:
    return [Item("front_door", float(c.t_first.min()), float(c.t_last.max()), c) for c in chunks]


def prompt_tokens(vlm: VisionLanguageModel, items: list[Item]) -> int:
    """Length of the assembled prompt (visual + text tokens, chat template included)."""
    embeds, _, _ = vlm.assemble(build_prompt(QUESTION, items, [], tz=ZoneInfo("UTC")))
    return int(embeds.shape[1])


def time_answer(vlm: VisionLanguageModel, items: list[Item], new_tokens: int) -> tuple[float, float, int]:
    """(time to first token s, total s, tokens generated) for one question over ``items``."""
    parts = build_prompt(QUESTION, items, [], tz=ZoneInfo("UTC"))
    started = time.perf_counter()
    first = None
    generated = 0
    for _ in vlm.generate_tokens(parts, max_new_tokens=new_tokens):
        first = first or time.perf_counter()
        generated += 1
    done = time.perf_counter()
    return (first or done) - started, done - started, generated


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--new-tokens", type=int, default=16, help="tokens generated per answer (total latency)")
    parser.add_argument("--clip", type=Path, default=DEFAULT_CLIP, help="video whose last minute is the memory")
    parser.add_argument("--count-only", action="store_true", help="print prompt lengths, run no model")
    parser.add_argument("--model-dir", type=Path, default=Path(tempfile.gettempdir()) / "vigil-bench-answer")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    t = time.perf_counter()
    vlm = build_model(args.model_dir)
    print(f"model ready in {time.perf_counter() - t:.1f} s (hidden {vlm.hidden_size})")
    t = time.perf_counter()
    footage = load_footage(args.clip, vlm.hidden_size)
    frames = footage.tokens.shape[0]
    n_in = frames * GRID[0] * GRID[1]
    print(
        f"{args.clip.name}: last {frames} frames at {FPS:g} fps "
        f"({float(footage.t_start[0] - T0):.1f}-{float(footage.t_end[-1] - T0):.1f} s) encoded in "
        f"{time.perf_counter() - t:.1f} s"
    )
    t = time.perf_counter()
    compressed = compress_footage(footage, CompressorConfig())
    kept = sum(c.n_tokens for c in compressed)
    print(
        f"compress_chunk, default CompressorConfig: {kept} of {n_in} tokens ({kept / n_in:.1%}) in "
        f"{len(compressed)} chunks, {time.perf_counter() - t:.2f} s"
    )

    all_frames = list(range(frames))
    sampled = [round(i * (frames - 1) / (BASELINE_FRAMES - 1)) for i in range(BASELINE_FRAMES)]
    tenth = [thin(full_chunk(footage, all_frames[s : s + CHUNK_FRAMES])) for s in range(0, frames, CHUNK_FRAMES)]
    cases = [
        # Cheapest first, so a bounded run still reports the compressed cases.
        ("min_ours", "last minute, compress_chunk", items_of(compressed)),
        ("win_ours", "10-min window, first 6 chunks (not retrieved), compress_chunk", items_of(compressed[:TOP_K])),
        ("min_tenth", "last minute, uniform 10%", items_of(tenth)),
        ("win_tenth", "10-min window, first 6 chunks (not retrieved), uniform 10%", items_of(tenth[:TOP_K])),
        ("win_full", f"10-min window, {BASELINE_FRAMES} uniform frames", items_of([full_chunk(footage, sampled)])),
        ("min_full", f"last minute, {frames} frames uncompressed", items_of([full_chunk(footage, all_frames)])),
    ]
    if args.count_only:
        print(f"{'case':64}{'visual tok':>11}{'prompt tok':>11}")
        for _, label, items in cases:
            print(f"{label:64}{sum(i.chunk.n_tokens for i in items):>11}{prompt_tokens(vlm, items):>11}")
        return
    time_answer(vlm, items_of(compressed[:1]), 2)  # warm-up: allocator, kernels
    ttft: dict[str, float] = {}
    total: dict[str, float] = {}
    print(f"{'case':64}{'visual tok':>11}{'prompt tok':>11}{'TTFT s':>9}{'total s':>9}{'new tok':>8}")
    for key, label, items in cases:
        length = prompt_tokens(vlm, items)
        visual = sum(i.chunk.n_tokens for i in items)
        ttft[key], total[key], generated = time_answer(vlm, items, args.new_tokens)
        print(f"{label:64}{visual:>11}{length:>11}{ttft[key]:>9.2f}{total[key]:>9.2f}{generated:>8}", flush=True)
    for scope in ("min", "win"):
        for name, times in (("TTFT", ttft), ("total", total)):
            full = times[f"{scope}_full"]
            print(
                f"{name} uncompressed / ours, {scope}: compress_chunk {full / times[f'{scope}_ours']:.1f}x, "
                f"uniform 10% {full / times[f'{scope}_tenth']:.1f}x"
            )


if __name__ == "__main__":
    main()
