"""BatchEncoder: concurrent callers share batches; results and errors go back to the right caller."""

from __future__ import annotations

import asyncio
import copy

import numpy as np
import pytest
import torch

from tests.plugins.models import clip_frames
from vlm.embedder import Embedder
from vlm.encoding import BatchEncoder, EncoderClosedError
from vlm.preprocess import FrameError

# Long enough that callers started together by gather always land in one batch on a busy CI box.
WAIT_MS = 500.0


@pytest.fixture(scope="module")
def frames() -> np.ndarray:
    return clip_frames(6, step=10)


async def test_concurrent_callers_share_one_batch_and_get_their_own_results(tiny_vlm, tiny_embedder, frames):
    # Three cameras with different frame sizes, two frames each.
    requests = [frames[0:2], frames[2:4, :240, :320], frames[4:6, 100:, 50:]]
    async with BatchEncoder(tiny_vlm, tiny_embedder, max_batch_frames=8, max_wait_ms=WAIT_MS) as encoder:
        results = await asyncio.gather(*(encoder.encode(r) for r in requests))
        assert encoder.stats.batches == 1
        assert encoder.stats.requests == 3
        assert encoder.stats.frames == 6
        assert encoder.stats.largest_batch_frames == 6
    for request, result in zip(requests, results, strict=True):
        alone = tiny_vlm.encode_frames(request)
        assert result.visual.tokens.shape == alone.tokens.shape
        assert result.visual.grid == alone.grid
        torch.testing.assert_close(result.visual.tokens, alone.tokens, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(result.visual.global_feats, alone.global_feats, atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(result.embeddings, tiny_embedder.embed_images(request), atol=1e-5)


async def test_batches_never_exceed_max_batch_frames(tiny_vlm, tiny_embedder, frames):
    requests = [frames[0:3], frames[3:6], frames[0:1]]
    async with BatchEncoder(tiny_vlm, tiny_embedder, max_batch_frames=4, max_wait_ms=WAIT_MS) as encoder:
        results = await asyncio.gather(*(encoder.encode(r) for r in requests))
        # 3 + 3 > 4, so the second request starts a new batch, which the 1-frame request then joins.
        assert encoder.stats.batches == 2
        assert encoder.stats.largest_batch_frames == 4
    assert [r.visual.tokens.shape[0] for r in results] == [3, 3, 1]


async def test_bad_input_fails_only_its_caller(tiny_vlm, tiny_embedder, frames):
    bad = frames[0:2].astype(np.float32)
    async with BatchEncoder(tiny_vlm, tiny_embedder, max_batch_frames=8, max_wait_ms=WAIT_MS) as encoder:
        results = await asyncio.gather(
            encoder.encode(frames[0:2]), encoder.encode(bad), encoder.encode(frames[2:3]), return_exceptions=True
        )
        assert encoder.stats.batches == 1
        assert encoder.stats.failed_requests == 1
        # The encoder goes on serving after a failure.
        again = await encoder.encode(frames[3:4])
    assert isinstance(results[1], FrameError)
    assert "uint8" in str(results[1])
    assert results[0].embeddings.shape == (2, tiny_embedder.dim)
    assert results[2].embeddings.shape == (1, tiny_embedder.dim)
    assert again.visual.tokens.shape[0] == 1


async def test_shutdown_serves_queued_requests_then_refuses(tiny_vlm, tiny_embedder, frames):
    async with BatchEncoder(tiny_vlm, tiny_embedder, max_batch_frames=1, max_wait_ms=0) as encoder:
        tasks = [asyncio.create_task(encoder.encode(frames[i : i + 1])) for i in range(4)]
        await asyncio.sleep(0)  # every request is queued before the encoder is asked to stop
    results = [task.result() for task in tasks]  # nothing was lost by stopping
    assert [r.visual.tokens.shape[0] for r in results] == [1, 1, 1, 1]
    assert encoder.stats.batches == 4
    with pytest.raises(EncoderClosedError):
        await encoder.encode(frames[0:1])


async def test_a_model_failure_fails_only_the_callers_of_that_batch(tiny_vlm, tiny_embedder, frames):
    # A real SigLIP whose weights were never materialised (meta device): every forward fails.
    unloaded = Embedder("unloaded", copy.deepcopy(tiny_embedder.model).to("meta"), tiny_embedder.tokenizer, {})
    async with (
        BatchEncoder(tiny_vlm, unloaded, max_batch_frames=8, max_wait_ms=WAIT_MS) as broken,
        BatchEncoder(tiny_vlm, tiny_embedder, max_batch_frames=8, max_wait_ms=WAIT_MS) as healthy,
    ):
        results = await asyncio.gather(
            broken.encode(frames[0:1]),
            broken.encode(frames[1:2]),
            healthy.encode(frames[2:3]),
            return_exceptions=True,
        )
        assert broken.stats.batches == 1
        assert broken.stats.failed_requests == 2
        # The broken encoder still answers (with the error) instead of hanging or dying.
        with pytest.raises(RuntimeError):
            await broken.encode(frames[3:4])
    assert isinstance(results[0], RuntimeError)
    assert isinstance(results[1], RuntimeError)
    assert results[2].embeddings.shape == (1, tiny_embedder.dim)
