"""Cheap pixel-level check that lets unchanged frames skip the vision encoder (pure, numpy).

A static camera mostly shows the same picture. Before a frame goes to the (expensive) encoder it is
reduced to a grayscale thumbnail of block means (one value per `cell_px` x `cell_px` cell) and
compared with the thumbnail of the last ENCODED frame, not the previous frame, so slow drift (a
shadow moving, someone creeping) accumulates until it counts as a change. A frame is "changed" when
enough cells moved by more than `cell_diff_threshold` grey levels; block means average out sensor
noise and codec shimmer, which is why a per-cell threshold works where a per-pixel one would not.

An unchanged frame is not encoded: it extends the time span of the last encoded frame, whose
tokens then stand for it too (the frame's `weight` counts how many sampled frames it covers).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# ITU-R BT.601 luma weights: the usual RGB -> grey conversion, cheap and good enough for change.
_LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float32)


@dataclass(frozen=True, slots=True)
class SkipConfig:
    """Thresholds of the change check, calibrated on tests/data clips (docs/compression.md).

    Attributes:
        cell_px: edge of a thumbnail cell in pixels. 16 px matches the encoder's patch scale on
            768x432 footage (a distant person covers about 10 cells), and averaging 256 pixels
            removes H.264 noise.
        cell_diff_threshold: grey levels (0-255) a cell mean must move to count as changed. Codec
            and sensor noise moves cell means by <= 7 levels on the empty stretches of the clips;
            a person moving moves them by tens.
        min_changed_fraction: share of cells that must change (strictly more) for the frame to
            count as changed. 0.1% of a 48x27 thumbnail means at least 2 cells: one cell alone is
            often a flicker, while a person standing at the table still moves 2+ cells per second.
    """

    cell_px: int = 16
    cell_diff_threshold: float = 12.0
    min_changed_fraction: float = 0.001

    def __post_init__(self) -> None:
        if self.cell_px <= 0:
            raise ValueError(f"cell_px must be > 0, got {self.cell_px}")
        if not 0 < self.cell_diff_threshold < 255:
            raise ValueError(f"cell_diff_threshold must be in (0, 255), got {self.cell_diff_threshold}")
        if not 0 <= self.min_changed_fraction < 1:
            raise ValueError(f"min_changed_fraction must be in [0, 1), got {self.min_changed_fraction}")


@dataclass(frozen=True, slots=True)
class ChangeStats:
    """How much a frame differs from the reference thumbnail."""

    mean_abs_diff: float  # grey levels, averaged over cells
    changed_fraction: float  # share of cells whose mean moved by more than the threshold


@dataclass(frozen=True, slots=True)
class SkipPlan:
    """Which sampled frames of a chunk go to the encoder and what each output frame stands for.

    Output frames are, in order: the cached tokens of the last encoded frame if `reuse_first`
    (the chunk starts unchanged), then the frames listed in `encode`. For output frame k,
    `first[k]..last[k]` are the sampled frames it stands for and `weight[k] = last - first + 1`.
    """

    encode: tuple[int, ...]
    reuse_first: bool
    first: tuple[int, ...]
    last: tuple[int, ...]
    reference: np.ndarray  # [h, w] float32 thumbnail of the last encoded frame after this chunk

    @property
    def weight(self) -> tuple[int, ...]:
        return tuple(b - a + 1 for a, b in zip(self.first, self.last, strict=True))


def thumbnail(image: np.ndarray, config: SkipConfig = SkipConfig()) -> np.ndarray:
    """Grayscale block-mean thumbnail.

    Args:
        image: [H, W, 3] uint8 RGB.

    Returns:
        [H // cell_px, W // cell_px] float32 grey levels (edge pixels that do not fill a cell are ignored).
    """
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be [H, W, 3] RGB, got shape {image.shape}")
    cell = config.cell_px
    h, w = image.shape[0] // cell, image.shape[1] // cell
    if h == 0 or w == 0:
        raise ValueError(f"image {image.shape[1]}x{image.shape[0]} is smaller than one {cell}px cell")
    grey = image[: h * cell, : w * cell].astype(np.float32) @ _LUMA_WEIGHTS  # [h*cell, w*cell]
    return grey.reshape(h, cell, w, cell).mean(axis=(1, 3))  # [h, w]


def change_stats(
    reference: np.ndarray, current: np.ndarray, config: SkipConfig = SkipConfig()
) -> ChangeStats:
    """Compare two thumbnails ([h, w] float32, from `thumbnail`)."""
    if reference.shape != current.shape:
        raise ValueError(f"thumbnail shapes differ: reference {reference.shape}, current {current.shape}")
    diff = np.abs(current - reference)  # [h, w]
    return ChangeStats(
        mean_abs_diff=float(diff.mean()),
        changed_fraction=float((diff > config.cell_diff_threshold).mean()),
    )


def frame_changed(
    reference: np.ndarray | None, current: np.ndarray, config: SkipConfig = SkipConfig()
) -> bool:
    """True when `current` must be encoded: no reference yet, or enough cells changed since it."""
    if reference is None or reference.shape != current.shape:
        # A new stream or a resolution change: nothing to compare with, so encode.
        return True
    stats = change_stats(reference, current, config)
    return stats.changed_fraction > config.min_changed_fraction


def plan_skips(
    thumbs: list[np.ndarray],
    reference: np.ndarray | None,
    config: SkipConfig = SkipConfig(),
) -> SkipPlan:
    """Decide which frames of a chunk to encode.

    Args:
        thumbs: per sampled frame, its [h, w] thumbnail, in time order (at least one).
        reference: thumbnail of the last frame encoded before this chunk (None at stream start or
            when the caller has no cached tokens for it, which forces frame 0 to be encoded).

    Returns:
        A SkipPlan; its `reference` is the thumbnail to pass with the next chunk.
    """
    if not thumbs:
        raise ValueError("plan_skips needs at least one frame")
    encode: list[int] = []
    first: list[int] = []
    last: list[int] = []
    reuse_first = False
    for i, thumb in enumerate(thumbs):
        if frame_changed(reference, thumb, config):
            encode.append(i)
            first.append(i)
            last.append(i)
            reference = thumb
        elif not first:
            # The chunk starts unchanged: its first output frame reuses the cached last encoding.
            reuse_first = True
            first.append(i)
            last.append(i)
        else:
            last[-1] = i
    assert reference is not None  # frame 0 either changed (and set it) or compared against it
    return SkipPlan(
        encode=tuple(encode),
        reuse_first=reuse_first,
        first=tuple(first),
        last=tuple(last),
        reference=reference,
    )
