"""Frames → pixel tensors for each model, without HF processors (they need torchvision here).

Each model's saved image-processor config (``preprocessor_config.json``) gives the input size,
rescale factor and the normalisation mean/std; these functions apply them to a whole batch of
frames with torch. Resizing squashes each frame to the model's fixed input size (as LLaVA-OneVision's
video processor does), so frames of any size from any camera can share one batch.

Qwen2.5-VL takes its pixels as flattened patches (``pixel_values`` [P, C·tps·p·p]) plus a grid
``image_grid_thw`` [T, 3]; ``qwen_patchify`` reproduces the layout of ``Qwen2VLImageProcessor``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional

RGB_CHANNELS = 3
DEFAULT_RESCALE = 1.0 / 255.0


class FrameError(ValueError):
    """Frames are not a [T, H, W, 3] uint8 RGB array."""


@dataclass(frozen=True, slots=True)
class PixelSpec:
    """How one model wants its pixels: input size and normalisation."""

    height: int
    width: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    rescale_factor: float = DEFAULT_RESCALE

    @classmethod
    def from_config(cls, config: dict[str, Any], height: int, width: int) -> PixelSpec:
        """Read mean/std/rescale from an image-processor config; the size is the caller's choice."""
        mean = tuple(float(v) for v in config.get("image_mean", (0.5, 0.5, 0.5)))
        std = tuple(float(v) for v in config.get("image_std", (0.5, 0.5, 0.5)))
        if len(mean) != RGB_CHANNELS or len(std) != RGB_CHANNELS:
            raise ValueError(f"image_mean/image_std must have 3 values, got {mean} and {std}")
        return cls(
            height=height,
            width=width,
            mean=(mean[0], mean[1], mean[2]),
            std=(std[0], std[1], std[2]),
            rescale_factor=float(config.get("rescale_factor", DEFAULT_RESCALE)),
        )


def read_preprocessor_config(path: str) -> dict[str, Any]:
    """Load ``preprocessor_config.json`` (a local path already resolved from a hub id or dir)."""
    with open(path, encoding="utf-8") as handle:
        config = json.load(handle)
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return config


def check_frames(frames: np.ndarray) -> None:
    """Raise FrameError unless ``frames`` is [T, H, W, 3] uint8 with H, W > 0."""
    if not isinstance(frames, np.ndarray):
        raise FrameError(f"frames must be a numpy array, got {type(frames).__name__}")
    if frames.ndim != 4 or frames.shape[-1] != RGB_CHANNELS:
        raise FrameError(f"frames must have shape [T, H, W, 3], got {list(frames.shape)}")
    if frames.dtype != np.uint8:
        raise FrameError(f"frames must be uint8 RGB, got dtype {frames.dtype}")
    if frames.shape[1] == 0 or frames.shape[2] == 0:
        raise FrameError(f"frames must have a non-empty image, got {list(frames.shape)}")


def to_pixels(frames: np.ndarray, spec: PixelSpec) -> Tensor:
    """Resize, rescale and normalise frames.

    frames: [T, H, W, 3] uint8 RGB → returns [T, 3, spec.height, spec.width] float32.
    """
    check_frames(frames)
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()  # [T, 3, H, W] 0..255
    if x.shape[-2:] != (spec.height, spec.width) and x.shape[0] > 0:
        # Antialiased bicubic matches PIL's BICUBIC resample used by the HF processors closely.
        x = functional.interpolate(
            x, size=(spec.height, spec.width), mode="bicubic", antialias=True, align_corners=False
        )
        x = x.clamp_(0.0, 255.0)
    mean = torch.tensor(spec.mean).view(1, RGB_CHANNELS, 1, 1)
    std = torch.tensor(spec.std).view(1, RGB_CHANNELS, 1, 1)
    return (x * spec.rescale_factor - mean) / std  # [T, 3, h, w]


def qwen_frame_side(min_pixels: int, max_pixels: int, factor: int, target_side: int) -> int:
    """Side of the square each frame is resized to for Qwen2.5-VL.

    The largest multiple of ``factor`` (patch · merge) not above ``target_side`` whose area lies
    within the processor's [min_pixels, max_pixels] (Qwen's ``smart_resize`` bounds).
    """
    side = max(factor, (min(target_side, math.isqrt(max_pixels)) // factor) * factor)
    while side * side < min_pixels:
        side += factor
    return side


def qwen_patchify(
    pixels: Tensor, patch_size: int, merge_size: int, temporal_patch_size: int
) -> tuple[Tensor, Tensor]:
    """Flatten frames into Qwen2-VL's patch layout, each frame as an image.

    pixels: [T, C, H, W] normalised, H and W multiples of patch_size · merge_size.
    Returns (flat [T·gh·gw, C·tps·p·p], grid_thw [T, 3] = (1, gh, gw) per frame). Each frame is
    repeated over the temporal patch (what the processor does for a still image); patches are
    ordered so that every merge_size² consecutive ones form one merged token, tokens raster-ordered.
    """
    t, c, h, w = pixels.shape
    unit = patch_size * merge_size
    if h % unit or w % unit:
        raise ValueError(
            f"frame size {h}x{w} must be a multiple of {unit} (patch {patch_size} x merge {merge_size})"
        )
    gh, gw = h // patch_size, w // patch_size
    x = pixels.reshape(
        t, c, gh // merge_size, merge_size, patch_size, gw // merge_size, merge_size, patch_size
    )
    x = x.permute(0, 2, 5, 3, 6, 1, 4, 7)  # [T, gh/m, gw/m, m, m, C, p, p]
    x = x.unsqueeze(6).expand(*x.shape[:6], temporal_patch_size, patch_size, patch_size)  # [.., C, tps, p, p]
    flat = x.reshape(t * gh * gw, c * temporal_patch_size * patch_size * patch_size)
    grid = torch.tensor([[1, gh, gw]] * t, dtype=torch.long).reshape(t, 3)
    return flat, grid
