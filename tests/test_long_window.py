"""Issue 10 end to end: a day of footage imported two weeks ago, compacted, then asked about whole.

The footage: one 16-s cut of a bundled clip, copied into Frigate's layout at every hour of a day
two weeks before today (``vigil import`` places each file by its path). ``vigil memory compact``
applies two small tiers (2 chunks to 1, twice), then a question about that day goes through the
real Retriever and Answerer with the tiny models, the way the daemon wires them (exact prompt
length with the model's tokenizer).
"""

from __future__ import annotations

import asyncio
import functools
import json
import shutil
import subprocess
import time
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
import redis.asyncio as aioredis
import yaml

from memory.index import VectorIndex
from memory.store import MemoryStore
from retrieval.answer import Answer, Answerer, Question, exact_prompt_length, text_token_counter
from retrieval.search import Retriever
from streamer.cli import main
from streamer.settings import load_settings

DATA = Path(__file__).parent / "data"
CAR = DATA / "car-detection.mp4"
HOUR_S = 3600.0
DAY_S = 24 * HOUR_S
SEGMENT_S = 16.0  # 4 chunks of 4 s an hour: two tiers of merge 2 leave one chunk an hour
# Small enough that the stored day does not fit (asserted below), large enough for a piece an hour.
MAX_PROMPT_TOKENS = 3000
DAY_START_S = (time.time() // DAY_S - 14) * DAY_S  # midnight UTC two weeks ago


@pytest.fixture(scope="module")
def frigate_day(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """RECORD_DIR/YYYY-MM-DD/HH/gate/00.00.mp4 for every hour of the day two weeks ago."""
    root = tmp_path_factory.mktemp("frigate")
    segment = root / "segment.mp4"
    subprocess.run(
        ["ffmpeg", "-v", "error", "-y", "-i", str(CAR), "-t", str(SEGMENT_S), "-an", "-c:v", "libx264",
         "-preset", "ultrafast", "-g", "5", "-pix_fmt", "yuv420p", "-map_metadata", "-1", str(segment)],
        check=True,
    )  # fmt: skip
    day = time.strftime("%Y-%m-%d", time.gmtime(DAY_START_S))
    for hour in range(24):
        folder = root / "record" / day / f"{hour:02d}" / "gate"
        folder.mkdir(parents=True)
        shutil.copy(segment, folder / "00.00.mp4")
    return root / "record" / day


def _config(tmp_path: Path, tiny_models, redis_url: str, prefix: str, first_file: Path) -> Path:
    config = tmp_path / "vigil.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "data_dir": str(tmp_path / "state"),
                "timezone": "UTC",
                "redis": {"url": redis_url, "key_prefix": prefix},
                "models": {
                    "vlm": str(tiny_models.vlm),
                    "embedder": str(tiny_models.embedder),
                    "device": "cpu",
                    "dtype": "float32",
                },
                # Every token the compressor and the tiers may keep, so that a stored day outgrows
                # the small budget below: the tiny model's 7x7 grid leaves about 4 tokens a chunk at
                # the default keep_ratio, and this footage is calm (about 45 a chunk at 1.0).
                "compression": {"keep_ratio": 1.0},
                "memory": {
                    "tiers": [
                        {"after": "1d", "merge": 2, "keep_ratio": 1.0},
                        {"after": "7d", "merge": 2, "keep_ratio": 1.0},
                    ]
                },
                "answer": {"max_prompt_tokens": MAX_PROMPT_TOKENS},
                "cameras": {"gate": {"url": str(first_file), "sample_fps": 1.0, "chunk_s": 4.0, "retention_days": 30}},
            }
        )
    )
    return config


def _hours(answer: Answer) -> set[int]:
    return {int((c.start_s - DAY_START_S) // HOUR_S) for c in answer.citations}


@pytest.mark.slow
def test_a_compacted_day_imported_two_weeks_ago_is_cited_hour_by_hour(
    frigate_day: Path, tmp_path: Path, tiny_models, tiny_vlm, tiny_embedder, redis_url: str, prefix: str, capsys
) -> None:
    config = _config(tmp_path, tiny_models, redis_url, prefix, frigate_day / "00" / "gate" / "00.00.mp4")
    assert main(["import", str(frigate_day), "--camera", "gate", "-c", str(config), "--no-progress"]) == 0
    assert main(["memory", "compact", "-c", str(config)]) == 0
    capsys.readouterr()
    assert main(["memory", "stats", "--json", "-c", str(config)]) == 0
    stats = json.loads(capsys.readouterr().out)["gate"]
    assert set(stats) == {"2", "total"}  # every hour consolidated twice, nothing left at full resolution
    assert stats["2"]["chunks"] == 24

    settings = load_settings(config)
    count = text_token_counter(tiny_vlm)
    planned_length = functools.partial(exact_prompt_length, tiny_vlm)

    async def ask() -> tuple[Answer, Answer, int]:
        client = aioredis.Redis.from_url(redis_url)
        try:
            store = MemoryStore(client, key_prefix=prefix)
            index = VectorIndex(tiny_embedder.dim)
            await index.catch_up(store)  # as the daemon does on start
            window = await store.chunks_in_range("gate", DAY_START_S, DAY_START_S + DAY_S)
            stored_tokens = sum(m.n_tokens for m in window)
            retriever = Retriever(tiny_embedder, store, index, top_k=6, recent_chunks=2, max_chunks=12)
            wired = {"tz": ZoneInfo("UTC"), "max_new_tokens": 4, "generation_timeout_s": 60.0}
            planned = Answerer(
                tiny_vlm,
                retriever,
                **wired,
                max_prompt_tokens=settings.answer.max_prompt_tokens,
                count_text=count,
                prompt_length=planned_length,
            )
            plain = Answerer(tiny_vlm, retriever, **wired, prompt_length=planned_length)
            day = {"after_s": DAY_START_S, "before_s": DAY_START_S + DAY_S}
            question = Question("What happened at the gate that day?", **day)
            try:
                return await planned.answer(question), await plain.answer(question), stored_tokens
            finally:
                planned.close()
                plain.close()
        finally:
            await client.aclose()

    answer, top_k_answer, stored_tokens = asyncio.run(ask())
    # The whole stored day, each chunk with its header line, does not fit the budget ...
    assert stored_tokens + 24 * count("[gate] 2026-01-01 00:00:00–00:00:16 UTC:\n\n") > MAX_PROMPT_TOKENS
    # ... so the long-window path planned it: within the budget, citing the day hour by hour.
    assert answer.planned
    assert answer.prompt_tokens is not None
    assert answer.prompt_tokens <= MAX_PROMPT_TOKENS
    assert len(_hours(answer)) >= 12
    assert all(c.start_s >= DAY_START_S and c.end_s <= DAY_START_S + DAY_S for c in answer.citations)
    # The top-k path sees at most top_k chunks of the day.
    assert not top_k_answer.planned
    assert len(_hours(top_k_answer)) <= 6
