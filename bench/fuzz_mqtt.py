"""10,000 hostile MQTT messages against a running ``vigil serve`` that ingests a camera.

Setup: tiny random models built locally (vlm/tiny.py), a private mosquitto on a free loopback
port (temp config), the shared Redis under a key prefix of this run (deleted afterwards), and
``vigil serve`` as a child process with one camera: a bundled clip looped in real time. The
hostile stream is bench/hostile.py's seeded generator, sent as raw packets in paced batches.

Before the "before" RSS the daemon answers ``--warmup`` valid questions (the answering path's
one-time allocations), then ingest alone runs for a control interval.

Reports: crashes (the daemon exits during the run; target 0), requests with a valid reply
address answered with an error (target 100%), valid questions answered, the daemon's RSS before
and after the burst and after each burst (target ≤ 10% growth once it settles), messages per
second absorbed.

    .venv/bin/python -m bench.fuzz_mqtt --messages 10000 --bursts 3
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import aiomqtt
import redis
import yaml
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from bench.hostile import RawSender, fire, hostile_messages
from bench.mqtt_rtt import free_port
from vlm.tiny import make_tiny

ROOT = Path(__file__).resolve().parents[1]
CLIP = ROOT / "tests" / "data" / "car-detection.mp4"
VIGIL = Path(sys.executable).with_name("vigil")
MAX_PAYLOAD = 65536  # the default mqtt.max_payload_bytes
SETTLE_S = 10.0  # after the burst: let answers finish and the allocator settle before measuring


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def config(tmp: Path, port: int, prefix: str, models: Any) -> dict[str, Any]:
    return {
        "data_dir": str(tmp / "state"),
        "mqtt": {"host": "127.0.0.1", "port": port, "topic_prefix": prefix, "client_id": prefix},
        "redis": {"key_prefix": prefix},
        "models": {"vlm": str(models.vlm), "embedder": str(models.embedder), "device": "cpu", "max_new_tokens": 8},
        "cameras": {"lot": {"url": str(CLIP), "loop": True, "sample_fps": 1.0, "chunk_s": 4.0}},
    }


async def ask(
    port: int, prefix: str, question: str, timeout_s: float = 60.0, *, stream: bool = False
) -> dict[str, Any] | None:
    """The reply to one question: the answer (a streamed one's last part, after its deltas) or an error."""
    reply = f"bench-ok/{uuid.uuid4().hex[:8]}"
    props = Properties(PacketTypes.PUBLISH)
    props.ResponseTopic, props.CorrelationData = reply, b"ok"
    with contextlib.suppress(TimeoutError, aiomqtt.MqttError):
        async with (
            asyncio.timeout(timeout_s),
            aiomqtt.Client("127.0.0.1", port, protocol=aiomqtt.ProtocolVersion.V5) as c,
        ):
            await c.subscribe(reply, qos=1)
            body = json.dumps({"question": question, "stream": stream}).encode()
            await c.publish(f"{prefix}/ask", body, qos=1, properties=props)
            async for message in c.messages:
                assert isinstance(message.payload, bytes)
                part = json.loads(message.payload)
                if "delta" not in part:  # the answer, or an error
                    return part
    return None


async def wait_ready(port: int, prefix: str, daemon: subprocess.Popen[bytes], timeout_s: float = 180.0) -> None:
    """Until a question is answered with a citation (models loaded, a chunk stored)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if daemon.poll() is not None:
            raise SystemExit(f"vigil serve exited with {daemon.returncode} during start-up")
        body = await ask(port, prefix, "what is in the parking lot now?", timeout_s=20)
        if body and body.get("citations"):
            return
        await asyncio.sleep(2)
    raise SystemExit("vigil serve did not answer with a citation in time")


WARMUP_QUESTIONS = (
    "is anyone there?",
    "what is in the parking lot now?",
    "was a car moving in the last minute?",
    "what colour is the nearest car?",
)


async def warm_up(port: int, prefix: str, n: int, concurrency: int = 4) -> int:
    """``n`` valid questions, ``concurrency`` at a time (mqtt.max_in_flight), half of them streamed.

    The first answers allocate what answering keeps for the process's life (the generation path's
    torch and tokenizer caches, the worker threads' arenas); the burst's valid questions would
    otherwise count that one-time growth as if the burst had caused it. Returns how many answered.
    """
    answered = 0
    for start in range(0, n, concurrency):
        replies = await asyncio.gather(
            *(
                ask(port, prefix, WARMUP_QUESTIONS[i % len(WARMUP_QUESTIONS)], stream=i % 2 == 1)
                for i in range(start, min(n, start + concurrency))
            )
        )
        answered += sum(bool(r and "answer" in r) for r in replies)
    return answered


async def run(n: int, seed: int, batch: int, bursts: int, valid: bool, *, warmup: int) -> None:
    prefix = f"fuzzbench-{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        models = make_tiny(tmp / "models")
        port = free_port()
        (tmp / "mosquitto.conf").write_text(
            f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nset_tcp_nodelay true\n"
        )
        # Popen only forks and execs; terminate/wait at the end need the synchronous handle.
        broker = subprocess.Popen(["mosquitto", "-c", str(tmp / "mosquitto.conf")], stderr=subprocess.DEVNULL)  # noqa: ASYNC220
        (tmp / "vigil.yaml").write_text(yaml.safe_dump(config(tmp, port, prefix, models)))
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        log_path = tmp / "vigil.log"
        with log_path.open("wb") as log_file:
            daemon = subprocess.Popen(  # noqa: ASYNC220 - as above
                [str(VIGIL), "serve", "-c", str(tmp / "vigil.yaml")], cwd=ROOT, env=env, stderr=log_file
            )
        try:
            await wait_ready(port, prefix, daemon)
            rss_ready = rss_kib(daemon.pid)
            warmed = await warm_up(port, prefix, warmup)
            await asyncio.sleep(SETTLE_S)
            rss_warm = rss_kib(daemon.pid)
            # Control: the RSS drift of ingest alone over a quiet interval as long as the settle.
            rss_control = rss_kib(daemon.pid)
            await asyncio.sleep(SETTLE_S)
            rss_before = rss_kib(daemon.pid)
            replies: dict[str, list[dict[str, Any]]] = {}
            seen = asyncio.Event()
            reply_base = f"bench-fuzz-{uuid.uuid4().hex[:6]}"
            async with aiomqtt.Client("127.0.0.1", port, max_queued_incoming_messages=0) as watcher:
                await watcher.subscribe(f"{reply_base}/#", qos=1)

                async def collect() -> None:
                    async for message in watcher.messages:
                        assert isinstance(message.payload, bytes)
                        replies.setdefault(str(message.topic), []).append(json.loads(message.payload))
                        seen.set()

                collector = asyncio.create_task(collect())
                sender = RawSender("127.0.0.1", port, f"{prefix}-raw")
                sent, missing, rss_after_each = [], [], []
                elapsed = 0.0
                for burst in range(bursts):
                    started = time.perf_counter()
                    messages = hostile_messages(
                        seed + burst,
                        n,
                        prefix=prefix,
                        reply_base=f"{reply_base}/{burst}",
                        max_payload_bytes=MAX_PAYLOAD,
                        valid=valid,
                    )
                    got, lost = await fire(messages, sender, f"{prefix}/ask", replies, seen, batch=batch, wait_s=30)
                    elapsed += time.perf_counter() - started
                    sent.extend(got)
                    missing.extend(lost)
                    await asyncio.sleep(SETTLE_S)
                    rss_after_each.append(rss_kib(daemon.pid) if daemon.poll() is None else 0)
                await sender.close()
                collector.cancel()
                with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                    await collector
            crashed = daemon.poll() is not None
            rss_after = rss_kib(daemon.pid) if not crashed else 0
            final = None if crashed else await ask(port, prefix, "is anything moving now?")
        finally:
            if daemon.poll() is None:
                daemon.send_signal(signal.SIGTERM)
            code = daemon.wait(timeout=120)
            broker.terminate()
            broker.wait(timeout=10)
            with redis.Redis() as r:
                keys = list(r.scan_iter(match=f"{prefix}*", count=1000))
                if keys:
                    r.delete(*keys)
        expect_error = [s for s in sent if s.expect == "error"]
        valid = [s for s in sent if s.expect == "answer"]
        errored = sum(
            all("error" in r for r in replies.get(s.reply_topic or "", [])) and s.reply_topic in replies
            for s in expect_error
        )
        answered = sum(any("answer" in r for r in replies.get(s.reply_topic or "", [])) for s in valid)
        busy = sum(
            any(r.get("error", {}).get("code") == "busy" for r in replies.get(s.reply_topic or "", [])) for s in valid
        )
        drops = [s for s in sent if s.expect == "drop"]
        stray = sum(1 for s in drops if s.reply_topic and s.reply_topic in replies)
        counters = {}
        for line in log_path.read_text(errors="replace").splitlines():
            if "MQTT API stopped:" in line:
                fields = line.split("MQTT API stopped: ")[1].split(",")
                counters = dict(kv.strip().split("=") for kv in fields if "=" in kv)
        print(
            f"messages sent: {len(sent)} in {elapsed:.1f} s = {len(sent) / elapsed:.0f} msg/s absorbed "
            f"(batches of {batch})"
        )
        print(f"kinds: { {k: sum(s.kind == k for s in sent) for k in sorted({s.kind for s in sent})} }")
        print(f"crashes during the run: {int(crashed)}; exit code after SIGTERM: {code}")
        print(
            f"valid reply address -> error reply: {errored}/{len(expect_error)} "
            f"({100 * errored / max(1, len(expect_error)):.1f}%)"
        )
        print(f"no reply at all (missing): {len(missing)}; replies to messages that must get none: {stray}")
        print(f"valid questions answered during the run: {answered}/{len(valid)} (busy: {busy})")
        print(f"question after the run answered: {bool(final and 'answer' in final)}")
        growth = 100 * (rss_after - rss_before) / rss_before if rss_before else float("nan")
        print(
            f"warm-up: {warmed}/{warmup} valid questions answered (4 at a time, half streamed); "
            f"RSS at ready {rss_ready / 1024:.1f} MiB, after warm-up + {SETTLE_S:g} s {rss_warm / 1024:.1f} MiB"
        )
        print(f"daemon RSS before {rss_before / 1024:.1f} MiB, after {rss_after / 1024:.1f} MiB ({growth:+.1f}%)")
        each = ", ".join(f"{kib / 1024:.1f}" for kib in rss_after_each)
        print(f"daemon RSS after each burst of {n} ({SETTLE_S:g} s settle): {each} MiB")
        drift = 100 * (rss_before - rss_control) / rss_control
        print(f"control: RSS drift of ingest alone over {SETTLE_S:g} s before the burst: {drift:+.1f}%")
        print(f"daemon MQTT counters at stop: {counters}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=20261202)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--bursts", type=int, default=1, help="bursts of --messages, RSS after each")
    parser.add_argument("--no-valid", action="store_true", help="no valid questions in the stream")
    parser.add_argument("--warmup", type=int, default=20, help="valid questions before the 'before' RSS")
    args = parser.parse_args()
    asyncio.run(run(args.messages, args.seed, args.batch, args.bursts, not args.no_valid, warmup=args.warmup))


if __name__ == "__main__":
    main()
