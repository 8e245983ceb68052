"""Tiny model fixtures: real architectures, random weights, built offline once per session.

``make_tiny`` writes the models with ``save_pretrained``; the fixtures load them back through
the same ``load_vlm`` / ``load_embedder`` path that loads real checkpoints.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import av
import numpy as np
import pytest

if TYPE_CHECKING:  # torch and transformers load only when a test asks for a model
    from tests.plugins.real_shape import RealShape
    from vlm.embedder import Embedder
    from vlm.models import VisionLanguageModel
    from vlm.tiny import TinyModels

CLIP = Path(__file__).resolve().parent.parent / "data" / "car-detection.mp4"


def clip_frames(count: int, step: int = 15) -> np.ndarray:
    """[count, H, W, 3] uint8 RGB: every ``step``-th frame of tests/data/car-detection.mp4 (PyAV)."""
    frames = []
    with av.open(str(CLIP)) as container:
        for index, frame in enumerate(container.decode(video=0)):
            if index % step == 0:
                frames.append(frame.to_ndarray(format="rgb24"))
            if len(frames) == count:
                break
    return np.stack(frames)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> TinyModels:
    """Directories of the tiny LLaVA-OneVision, Qwen2.5-VL and SigLIP models."""
    from vlm.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture(scope="session")
def tiny_vlm(tiny_models: TinyModels) -> VisionLanguageModel:
    """The tiny LLaVA-OneVision, loaded on CPU in float32."""
    from vlm.models import load_vlm

    return load_vlm(str(tiny_models.vlm), device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def tiny_qwen(tiny_models: TinyModels) -> VisionLanguageModel:
    """The tiny Qwen2.5-VL, loaded on CPU in float32."""
    from vlm.models import load_vlm

    return load_vlm(str(tiny_models.qwen2_5_vl), device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def tiny_embedder(tiny_models: TinyModels) -> Embedder:
    """The tiny SigLIP embedder, loaded on CPU in float32."""
    from vlm.embedder import load_embedder

    return load_embedder(str(tiny_models.embedder), device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def real_shape_models(tmp_path_factory: pytest.TempPathFactory) -> RealShape:
    """Random-weight LLaVA-OneVision-0.5B of the real shape (2 + 2 layers), real Qwen tokenizer."""
    from tests.plugins.real_shape import build_real_shape

    return build_real_shape(tmp_path_factory.mktemp("real-shape"))


@pytest.fixture(scope="session")
def real_shape_vlm(real_shape_models: RealShape) -> VisionLanguageModel:
    """The real-shape checkpoint (processor template variant), loaded on CPU in bfloat16."""
    from vlm.models import load_vlm

    return load_vlm(str(real_shape_models.processor), device="cpu", dtype="bfloat16")
