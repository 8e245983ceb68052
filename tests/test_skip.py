"""Skip-unchanged check on real footage: empty stretches skip the encoder, motion never does."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from memory.skip import SkipConfig, change_stats, frame_changed, plan_skips, thumbnail
from tests.test_compress import sample_frames

CHUNK = 8
# Empty stretches of one-by-one-person-detection.mp4 (tests/data/SOURCES.md), trimmed to the
# seconds in which nobody is in view at 1 fps: the person leaving at ~44-45 s and ~68-70 s is motion.
EMPTY_S = ((0.0, 6.0), (46.0, 51.0), (71.0, 75.0), (138.0, 140.0))
# A frame whose thumbnail differs from the previous sampled frame in this many cells shows motion.
MOTION_CELLS = 3


def plan_stream(thumbs: list[np.ndarray]) -> tuple[set[int], list[tuple[int, int]]]:
    """Encoded frame indices and (first, last) spans of output frames over the whole stream."""
    encoded: set[int] = set()
    covered: list[tuple[int, int]] = []
    reference = None
    for i in range(0, len(thumbs), CHUNK):
        plan = plan_skips(thumbs[i : i + CHUNK], reference)
        encoded |= {i + k for k in plan.encode}
        covered += [(i + a, i + b) for a, b in zip(plan.first, plan.last, strict=True)]
        assert sum(plan.weight) == len(thumbs[i : i + CHUNK])
        assert plan.reuse_first == (0 not in plan.encode)
        reference = plan.reference
    return encoded, covered


def test_empty_stretches_skip_the_encoder_and_motion_is_encoded():
    images, times = sample_frames("one-by-one-person-detection.mp4")
    thumbs = [thumbnail(image) for image in images]
    encoded, covered = plan_stream(thumbs)
    # Output frames tile the stream in order.
    assert [a for a, _ in covered] == sorted(a for a, _ in covered)
    assert all(b + 1 == a for (_, b), (a, _) in itertools.pairwise(covered))
    empty = [i for i, t in enumerate(times) if any(a <= t < b for a, b in EMPTY_S)]
    saved = 1 - len(encoded.intersection(empty)) / len(empty)
    assert saved >= 0.70, f"only {saved:.0%} of encoder calls saved over the empty stretches"
    cells = thumbs[0].size
    moving = [
        i
        for i in range(1, len(thumbs))
        if change_stats(thumbs[i - 1], thumbs[i]).changed_fraction * cells >= MOTION_CELLS
    ]
    assert len(moving) > 40  # the clip has six people walking in and out
    missed = [float(times[i]) for i in moving if i not in encoded]
    assert not missed, f"frames with motion were skipped at {missed} s"


def test_slow_drift_is_caught_against_the_last_encoded_frame():
    images, _ = sample_frames("car-detection.mp4", stop_s=1.0)
    base = images[0].astype(np.int16)
    config = SkipConfig()
    step = config.cell_diff_threshold / 4  # each frame brightens a region by a quarter of the threshold
    frames = []
    for k in range(8):
        frame = base.copy()
        frame[100:200, 200:400] += round(step * k)
        frames.append(np.clip(frame, 0, 255).astype(np.uint8))
    thumbs = [thumbnail(f, config) for f in frames]
    # Against the previous frame nothing ever changes ...
    assert not any(frame_changed(a, b, config) for a, b in itertools.pairwise(thumbs))
    # ... against the last encoded frame, the drift is encoded every few frames.
    plan = plan_skips(thumbs, None, config)
    assert plan.encode[0] == 0
    assert 2 <= len(plan.encode) <= 4
    assert plan.encode[1] in (4, 5)


def test_unchanged_chunk_reuses_the_last_encoding():
    images, _ = sample_frames("one-by-one-person-detection.mp4", stop_s=5.0)
    thumbs = [thumbnail(image) for image in images]
    first = plan_skips(thumbs, None)
    assert first.encode == (0,)
    assert first.weight == (len(thumbs),)
    again = plan_skips(thumbs, first.reference)
    assert again.encode == ()
    assert again.reuse_first
    assert again.weight == (len(thumbs),)


def test_bad_input_is_refused_with_a_clear_error():
    with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
        thumbnail(np.zeros((10, 10), dtype=np.uint8))
    with pytest.raises(ValueError, match="smaller than one"):
        thumbnail(np.zeros((8, 8, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="shapes differ"):
        change_stats(np.zeros((2, 3), np.float32), np.zeros((3, 2), np.float32))
    with pytest.raises(ValueError, match="at least one frame"):
        plan_skips([], None)
    # A resolution change is not an error: the frame is simply encoded.
    assert frame_changed(np.zeros((2, 3), np.float32), np.zeros((3, 2), np.float32))
