"""Answer latency with compressed memory against uncompressed frames: same model, same run.

An LLM of realistic size with random weights (Qwen2-0.5B shapes: hidden 896, 24 layers, 14/2
heads, intermediate 4864, vocab 151936) inside a LLaVA-OneVision checkpoint (its vision tower is
tiny: the visual tokens are synthesised here, so only the language model's cost is measured),
saved and loaded through ``load_vlm`` like a real checkpoint. Prompts go through the real path:
``build_prompt`` → ``VisionLanguageModel.generate_tokens``.

Video: 60 frames at 1 fps of 196 tokens each (LLaVA-OV's 14×14 pooled video grid): a static scene
with sensor noise and an object that moves across it. Memory: 8-s chunks compressed by
``memory.compress.compress_chunk`` (keep_ratio 0.10), in camera order with the compressor state
carried between chunks.

Cases (each memory twice: compressed by ``compress_chunk``, whose budget adapts to how much the
scene changes, and a uniform 10% of every frame's tokens, the compressor's typical keep ratio):
* last minute: the 60 frames' chunks vs all 60 frames uncompressed (60 × 196 tokens);
* 10-minute window: our path (top_k = 6 chunks, RetrievalSettings' default) vs the model's usual
  32 uniformly sampled frames (32 × 196 tokens).

    .venv/bin/python -m bench.answer [--threads 2] [--new-tokens 8]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from zoneinfo import ZoneInfo

import torch
from transformers import AutoConfig, LlavaOnevisionForConditionalGeneration

from memory.compress import CompressorConfig, compress_chunk
from memory.types import CompressedChunk, TokenKind
from retrieval.models import VisionLanguageModel, load_vlm
from retrieval.prompt import build_prompt
from retrieval.tiny import make_tiny

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
GRID = (14, 14)  # LLaVA-OV video tokens per frame after 2×2 pooling of so400m's 27×27 patches
FPS = 1.0
CHUNK_FRAMES = 8  # chunk_s 8 at sample_fps 1
TOP_K = 6  # RetrievalSettings.top_k default
BASELINE_FRAMES = 32  # LLaVA-OneVision's usual uniform frame count for a video
QUESTION = "What happened in front of the camera in the last minute?"
T0 = 1_763_632_800.0  # an arbitrary UTC start


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
        torch.manual_seed(0)
        model = LlavaOnevisionForConditionalGeneration(config).to(torch.bfloat16).eval()
        model.generation_config.eos_token_id = []  # random weights: never stop early
        model.save_pretrained(out)
        for f in tiny.vlm.iterdir():
            if not (out / f.name).exists():
                shutil.copy(f, out / f.name)
    return load_vlm(str(out), device="cpu", dtype="bfloat16")


def synthetic_video(frames: int, channels: int, g: torch.Generator) -> torch.Tensor:
    """[T, N, C]: a static scene with noise and a 2×2-token object moving one cell per frame."""
    rows, cols = GRID
    scene = torch.randn(rows * cols, channels, generator=g)  # [N, C]
    thing = torch.randn(channels, generator=g) * 2.0  # [C]
    video = scene.expand(frames, -1, -1).clone() + 0.05 * torch.randn(frames, rows * cols, channels, generator=g)
    for t in range(frames):
        r, c = 6, t % (cols - 1)
        for dr in (0, 1):
            for dc in (0, 1):
                video[t, (r + dr) * cols + c + dc] = thing
    return video


def compress_video(video: torch.Tensor) -> list[CompressedChunk]:
    """Chunks of CHUNK_FRAMES compressed in order with the state carried."""
    chunks, state = [], None
    for start in range(0, video.shape[0], CHUNK_FRAMES):
        tokens = video[start : start + CHUNK_FRAMES]  # [T, N, C]
        t = tokens.shape[0]
        ts = T0 + torch.arange(start, start + t, dtype=torch.float64) / FPS
        global_feats = torch.nn.functional.normalize(tokens.mean(1), dim=-1)  # [T, C]
        chunk, state = compress_chunk(
            tokens,
            global_feats,
            ts,
            ts + 1.0 / FPS,
            torch.ones(t, dtype=torch.int32),
            grid=GRID,
            state=state,
            config=CompressorConfig(),
        )
        chunks.append(chunk)
    return chunks


def full_chunk(video: torch.Tensor, frame_ids: list[int]) -> CompressedChunk:
    """Uncompressed frames as one chunk: every token kept (TokenKind.FULL)."""
    rows, cols = GRID
    t, n = len(frame_ids), rows * cols
    tokens = video[frame_ids].reshape(t * n, -1)  # [T*N, C]
    ts = torch.tensor([T0 + i / FPS for i in frame_ids], dtype=torch.float64).repeat_interleave(n)
    grid_rows = torch.arange(rows).repeat_interleave(cols).repeat(t)
    grid_cols = torch.arange(cols).repeat(rows * t)
    return CompressedChunk(
        tokens=tokens,
        t_first=ts,
        t_last=ts + 1.0 / FPS,
        frame=torch.arange(t).repeat_interleave(n).to(torch.int32),
        row=grid_rows.to(torch.int16),
        col=grid_cols.to(torch.int16),
        count=torch.ones(t * n, dtype=torch.int32),
        kind=torch.full((t * n,), int(TokenKind.FULL), dtype=torch.int8),
        segment=torch.zeros(t * n, dtype=torch.int16),
        grid=GRID,
        n_input=t * n,
    )


def thin(chunk: CompressedChunk, keep_every: int = 10) -> CompressedChunk:
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
    """(time to first token s, total s, visual tokens) for one question over ``items``."""
    parts = build_prompt(QUESTION, items, [], tz=ZoneInfo("UTC"))
    visual = sum(i.chunk.n_tokens for i in items)
    started = time.perf_counter()
    first = None
    for _ in vlm.generate_tokens(parts, max_new_tokens=new_tokens):
        first = first or time.perf_counter()
    done = time.perf_counter()
    return (first or done) - started, done - started, visual


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--new-tokens", type=int, default=8, help="tokens generated per answer")
    parser.add_argument("--count-only", action="store_true", help="print prompt lengths, run no model")
    parser.add_argument("--model-dir", type=Path, default=Path(tempfile.gettempdir()) / "vigil-bench-answer")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    t = time.perf_counter()
    vlm = build_model(args.model_dir)
    print(f"model ready in {time.perf_counter() - t:.1f} s (hidden {vlm.hidden_size})")
    g = torch.Generator().manual_seed(0)
    video = synthetic_video(60, vlm.hidden_size, g)  # [60, 196, C]
    video = video.to(torch.float32)
    t = time.perf_counter()
    compressed = compress_video(video)
    kept = sum(c.n_tokens for c in compressed)
    print(
        f"compressed 60 frames in {time.perf_counter() - t:.2f} s: {kept} of {60 * 196} tokens "
        f"({kept / (60 * 196):.1%}) in {len(compressed)} chunks"
    )

    time_answer(vlm, items_of(compressed[:1]), 2)  # warm-up: allocator, kernels
    all_frames = list(range(60))
    uniform_frames = [round(i * 59 / (BASELINE_FRAMES - 1)) for i in range(BASELINE_FRAMES)]
    # Exactly 10% of every frame's tokens: what the compressor keeps for footage with more motion
    # than this synthetic scene (its budget adapts to change), so the conservative comparison.
    tenth = [thin(full_chunk(video, all_frames[s : s + CHUNK_FRAMES])) for s in range(0, 60, CHUNK_FRAMES)]
    cases = [
        # Cheapest first, so a bounded run still reports the compressed cases.
        ("min_ours", "last minute, compress_chunk", items_of(compressed)),
        ("win_ours", "10-min window, top-6 compress_chunk", items_of(compressed[:TOP_K])),
        ("min_tenth", "last minute, uniform 10%", items_of(tenth)),
        ("win_tenth", "10-min window, top-6 uniform 10%", items_of(tenth[:TOP_K])),
        ("win_full", "10-min window, 32 uniform frames", items_of([full_chunk(video, uniform_frames)])),
        ("min_full", "last minute, 60 frames uncompressed", items_of([full_chunk(video, all_frames)])),
    ]
    if args.count_only:
        for _, label, items in cases:
            print(f"{label:40}{sum(i.chunk.n_tokens for i in items):>11}{prompt_tokens(vlm, items):>11}")
        return
    ttft = {}
    print(f"{'case':40}{'visual tok':>11}{'prompt tok':>11}{'TTFT s':>9}{'total s':>9}")
    for key, label, items in cases:
        length = prompt_tokens(vlm, items)
        first, total, visual = time_answer(vlm, items, args.new_tokens)
        ttft[key] = first
        print(f"{label:40}{visual:>11}{length:>11}{first:>9.2f}{total:>9.2f}", flush=True)
    for scope in ("min", "win"):
        full = ttft[f"{scope}_full"]
        print(
            f"TTFT uncompressed / ours, {scope}: compress_chunk {full / ttft[f'{scope}_ours']:.1f}x, "
            f"uniform 10% {full / ttft[f'{scope}_tenth']:.1f}x"
        )


if __name__ == "__main__":
    main()
