"""The real LLaVA-OneVision-0.5B shape (random weights, 2 + 2 layers) with the real Qwen tokenizer.

What the tiny models cannot catch: tied embeddings loaded next to the embedder, the tokenizer's
own chat template next to the processor's, characters split across byte-level tokens, and the
whole path (``vigil import`` → Redis → ``vigil serve`` → an answer over MQTT) on that checkpoint.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
import torch
import yaml

from streamer.importer import cli_import
from streamer.settings import Settings
from tests.plugins.models import clip_frames
from tests.plugins.real_shape import SPECIAL_TOKENS, RealShape
from tests.test_e2e import ask_v5, running_daemon
from vlm.embedder import load_embedder
from vlm.models import VisionLanguageModel, load_vlm, text_deltas
from vlm.tiny import TinyModels
from vlm.types import TextPart, VisualPart

CLIP = Path(__file__).parent / "data" / "car-detection.mp4"
REAL_VOCAB = 152000
REAL_HIDDEN = 896
ONLINE_TIMEOUT_S = 180.0
REAL_GRID = (14, 14)  # 384 px / patch 14 = 27 patches, pooled 2x2 with ceil: 14


def frame_part(vlm: VisionLanguageModel) -> VisualPart:
    encoded = vlm.encode_frames(clip_frames(1))
    n = encoded.tokens.shape[1]
    cols = encoded.grid[1]
    return VisualPart(
        tokens=encoded.tokens[0],
        frame=torch.zeros(n, dtype=torch.int32),
        row=(torch.arange(n) // cols).to(torch.int16),
        col=(torch.arange(n) % cols).to(torch.int16),
    )


def test_real_shape_loads_tied_next_to_the_embedder(real_shape_models: RealShape, tiny_models: TinyModels):
    start = threading.Barrier(2)

    def vlm() -> VisionLanguageModel:
        start.wait()
        return load_vlm(str(real_shape_models.processor), device="cpu", dtype="bfloat16")

    def embedder() -> object:
        start.wait()
        return load_embedder(str(tiny_models.embedder), device="cpu")

    with ThreadPoolExecutor(max_workers=2) as pool:
        loading = pool.submit(vlm), pool.submit(embedder)
        loaded = loading[0].result()
        loading[1].result()
    model = loaded.model
    assert model.get_input_embeddings().weight.shape == (REAL_VOCAB, REAL_HIDDEN)
    head, embed = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    assert head.data_ptr() == embed.data_ptr(), "lm_head is not tied to embed_tokens"
    assert not [name for name, p in model.named_parameters() if p.is_meta]
    assert loaded.grid == REAL_GRID
    assert loaded.hidden_size == REAL_HIDDEN
    for token, index in SPECIAL_TOKENS.items():
        assert loaded.tokenizer.convert_tokens_to_ids(token) == index


@pytest.fixture(scope="module")
def frame(real_shape_vlm: VisionLanguageModel) -> VisualPart:
    return frame_part(real_shape_vlm)


@pytest.mark.parametrize("variant", ["processor", "tokenizer"])
def test_either_chat_template_gives_a_prompt_and_an_answer(
    variant: str, real_shape_models: RealShape, real_shape_vlm: VisionLanguageModel, frame: VisualPart
):
    if variant == "processor":  # the hub's layout: the processor's template wins over the tokenizer's own
        vlm = real_shape_vlm
        saved = json.loads((real_shape_models.processor / "chat_template.json").read_text(encoding="utf-8"))
        assert vlm.tokenizer.chat_template == saved["chat_template"]
    else:
        vlm = load_vlm(str(real_shape_models.tokenizer), device="cpu", dtype="bfloat16")
    part = frame
    parts = [TextPart("[lot] 10:00-10:08:\n"), part, TextPart("\nQuestion: is a car there?")]
    ids = vlm.prompt_ids(parts)
    text = vlm.tokenizer.decode(ids)
    assert int((ids == SPECIAL_TOKENS["<video>"]).sum()) == 1
    assert "is a car there?" in text
    assert text.count("<|im_start|>") == 3  # system, user, the assistant cue
    deltas = list(vlm.generate_stream(parts, max_new_tokens=2))
    assert all(isinstance(d, str) for d in deltas)


def test_a_stream_stopped_inside_a_character_ends_on_a_whole_character(real_shape_vlm: VisionLanguageModel):
    tokenizer = real_shape_vlm.tokenizer
    text = "A parrot 🦜 at the gate, then 世界."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    # The real byte-level BPE spends three tokens on the parrot's four UTF-8 bytes.
    cuts = [k for k in range(1, len(ids)) if tokenizer.decode(ids[:k]).endswith("\ufffd")]
    assert cuts, "no token boundary inside a character"
    for k in cuts:  # generation stopped (max_new_tokens, deadline) after k tokens
        deltas = list(text_deltas(tokenizer, ids[:k]))
        assert not any("\ufffd" in d for d in deltas)
        assert "".join(deltas) == tokenizer.decode(ids[:k]).rstrip("\ufffd")
    assert "".join(text_deltas(tokenizer, ids)) == text


@pytest.mark.slow
async def test_import_then_serve_answers_over_mqtt_on_the_real_shape(
    prefix: str,
    tmp_path: Path,
    real_shape_models: RealShape,
    tiny_models: TinyModels,
    broker: tuple[str, int],
    redis_url: str,
) -> None:
    """``vigil import`` of a real clip into Redis, then ``vigil serve`` answers a question about it."""
    config: dict[str, Any] = {
        "data_dir": str(tmp_path / "state"),
        "timezone": "UTC",
        "mqtt": {"host": broker[0], "port": broker[1], "topic_prefix": prefix, "client_id": prefix},
        "redis": {"url": redis_url, "key_prefix": prefix},
        # The default device and dtype (cpu, float32), as a first `vigil serve` would load it.
        "models": {
            "vlm": str(real_shape_models.processor),
            "embedder": str(tiny_models.embedder),
            "max_new_tokens": 4,
        },
        "retrieval": {"top_k": 2},
        # Few frames: even two layers of the so400m tower at 384 px cost a while on a CPU.
        "cameras": {"lot": {"url": str(CLIP), "sample_fps": 0.2, "chunk_s": 10.0}},
    }
    config_path = tmp_path / "vigil.yaml"
    config_path.write_text(yaml.safe_dump(config))
    args = argparse.Namespace(
        paths=[str(CLIP)], camera="lot", start="2026-05-01T14:30:00Z", config=str(config_path), no_progress=True
    )
    assert await asyncio.to_thread(cli_import, args) == 0

    serve = {**config, "cameras": {}}  # serve only answers; the memory came from the import
    settings = Settings.model_validate(serve)
    async with running_daemon(settings):
        [reply] = await ask_when_online(broker, prefix, {"question": "Was there a car in the lot?"})
        assert "error" not in reply, reply
        assert isinstance(reply["answer"], str)
        assert reply["citations"], reply
        assert {c["camera"] for c in reply["citations"]} == {"lot"}
        assert all(c["start"].startswith("2026-05-01T14:3") for c in reply["citations"])
        parts = await ask_v5(broker, prefix, {"question": "Describe the lot.", "stream": True})
        assert parts[-1]["done"] is True
        assert "".join(p["delta"] for p in parts[:-1]) == parts[-1]["answer"]


async def ask_when_online(broker: tuple[str, int], prefix: str, request: dict[str, Any]) -> list[dict[str, Any]]:
    """Ask once the daemon announces itself with a retained ``online`` (it loads the models first)."""
    async with aiomqtt.Client(broker[0], broker[1], identifier=f"probe-{uuid.uuid4().hex[:6]}") as client:
        await client.subscribe(f"{prefix}/available", qos=1)
        async with asyncio.timeout(ONLINE_TIMEOUT_S):
            async for message in client.messages:
                if message.payload == b"online":
                    break
    return await ask_v5(broker, prefix, request)
