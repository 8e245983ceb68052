"""Per-frame cost of the vision path and the retrieval embedder on this machine.

Times the public API (``encode_frames``, ``embed_images``, ``embed_text``) on 8 real frames of
432x768 from tests/data/car-detection.mp4: the tiny test models, and a randomly initialised model
with SigLIP-base-patch16-224's shapes (SiglipConfig's defaults) saved and loaded through
``load_embedder`` like a real checkpoint, in fp32 and bf16. Median of N runs after a warm-up.

    HF_HUB_OFFLINE=1 .venv/bin/python -m bench.models [--threads 1] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import SiglipConfig, SiglipModel
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from tests.plugins.models import clip_frames
from vlm.embedder import load_embedder
from vlm.models import load_vlm
from vlm.tiny import CHAT_TEMPLATE, build_tokenizer, make_tiny

FRAMES = 8
BASE_SIDE = 224  # siglip-base-patch16-224 input size
QUESTION = "was a red car in the driveway this morning?"


def median_s(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    frames = clip_frames(FRAMES, step=5)  # [8, 432, 768, 3]
    rows: list[tuple[str, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tiny = make_tiny(root / "tiny")
        for label, path in (("tiny LLaVA-OV", tiny.vlm), ("tiny Qwen2.5-VL", tiny.qwen2_5_vl)):
            vlm = load_vlm(str(path), device="cpu")
            rows.append(
                (
                    f"{label} encode_frames, ms/frame",
                    median_s(lambda vlm=vlm: vlm.encode_frames(frames), args.repeats) / FRAMES,
                )
            )
            rows.append(
                (
                    f"{label} preprocess only, ms/frame",
                    median_s(lambda vlm=vlm: vlm.preprocess(frames), args.repeats) / FRAMES,
                )
            )
        tiny_embedder = load_embedder(str(tiny.embedder), device="cpu")
        rows.append(
            (
                "tiny SigLIP embed_images, ms/frame",
                median_s(lambda: tiny_embedder.embed_images(frames), args.repeats) / FRAMES,
            )
        )
        base = root / "siglip-base"
        torch.manual_seed(0)
        SiglipModel(SiglipConfig()).save_pretrained(base)
        build_tokenizer(CHAT_TEMPLATE).save_pretrained(base)
        SiglipImageProcessorPil(size={"height": BASE_SIDE, "width": BASE_SIDE}).save_pretrained(base)
        for dtype in ("float32", "bfloat16"):
            embedder = load_embedder(str(base), device="cpu", dtype=dtype)
            rows.append(
                (
                    f"SigLIP-base embed_images {dtype}, ms/frame",
                    median_s(lambda embedder=embedder: embedder.embed_images(frames), args.repeats) / FRAMES,
                )
            )
            rows.append(
                (
                    f"SigLIP-base embed_text {dtype}, ms/question",
                    median_s(lambda embedder=embedder: embedder.embed_text([QUESTION]), args.repeats),
                )
            )
    print(f"torch threads: {args.threads}, {FRAMES} frames of {frames.shape[2]}x{frames.shape[1]} per call")
    for label, seconds in rows:
        print(f"{label:50s} {seconds * 1000:9.1f}")


if __name__ == "__main__":
    main()
