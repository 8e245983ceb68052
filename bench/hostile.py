"""A seeded generator of hostile MQTT requests and a raw MQTT sender for what client libraries refuse.

Used by tests/test_mqtt_fuzz.py (a few thousand messages) and bench/fuzz_mqtt.py (10,000).
Every message says what vigil must do with it: ``error`` (it has a usable reply address, so an
error reply must arrive there), ``answer`` (a valid question), or ``drop`` (no usable reply
address: nothing may be published for it; the broker may already refuse it).

Reply addresses of ``error``/``answer`` messages are unique (``{reply_base}/{i}``), so every reply
can be matched to its message and no requester's rate limit is involved: the parser and the reply
rules are under test, not the token bucket.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import random
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

Expect = Literal["error", "answer", "drop"]


@dataclass(frozen=True)
class Hostile:
    """One message: the raw packet parts and what vigil must do with it."""

    kind: str
    payload: bytes
    expect: Expect
    v5: bool
    response_topic: bytes | None = None  # raw bytes of the v5 Response Topic property
    correlation: bytes | None = None
    topic: bytes | None = None  # None: the ask topic; else raw bytes of a (bad) topic name
    reply_topic: str | None = None  # where the reply must arrive (error / answer)


def _deep(rng: random.Random) -> bytes:
    depth = rng.choice([50, 1000, 20_000])
    return rng.choice([b"[", b'{"a":', b'{"question":[']) * depth


def _big_int(rng: random.Random) -> bytes:
    digits = b"9" * rng.choice([25, 5000, 40_000])
    return rng.choice([b'{"question":"q","top_k":' + digits + b"}", digits, b'{"id":-' + digits + b"}"])


def _bad_utf8(rng: random.Random) -> bytes:
    bad = rng.choice([b"\xff\xfe", b"\xed\xa0\x80", b"\xc3", b"\xf4\x90\x80\x80", b"\x80" * 10])
    return b'{"question":"' + bad + b'"}'


def _bad_body(rng: random.Random) -> bytes:
    bodies = [
        b'{"question":"who \\ud800 came?"}',
        b'{"question":"q","cameras":"rtmp"}',
        b'{"question":"q","top_k":true}',
        b'{"question":"q","top_k":1e309}',
        b'{"question":"q","stream":"yes"}',
        b'{"question":"q","after":17}',
        b'{"question":"q","unknown":1}',
        b'{"question":NaN}',
        b'{"question":"   "}',
        b'{"question":"q","cameras":["\\u0000"]}',
        b"[]",
        b"null",
        b'"just a string"',
        b"{not json",
        b"",
    ]
    if rng.random() < 0.3:
        return bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 300)))
    return rng.choice(bodies)


def _bad_reply_to(rng: random.Random, prefix: str) -> str:
    return rng.choice(
        [
            "me/\ud800",
            "me/\x00x",
            "me/+",
            "me/#",
            "#",
            "$SYS/broker/x",
            f"{prefix}/ask",
            f"{prefix}/available",
            f"{prefix}/status",
            f"{prefix}/cameras/cam/state",
            f"{prefix}/events/x",
            "homeassistant/sensor/vigil/config",
            "",
        ]
    )


def hostile_messages(
    seed: int, n: int, *, prefix: str, reply_base: str, max_payload_bytes: int, valid: bool = True
) -> Iterator[Hostile]:
    """``n`` hostile (and, with ``valid``, 5% valid) messages, the same ones for the same seed."""
    rng = random.Random(seed)
    for i in range(n):
        reply = f"{reply_base}/{i}"
        corr = b"c%d" % i
        roll = rng.random()
        if roll < 0.05 and valid:  # a valid question now and then: it must still be answered
            yield Hostile(
                "valid", b'{"question":"is anyone there?"}', "answer", True, reply.encode(), corr, None, reply
            )
        elif roll < 0.20:  # (also the valid share when valid is False)
            yield Hostile("deep_json", _deep(rng), "error", True, reply.encode(), corr, None, reply)
        elif roll < 0.30:
            yield Hostile("big_int", _big_int(rng), "error", True, reply.encode(), corr, None, reply)
        elif roll < 0.38:
            yield Hostile("bad_utf8", _bad_utf8(rng), "error", True, reply.encode(), corr, None, reply)
        elif roll < 0.50:
            yield Hostile("bad_body", _bad_body(rng), "error", True, reply.encode(), corr, None, reply)
        elif roll < 0.58:  # v3.1.1: reply_to found cheaply, body too large / too deep / bad int
            head = json.dumps({"reply_to": reply, "id": i})[:-1].encode()
            tail = rng.choice(
                [
                    b',"question":"' + b"x" * (max_payload_bytes + 10) + b'"}',
                    b',"x":' + b"[" * 500 + b"]" * 500 + b"}",
                    b',"question":"q","top_k":' + b"9" * 5000 + b"}",
                    b',"question":"\\udc00"}',
                ]
            )
            yield Hostile("v311_refused", head + tail, "error", False, None, None, None, reply)
        elif roll < 0.63:  # v3.1.1 oversized with reply_to beyond the sniffed head: dropped
            body = b'{"question":"' + b"x" * (max_payload_bytes + 10) + b'","reply_to":"' + reply.encode() + b'"}'
            yield Hostile("v311_oversized_late_reply_to", body, "drop", False)
        elif roll < 0.68:
            yield Hostile(
                "v5_oversized",
                b'{"question":"' + b"y" * (max_payload_bytes + 1) + b'"}',
                "error",
                True,
                reply.encode(),
                corr,
                None,
                reply,
            )
        elif roll < 0.80:  # v3.1.1 bad reply_to in a valid body
            body = json.dumps({"question": "q", "reply_to": _bad_reply_to(rng, prefix)}).encode()
            yield Hostile("v311_bad_reply_to", body, "drop", False)
        elif roll < 0.90:  # v5 bad response topic: raw bytes the broker or vigil must refuse
            raw_topic = rng.choice(
                [
                    b"me/\xed\xa0\x80",
                    b"me/\x00x",
                    b"me/\xff",
                    b"me/+",
                    b"me/#",
                    f"{prefix}/available".encode(),
                    f"{prefix}/ask".encode(),
                    b"homeassistant/x/config",
                    b"$SYS/x",
                ]
            )
            yield Hostile("v5_bad_response_topic", b'{"question":"q"}', "drop", True, raw_topic, corr)
        elif roll < 0.95:  # no reply address at all
            yield Hostile("no_reply_address", _bad_body(rng), "drop", False)
        else:  # a bad topic name on the packet itself: the broker disconnects the sender
            bad_topic = rng.choice([b"\xff\xfe/ask", f"{prefix}/\x00ask".encode(), f"{prefix}/+".encode()])
            yield Hostile("bad_publish_topic", b'{"question":"q"}', "drop", True, reply.encode(), corr, bad_topic)


# --------------------------------------------------------------------------- raw MQTT


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(data: bytes) -> bytes:
    return struct.pack("!H", len(data)) + data


def connect_packet(client_id: str, *, v5: bool) -> bytes:
    body = _field(b"MQTT") + bytes([5 if v5 else 4, 0x02]) + struct.pack("!H", 60)
    if v5:
        body += _varint(0)
    body += _field(client_id.encode())
    return b"\x10" + _varint(len(body)) + body


def publish_packet(
    topic: bytes, payload: bytes, *, v5: bool, response_topic: bytes | None, correlation: bytes | None
) -> bytes:
    """A QoS 0 PUBLISH with exactly these bytes (no validation: that is the point)."""
    body = _field(topic)
    if v5:
        props = b""
        if response_topic is not None:
            props += b"\x08" + _field(response_topic)
        if correlation is not None:
            props += b"\x09" + _field(correlation)
        body += _varint(len(props)) + props
    body += payload
    return b"\x30" + _varint(len(body)) + body


class RawSender:
    """Writes raw packets to the broker over plain TCP (QoS 0, so the broker sends nothing back but
    CONNACK). A packet the broker may refuse ends the connection: :meth:`send` with ``risky`` opens
    a fresh one afterwards, so the next packet is not lost with the old one."""

    def __init__(self, host: str, port: int, client_id: str) -> None:
        self._host, self._port, self._id = host, port, client_id
        self._conns: dict[bool, tuple[asyncio.StreamReader, asyncio.StreamWriter]] = {}
        self.connections = 0

    async def _open(self, v5: bool) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection(self._host, self._port)
        # A new client id per connection: reusing one would make the broker take the session over
        # and drop what the previous connection had sent but the broker had not read yet.
        writer.write(connect_packet(f"{self._id}-{'v5' if v5 else 'v4'}-{self.connections}", v5=v5))
        await writer.drain()
        head = await asyncio.wait_for(reader.readexactly(2), 5.0)
        await asyncio.wait_for(reader.readexactly(head[1]), 5.0)
        if head[0] != 0x20:
            raise ConnectionError(f"expected CONNACK, got {head!r}")
        self.connections += 1
        return reader, writer

    async def send(self, packet: bytes, *, v5: bool, risky: bool = False) -> None:
        conn = self._conns.get(v5)
        if conn is None:
            conn = self._conns[v5] = await self._open(v5)
        _, writer = conn
        try:
            writer.write(packet)
            await writer.drain()
        except (ConnectionError, OSError):
            risky = True
        if risky:
            await self._drop(v5)

    async def _drop(self, v5: bool) -> None:
        conn = self._conns.pop(v5, None)
        if conn is not None:
            conn[1].close()
            with contextlib.suppress(ConnectionError, OSError):
                await conn[1].wait_closed()

    async def close(self) -> None:
        for v5 in list(self._conns):
            await self._drop(v5)

    async def send_hostile(self, message: Hostile, ask_topic: str) -> None:
        packet = publish_packet(
            message.topic if message.topic is not None else ask_topic.encode(),
            message.payload,
            v5=message.v5,
            response_topic=message.response_topic,
            correlation=message.correlation,
        )
        # The broker hangs up on packets with bad topic names or properties.
        risky = message.kind in ("v5_bad_response_topic", "bad_publish_topic")
        await self.send(packet, v5=message.v5, risky=risky)


@dataclass(frozen=True)
class Sent:
    """What is kept of a sent message (not its payload, so the sender's own memory stays flat)."""

    kind: str
    expect: Expect
    reply_topic: str | None


async def fire(
    messages: Iterator[Hostile],
    sender: RawSender,
    ask_topic: str,
    replies: dict[str, list[dict[str, Any]]],
    seen: asyncio.Event,
    *,
    batch: int = 64,
    wait_s: float = 10.0,
) -> tuple[list[Sent], list[Sent]]:
    """Send ``messages`` in batches; after each, wait until every expected reply is in ``replies``.

    ``replies`` (reply topic → bodies) and ``seen`` (set on each reply) are fed by the caller's
    subscriber. Pacing by batch keeps the service's inbox (256) from overflowing, so a missing
    reply is the service's fault, not the load's. Returns (sent, missing: no reply within wait_s).
    """
    sent: list[Sent] = []
    missing: list[Sent] = []
    while group := list(itertools.islice(messages, batch)):
        for message in group:
            await sender.send_hostile(message, ask_topic)
        wanted = [m for m in group if m.expect != "drop"]
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait_s):
                while not all(m.reply_topic in replies for m in wanted):
                    seen.clear()
                    await seen.wait()
        kept = [Sent(m.kind, m.expect, m.reply_topic) for m in group]
        sent.extend(kept)
        missing.extend(k for k in kept if k.expect != "drop" and k.reply_topic not in replies)
    return sent, missing
