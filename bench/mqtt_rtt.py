"""MQTT request/response overhead of MqttApi against a raw aiomqtt echo, same broker, same run.

A private mosquitto (configs/mosquitto.conf settings: set_tcp_nodelay) on a free loopback port;
QoS 1 both ways; TCP_NODELAY on every client. The answer function returns at once, so the
numbers are the protocol path: parse, validate, task, JSON, publish.

    .venv/bin/python -m bench.mqtt_rtt --requests 500   (as a module, so the repository root is on sys.path)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import socket
import statistics
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from zoneinfo import ZoneInfo

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from retrieval.answer import Answer, Citation, Question
from streamer.mqtt_api import MqttApi
from streamer.settings import MqttSettings

NODELAY = ((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),)
WARMUP = 20


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def private_broker():
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        conf = Path(tmp) / "mosquitto.conf"
        conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nset_tcp_nodelay true\n")
        proc = subprocess.Popen(["mosquitto", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            for _ in range(100):
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
                time.sleep(0.05)
            yield port
        finally:
            proc.terminate()
            proc.wait(timeout=10)


async def instant(question: Question, on_delta) -> Answer:
    return Answer(question.text, [Citation("cam", 1.7e9, 1.7e9 + 8, 0.5)], None, None, {"total": 0.0})


async def echo(port: int, topic: str, ready: asyncio.Event) -> None:
    """The baseline responder: copy each request to its response topic with its correlation data."""
    async with aiomqtt.Client("127.0.0.1", port, protocol=aiomqtt.ProtocolVersion.V5, socket_options=NODELAY) as c:
        await c.subscribe(topic, qos=1)
        ready.set()
        async for message in c.messages:
            props = Properties(PacketTypes.PUBLISH)
            props.CorrelationData = message.properties.CorrelationData
            await c.publish(message.properties.ResponseTopic, message.payload, qos=1, properties=props)


async def measure(port: int, topic: str, n: int) -> list[float]:
    """Sequential round trips in ms (after a warm-up)."""
    reply = f"bench/reply/{uuid.uuid4().hex[:8]}"
    pending: dict[bytes, asyncio.Future[None]] = {}
    async with aiomqtt.Client("127.0.0.1", port, protocol=aiomqtt.ProtocolVersion.V5, socket_options=NODELAY) as c:
        await c.subscribe(reply, qos=1)

        async def read() -> None:
            async for message in c.messages:
                fut = pending.pop(message.properties.CorrelationData, None)
                if fut is not None:
                    fut.set_result(None)

        reader = asyncio.create_task(read())
        times = []
        body = json.dumps({"question": "is anyone at the door?"}).encode()
        for i in range(n + WARMUP):
            corr = uuid.uuid4().bytes
            props = Properties(PacketTypes.PUBLISH)
            props.ResponseTopic, props.CorrelationData = reply, corr
            fut = asyncio.get_running_loop().create_future()
            pending[corr] = fut
            t0 = time.perf_counter()
            await c.publish(topic, body, qos=1, properties=props)
            await fut
            if i >= WARMUP:
                times.append((time.perf_counter() - t0) * 1000.0)
        reader.cancel()
    return times


def summary(times: list[float]) -> dict[str, float]:
    q = statistics.quantiles(times, n=100)
    return {"p50": statistics.median(times), "p90": q[89], "p99": q[98], "max": max(times)}


async def main(n: int) -> None:
    with private_broker() as port:
        ready = asyncio.Event()
        baseline_task = asyncio.create_task(echo(port, "bench/echo", ready))
        await ready.wait()
        raw = summary(await measure(port, "bench/echo", n))
        baseline_task.cancel()

        settings = MqttSettings(host="127.0.0.1", port=port, topic_prefix="bench", client_id="bench-vigil")
        api = MqttApi(settings, tz=ZoneInfo("UTC"), cameras=["cam"], answer=instant, session_expiry_s=0)
        stop, api_ready = asyncio.Event(), asyncio.Event()
        task = asyncio.create_task(api.run(stop, api_ready))
        await api_ready.wait()
        ours = summary(await measure(port, api.ask_topic, n))
        stop.set()
        await task
    print(f"{n} sequential QoS 1 request/response round trips on loopback (ms)")
    print(f"{'':14}{'p50':>8}{'p90':>8}{'p99':>8}{'max':>8}")
    for name, s in (("raw echo", raw), ("MqttApi", ours)):
        print(f"{name:14}{s['p50']:8.3f}{s['p90']:8.3f}{s['p99']:8.3f}{s['max']:8.3f}")
    print(f"MqttApi / raw: p50 {ours['p50'] / raw['p50']:.2f}x, p99 {ours['p99'] / raw['p99']:.2f}x")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=500)
    asyncio.run(main(parser.parse_args().requests))
