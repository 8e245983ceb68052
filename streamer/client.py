"""``vigil ask`` and ``vigil status``: small MQTT v5 clients of a running daemon.

``ask`` publishes a question with a Response Topic and Correlation Data of its own and prints the
reply (answer and citations, the deltas as they come with ``--stream``, or the raw JSON with
``--json``). ``status`` reads the retained availability, status and camera state topics and prints
the health, the counters and a table of cameras. Retained states outlive the daemon that published
them (after a crash the broker keeps the last ``connected``), so a camera is shown ``unknown`` when
vigil is not ``online`` or when its state was not refreshed within ``STALE_AFTER_S``.
Exit codes: 0 answered / online and healthy, 1 an error reply, a timeout, an unreachable broker /
not online or degraded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import time
import uuid
from pathlib import Path
from typing import Any, TextIO
from zoneinfo import ZoneInfo

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from streamer.settings import MqttSettings, load_settings
from streamer.timefmt import BadTimeError, parse_time
from streamer.topics import Topics

EXIT_OK = 0
EXIT_FAILURE = 1
QOS = 1
STATUS_COLUMNS = ("state", "input_fps", "sampled_fps", "frames_dropped", "reconnects", "last_frame_age_s", "error")
COUNTERS = (
    "chunks_stored",
    "chunks_failed",
    "frames_skipped",
    "pending_writes",
    "writes_dropped",
    "encoder_queue_chunks",
)
# The daemon re-publishes every camera state every 10 s (streamer/daemon.py STATUS_INTERVAL_S); a
# state older than six of those was left by a daemon that is gone or wedged.
STALE_AFTER_S = 60.0
MB = 1e6  # memory sizes are shown in decimal megabytes, like the budgets' "2GB"


def broker_settings(config: str | None) -> MqttSettings:
    """The ``mqtt`` section of the config; defaults (plus environment) when the file does not exist."""
    path = config if config and Path(config).exists() else None
    return load_settings(path).mqtt


def _client(s: MqttSettings, timeout_s: float) -> aiomqtt.Client:
    tls = aiomqtt.TLSParameters(ca_certs=str(s.tls_ca_file) if s.tls_ca_file else None) if s.tls else None
    return aiomqtt.Client(
        s.host,
        s.port,
        username=s.username,
        password=s.password.get_secret_value() if s.password else None,
        identifier=f"vigil-cli-{uuid.uuid4().hex[:12]}",
        protocol=aiomqtt.ProtocolVersion.V5,
        timeout=timeout_s,
        tls_params=tls,
        socket_options=((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),),
    )


def _print_answer(body: dict[str, Any], out: TextIO, *, with_text: bool = True) -> None:
    if with_text:
        print(body.get("answer", ""), file=out)
    citations = body.get("citations") or []
    if citations:
        print("\nSources:", file=out)
        for c in citations:
            print(f"  {c['camera']}  {c['start']} – {c['end']}  (score {c['score']:.3f})", file=out)


async def ask(
    settings: MqttSettings,
    request: dict[str, Any],
    *,
    timeout_s: float,
    out: TextIO,
    err: TextIO,
    as_json: bool = False,
) -> int:
    """Send one question and print its reply; returns the exit code."""
    reply_topic = Topics(settings.topic_prefix).cli_reply(uuid.uuid4().hex)
    correlation = uuid.uuid4().bytes
    props = Properties(PacketTypes.PUBLISH)
    props.ResponseTopic = reply_topic
    props.CorrelationData = correlation
    props.ContentType = "application/json"
    # The broker drops the question if the daemon cannot take it before we stop waiting.
    props.MessageExpiryInterval = max(1, int(timeout_s))
    streamed = False
    try:
        async with asyncio.timeout(timeout_s), _client(settings, timeout_s) as client:
            await client.subscribe(reply_topic, qos=QOS)
            await client.publish(
                Topics(settings.topic_prefix).ask, json.dumps(request).encode(), qos=QOS, properties=props
            )
            async for message in client.messages:
                got = getattr(message.properties, "CorrelationData", None)
                if got != correlation or not isinstance(message.payload, bytes):
                    continue
                body = json.loads(message.payload)
                if "error" in body:
                    if as_json:
                        print(json.dumps(body), file=out)
                    print(f"error: {body['error']['code']}: {body['error']['message']}", file=err)
                    return EXIT_FAILURE
                if "delta" in body:
                    if as_json:
                        print(json.dumps(body), file=out, flush=True)
                    else:
                        print(body["delta"], end="", file=out, flush=True)
                        streamed = True
                    continue
                if as_json:
                    print(json.dumps(body, indent=2), file=out)
                else:
                    if streamed:
                        print(file=out)
                    _print_answer(body, out, with_text=not streamed)
                return EXIT_OK
    except TimeoutError:
        print(f"error: no answer within {timeout_s:g} s (is vigil running and connected?)", file=err)
        return EXIT_FAILURE
    except aiomqtt.MqttError as exc:
        print(f"error: MQTT broker {settings.host}:{settings.port}: {exc}", file=err)
        return EXIT_FAILURE
    print("error: the connection closed before an answer came", file=err)
    return EXIT_FAILURE


async def status(settings: MqttSettings, *, timeout_s: float, out: TextIO, err: TextIO) -> int:
    """Print availability, health, counters and each camera's retained state; 0 when online and ok."""
    prefix = settings.topic_prefix
    topics = Topics(prefix)
    available: str | None = None
    daemon: dict[str, Any] | None = None
    cameras: dict[str, dict[str, Any]] = {}
    try:
        async with _client(settings, timeout_s) as client:
            await client.subscribe(topics.available, qos=QOS)
            await client.subscribe(topics.status, qos=QOS)
            await client.subscribe(topics.camera_states, qos=QOS)
            try:
                async with asyncio.timeout(timeout_s):
                    async for message in client.messages:
                        payload = message.payload if isinstance(message.payload, bytes) else b""
                        topic = str(message.topic)
                        if topic == topics.available:
                            available = payload.decode(errors="replace")
                        elif topic == topics.status:
                            daemon = _json_object(payload)
                        elif payload and (name := topics.camera_of_state(topic)) is not None:
                            cameras[name] = _json_object(payload) or {"state": "?", "error": "unreadable state"}
            except TimeoutError:
                pass  # retained messages come at once; the timeout only ends the collection
    except aiomqtt.MqttError as exc:
        print(f"error: MQTT broker {settings.host}:{settings.port}: {exc}", file=err)
        return EXIT_FAILURE
    now_s = time.time()
    online = available == "online"
    print(f"vigil ({prefix}): {available or 'unknown (no retained availability)'}", file=out)
    degraded = _print_health(daemon, online, now_s, out)
    rows = [("camera", *STATUS_COLUMNS)]
    for name, retained in sorted(cameras.items()):
        stale = _stale_reason(retained, available, now_s)
        shown = retained if stale is None else {"state": "unknown", "error": f"{stale}; last: {retained.get('state')}"}
        rows.append((name, *(_cell(shown.get(col)) for col in STATUS_COLUMNS)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    if cameras:
        for row in rows:
            print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip(), file=out)
    else:
        print("no camera states published", file=out)
    for line in _memory_lines((daemon or {}).get("memory")):
        print(line, file=out)
    return EXIT_OK if online and not degraded else EXIT_FAILURE


def _size(n_bytes: int) -> str:
    return f"{n_bytes / MB:.1f} MB"


def _memory_lines(memory: object) -> list[str]:
    """One line per camera of the status's ``memory`` (tier -> chunks, bytes); malformed parts skipped.

    The retained status is read from the broker, where anyone allowed to publish may have put
    something else: only well-formed rows are shown.
    """
    if not isinstance(memory, dict):
        return []
    lines: list[str] = []
    for camera, rows in sorted(memory.items()):
        if rows is None:
            lines.append(f"memory {camera}: unknown (counters not yet recounted)")
            continue
        if not isinstance(rows, dict):
            continue
        good = {
            tier: row
            for tier, row in rows.items()
            if isinstance(row, dict) and all(isinstance(row.get(k), int) for k in ("chunks", "bytes"))
        }
        total = good.pop("total", None)
        if total is None:
            continue
        tiers = "; ".join(
            f"tier {tier}: {row['chunks']} chunks, {_size(row['bytes'])}"
            for tier, row in sorted(good.items(), key=lambda kv: kv[0])
        )
        lines.append(f"memory {camera}: {_size(total['bytes'])} in {total['chunks']} chunks ({tiers})")
    return lines


def _json_object(payload: bytes) -> dict[str, Any] | None:
    try:
        body = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return body if isinstance(body, dict) else None


def _age_s(body: dict[str, Any], now_s: float) -> float | None:
    """Seconds since ``published_at``; None when it is missing or unreadable."""
    try:
        return now_s - parse_time(body.get("published_at"), ZoneInfo("UTC"))
    except BadTimeError:
        return None


def _stale_reason(body: dict[str, Any], available: str | None, now_s: float) -> str | None:
    """Why a retained payload no longer describes the present, or None while it does."""
    if available != "online":
        return f"stale: vigil is {available or 'not reporting'}"
    age = _age_s(body, now_s)
    if age is not None and age > STALE_AFTER_S:
        return f"stale: published {age:.0f} s ago"
    return None


def _print_health(daemon: dict[str, Any] | None, online: bool, now_s: float, out: TextIO) -> bool:
    """The health line and the counters; True when the daemon reports itself degraded now."""
    if daemon is None:
        print("health: unknown (no retained status)", file=out)
        return False
    health = daemon.get("health", "?")
    reason = daemon.get("reason")
    stale = _stale_reason(daemon, "online" if online else "offline", now_s)
    if stale is not None:
        print(f"health: unknown ({stale}; last: {health}{f': {reason}' if reason else ''})", file=out)
    else:
        print(f"health: {health}{f': {reason}' if reason else ''}", file=out)
    print("  ".join(f"{key}={_cell(daemon.get(key))}" for key in COUNTERS), file=out)
    return stale is None and health != "ok"


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


def cli_ask(args: argparse.Namespace) -> int:
    """``vigil ask QUESTION [--camera C]… [--after T] [--before T] [--top-k K] [--stream] [--json]``."""
    request: dict[str, Any] = {"question": args.question, "stream": bool(args.stream)}
    if args.camera:
        request["cameras"] = list(args.camera)
    for key in ("after", "before", "top_k"):
        value = getattr(args, key, None)
        if value is not None:
            request[key] = value
    settings = broker_settings(args.config)
    return asyncio.run(
        ask(settings, request, timeout_s=args.timeout, out=sys.stdout, err=sys.stderr, as_json=args.json)
    )


def cli_status(args: argparse.Namespace) -> int:
    """``vigil status``: the retained availability and camera states."""
    settings = broker_settings(args.config)
    return asyncio.run(status(settings, timeout_s=args.timeout, out=sys.stdout, err=sys.stderr))
