"""Cost of checking many watches against one chunk, with and without prefix reuse: same model, same run.

The model: LLaVA-OneVision-0.5B's real config with random weights (``build_checkpoint``: Qwen2-0.5B
LLM, hidden 896, 24 layers, 14/2 heads, vocab 152000), the real Qwen2 tokenizer and the
processor's chat template, saved and loaded through ``load_vlm``; float32 by default, what
``models.dtype: auto`` picks on a CPU. A check reads stored tokens, so only the LLM runs.

The chunk: real footage (default tests/data/one-by-one-person-detection.mp4), its last minute at
1 fps through bench/compress.py's pixel featurizer lifted to 896 dims (bench/answer.py's
``load_footage``), 8-s chunks compressed by ``compress_chunk`` with the default config in camera
order; the context is the typical chunk, the one with the median token count among the full chunks
after the first (``--chunks 2``: with the one before it, as a motion question may use), laid out
as the prompt lays out a chunk (a header line, the tokens in frame, row, col order).

The checks: ``vlm.watch.yes_probabilities`` for the first 1, 4, 16 and 64 of ``QUESTIONS`` (64
distinct standing questions), with ``reuse_prefix=True`` (one prefill of the shared prefix, the
questions from its KV cache, ``--max-batch`` at a time) and ``False`` (each question a full
prefill). Every case is timed ``--repeats`` times, the cases interleaved within each repeat so
that load from other processes falls on all of them alike; the median is reported, and its ratio
to ONE WATCH CHECKED ALONE (one full prefill, ``reuse_prefix=False``), measured in the same run.
Targets (issue 11, measured, not asserted): 16 watches ≤ 3x one watch, 64 ≤ 8x.

    HF_HUB_OFFLINE=1 .venv/bin/python -m bench.watches [--threads 1] [--repeats 3] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from zoneinfo import ZoneInfo

import torch
from transformers import GenerationConfig, LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

from bench.answer import DEFAULT_CLIP, compress_footage, load_footage
from memory.compress import CompressorConfig
from memory.types import CompressedChunk
from retrieval.prompt import format_span, token_order
from tests.plugins.real_shape import COPIED, LLAVA_OV, build_qwen_tokenizer
from vlm.models import load_vlm
from vlm.types import PromptPart, TextPart, VisualPart
from vlm.watch import DEFAULT_MAX_BATCH, INSTRUCTION, QUESTION_SEPARATOR, split_prompt, yes_probabilities

WATCH_COUNTS = (1, 4, 16, 64)
TARGETS = {16: 3.0, 64: 8.0}  # watches → the most a check of that many may cost, in single checks
CAMERA = "front_door"
SEED = 0
VISION_LAYERS = 1
SUBJECTS = (
    "a person",
    "a car",
    "a bicycle",
    "a dog",
    "a cat",
    "a parcel",
    "a delivery van",
    "a truck",
    "two people",
    "a child",
    "a person carrying a box",
    "a motorcycle",
    "an umbrella",
    "smoke",
    "a bag",
    "a ladder",
)
PLACES = ("in view", "at the door", "in the driveway", "moving across the frame")
QUESTIONS = tuple(f"Is there {subject} {place}?" for place in PLACES for subject in SUBJECTS)  # 64


def context_of(chunks: list[CompressedChunk], tz: ZoneInfo) -> list[PromptPart]:
    """Chunks as the prompt lays them out: a header line, then the tokens in (frame, row, col) order."""
    parts: list[PromptPart] = []
    for chunk in chunks:
        span = format_span(float(chunk.t_first.min()), float(chunk.t_last.max()), tz)
        order = token_order(chunk.frame, chunk.row, chunk.col)  # [M]
        parts += [
            TextPart(f"[{CAMERA}] {span}:\n"),
            VisualPart(
                tokens=chunk.tokens[order], frame=chunk.frame[order], row=chunk.row[order], col=chunk.col[order]
            ),
            TextPart("\n"),
        ]
    return parts


def typical_chunk(chunks: list[CompressedChunk]) -> int:
    """Index of the chunk with the median kept-token count among the full chunks compressed with
    the state of the one before (a clip's first chunk has none and keeps more, a short last one less)."""
    full = max(c.n_input for c in chunks)
    candidates = sorted((c.n_tokens, i) for i, c in enumerate(chunks) if i > 0 and c.n_input == full)
    return candidates[len(candidates) // 2][1]


def build_checkpoint(directory: Path) -> Path:
    """Write (once) LLaVA-OneVision-0.5B's real config with random weights, its tokenizer and template.

    tests/data/real-configs' config (Qwen2-0.5B LLM: hidden 896, 24 layers, 14/2 heads, vocab
    152000, tied embeddings), the real Qwen2 tokenizer with the model's special tokens and the
    processor's chat template, as tests/plugins/real_shape.py builds them, but with every LLM
    layer. The vision tower keeps VISION_LAYERS of its 26: a check reads stored tokens, never
    pixels, so the tower's depth changes nothing measured here.
    """
    out = directory / "llava-ov-0.5b-random"
    if (out / "config.json").exists():
        return out
    config = LlavaOnevisionConfig.from_pretrained(LLAVA_OV)
    config.vision_config.num_hidden_layers = VISION_LAYERS
    torch.manual_seed(SEED)
    model = LlavaOnevisionForConditionalGeneration(config).to(torch.bfloat16).eval()  # the hub checkpoint is bf16
    model.generation_config = GenerationConfig.from_pretrained(LLAVA_OV)
    model.save_pretrained(out)
    del model
    build_qwen_tokenizer(directory / "tokenizer-work").save_pretrained(out)
    for name in (*COPIED, "chat_template.json"):
        shutil.copy(LLAVA_OV / name, out / name)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # One thread: on a CPU shared with other work, torch's threads wait on each other and a
    # prefill measured with 2 threads on 2 busy cores took 4x as long as with 1, and varied more.
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of every case (median reported)")
    parser.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH, help="questions per batch with reuse")
    parser.add_argument("--chunks", type=int, default=1, help="chunks in the context (2: with the previous one)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--clip", type=Path, default=DEFAULT_CLIP, help="video whose last chunk is checked")
    parser.add_argument("--model-dir", type=Path, default=Path(tempfile.gettempdir()) / "vigil-bench-answer")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tz = ZoneInfo("UTC")

    t = time.perf_counter()
    vlm = load_vlm(str(build_checkpoint(args.model_dir)), device="cpu", dtype=args.dtype)
    text = vlm.model.config.text_config
    print(
        f"model ready in {time.perf_counter() - t:.1f} s: LLaVA-OV-0.5B config, random weights, {args.dtype}, "
        f"LLM hidden {text.hidden_size}, {text.num_hidden_layers} layers, vocab {text.vocab_size}"
    )
    footage = load_footage(args.clip, vlm.hidden_size)
    compressed = compress_footage(footage, CompressorConfig())
    last = typical_chunk(compressed)
    if last + 1 < args.chunks:
        parser.error(f"--chunks {args.chunks}: the typical chunk is chunk {last} of the minute")
    chunks = compressed[last + 1 - args.chunks : last + 1]
    context = context_of(chunks, tz)
    visual = sum(c.n_tokens for c in chunks)
    prefix = split_prompt(vlm, context)
    prefix_tokens = int(prefix.embeds.shape[1])
    suffix_tokens = [len(vlm.tokenize(QUESTION_SEPARATOR + q + prefix.tail)) for q in QUESTIONS]
    before = " with the one before" if len(chunks) > 1 else ""
    print(
        f"{args.clip.name}: chunk {last} of the last minute (the typical one){before}, "
        f"{visual} visual tokens (of {sum(c.n_input for c in chunks)}); "
        f"shared prefix {prefix_tokens} tokens (instruction {INSTRUCTION!r}); per question "
        f"{min(suffix_tokens)}-{max(suffix_tokens)} tokens; torch threads {args.threads}, max_batch {args.max_batch}"
    )

    cases = [(n, reuse) for reuse in (False, True) for n in WATCH_COUNTS]

    def check(n: int, reuse: bool) -> list[float]:
        return yes_probabilities(vlm, context, QUESTIONS[:n], reuse_prefix=reuse, max_batch=args.max_batch)

    check(1, False)  # warm-up: allocator, kernels
    check(4, True)
    times: dict[tuple[int, bool], list[float]] = {case: [] for case in cases}
    scores: dict[tuple[int, bool], list[float]] = {}
    for repeat in range(args.repeats):
        for case in cases:
            started = time.perf_counter()
            scores[case] = check(*case)
            times[case].append(time.perf_counter() - started)
        print(f"repeat {repeat + 1}/{args.repeats} done", file=sys.stderr, flush=True)
    agree = max(abs(a - b) for a, b in zip(scores[(64, True)], scores[(64, False)], strict=True))

    one = statistics.median(times[(1, False)])
    rows = []
    print(f"\none watch checked alone (one full prefill): {one * 1000:.0f} ms (median of {args.repeats})")
    print(f"{'watches':>8}{'reuse':>7}{'median s':>10}{'x one watch':>13}{'per watch ms':>14}{'target':>8}")
    for n, reuse in cases:
        median = statistics.median(times[(n, reuse)])
        ratio = median / one
        target = TARGETS.get(n) if reuse else None
        rows.append(
            {
                "watches": n,
                "reuse_prefix": reuse,
                "median_s": median,
                "times_s": times[(n, reuse)],
                "ratio_to_one_watch": ratio,
                "target_ratio": target,
                "target_met": None if target is None else ratio <= target,
            }
        )
        mark = "" if target is None else f"<={target:g} {'ok' if ratio <= target else 'MISSED'}"
        print(f"{n:>8}{'yes' if reuse else 'no':>7}{median:>10.2f}{ratio:>13.2f}{median / n * 1000:>14.0f}  {mark}")
    print(f"max |P(yes) with reuse - without| over the 64 watches: {agree:.2e}")
    if args.json:
        result = {
            "command": " ".join(["python -m bench.watches", *sys.argv[1:]]),
            "model": {
                "config": "llava-onevision-qwen2-0.5b-ov-hf (tests/data/real-configs)",
                "llm_layers": text.num_hidden_layers,
                "hidden": text.hidden_size,
                "vocab": text.vocab_size,
                "weights": "random",
                "dtype": args.dtype,
            },
            "machine": {"processor": platform.processor() or platform.machine(), "torch_threads": args.threads},
            "clip": args.clip.name,
            "chunk_index": last,
            "chunks": len(chunks),
            "visual_tokens": visual,
            "prefix_tokens": prefix_tokens,
            "suffix_tokens": {"min": min(suffix_tokens), "max": max(suffix_tokens)},
            "max_batch": args.max_batch,
            "repeats": args.repeats,
            "one_watch_alone_s": one,
            "cases": rows,
            "max_score_difference": agree,
        }
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
