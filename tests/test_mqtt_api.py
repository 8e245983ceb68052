"""The MQTT question service against a real Mosquitto: v5 and v3.1.1 requests, streaming, errors,
availability and last will, camera states, a broker restart with a reply produced while it was down.

The ``answer`` callable here is a small function of the question: the protocol is under test, not
the answerer (tests/test_search.py and the end-to-end tests cover that).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import aiomqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from retrieval.answer import Answer, Citation, Question
from streamer.mqtt_api import MqttApi, _Outgoing, max_packet_bytes
from streamer.settings import MqttSettings
from streamer.topics import Topics
from tests.plugins.brokers import retained

TZ = ZoneInfo("Europe/Berlin")
CAMERAS = ["front_door", "garage"]
REPO = Path(__file__).resolve().parents[1]
WAIT_S = 10.0


async def echo_answer(question: Question, on_delta: Callable[[str], Awaitable[None]] | None) -> Answer:
    """An answer that is a function of the question, so the test can tell which question it answers."""
    words = ["you", "asked:", *question.text.split()]
    if on_delta is not None:
        for word in words:
            await on_delta(word + " ")
    camera = (question.cameras or ["front_door"])[0]
    start = question.after_s if question.after_s is not None else 1_700_000_000.0
    return Answer(
        text=" ".join(words),
        citations=[Citation(camera=camera, start_s=start, end_s=start + 8.0, score=0.5)],
        after_s=question.after_s,
        before_s=question.before_s,
        timing_ms={"total": 1.0},
    )


def settings_for(host: str, port: int, prefix: str, **overrides: Any) -> MqttSettings:
    values: dict[str, Any] = {
        "host": host,
        "port": port,
        "topic_prefix": prefix,
        "client_id": f"{prefix}-svc",
        "reconnect_max_s": 0.5,
        **overrides,
    }
    return MqttSettings(**values)


@contextlib.asynccontextmanager
async def running(api: MqttApi) -> AsyncIterator[MqttApi]:
    stop, ready = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(api.run(stop, ready))
    try:
        await asyncio.wait_for(ready.wait(), WAIT_S)
        yield api
    finally:
        stop.set()
        await asyncio.wait_for(task, WAIT_S)


class Requester:
    """A client that asks questions and collects replies on its own reply topic."""

    def __init__(
        self,
        host: str,
        port: int,
        prefix: str,
        *,
        v5: bool = True,
        persistent: bool = False,
        identifier: str | None = None,
        reply_topic: str | None = None,
    ) -> None:
        self.prefix = prefix
        self.reply_topic = reply_topic or f"{prefix}/reply/{uuid.uuid4().hex[:8]}"
        self.identifier = identifier or f"{prefix}-req-{uuid.uuid4().hex[:6]}"
        self.v5 = v5
        kwargs: dict[str, Any] = {}
        if persistent:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 60
            kwargs = {"clean_start": False, "properties": props}
        self.client = aiomqtt.Client(
            host,
            port,
            identifier=self.identifier,
            protocol=aiomqtt.ProtocolVersion.V5 if v5 else aiomqtt.ProtocolVersion.V311,
            socket_options=((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),),
            **kwargs,
        )
        self.replies: asyncio.Queue[aiomqtt.Message] = asyncio.Queue()
        self._reader: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Requester:
        await self.client.__aenter__()
        await self.client.subscribe(self.reply_topic, qos=1)
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._reader is not None
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
            await self._reader
        with contextlib.suppress(aiomqtt.MqttError):
            await self.client.__aexit__(None, None, None)

    async def _read(self) -> None:
        with contextlib.suppress(aiomqtt.MqttError):
            async for message in self.client.messages:
                self.replies.put_nowait(message)

    async def ask(
        self, body: dict[str, Any] | bytes, correlation: bytes | None = None, topic: str | None = None
    ) -> None:
        payload = body if isinstance(body, bytes) else json.dumps(body).encode()
        props = None
        if self.v5:
            props = Properties(PacketTypes.PUBLISH)
            props.ResponseTopic = self.reply_topic
            props.CorrelationData = correlation or uuid.uuid4().bytes
        await self.client.publish(topic or Topics(self.prefix).ask, payload, qos=1, properties=props)

    async def reply(self) -> tuple[dict[str, Any], aiomqtt.Message]:
        message = await asyncio.wait_for(self.replies.get(), WAIT_S)
        assert isinstance(message.payload, bytes)
        return json.loads(message.payload), message


# --------------------------------------------------------------------------- requests


async def test_v5_request_is_answered_on_response_topic_with_correlation(broker, prefix):
    api = MqttApi(settings_for(*broker, prefix), tz=TZ, cameras=CAMERAS, answer=echo_answer)
    async with running(api), Requester(*broker, prefix) as req:
        await req.ask(
            {"question": "who came?", "cameras": ["GARAGE"], "after": "2026-11-20T10:00:00"},
            correlation=b"corr-1",
        )
        body, message = await req.reply()
    assert message.properties is not None
    assert message.properties.CorrelationData == b"corr-1"
    assert body["answer"] == "you asked: who came?"
    # The camera name was matched case-insensitively; the naive time was read in Europe/Berlin.
    assert body["citations"] == [
        {
            "camera": "garage",
            "start": "2026-11-20T10:00:00.000+01:00",
            "end": "2026-11-20T10:00:08.000+01:00",
            "score": 0.5,
        }
    ]
    assert body["window"] == {"after": "2026-11-20T10:00:00.000+01:00", "before": None, "phrase": None}
    assert "total" in body["timing_ms"]
    assert api.counters["answered"] == 1


async def test_v311_request_with_reply_to_gets_the_same_id(broker, prefix):
    api = MqttApi(settings_for(*broker, prefix), tz=TZ, cameras=CAMERAS, answer=echo_answer)
    async with running(api), Requester(*broker, prefix, v5=False) as req:
        await req.ask({"question": "anyone there?", "reply_to": req.reply_topic, "id": "q-42"})
        body, _ = await req.reply()
        await req.ask({"question": "and now?", "reply_to": req.reply_topic, "id": 7})
        body2, _ = await req.reply()
    assert body["id"] == "q-42"
    assert body["answer"] == "you asked: anyone there?"
    assert body2["id"] == 7
    assert body2["answer"] == "you asked: and now?"


async def test_streamed_parts_arrive_in_order_and_end_with_done(broker, prefix):
    api = MqttApi(settings_for(*broker, prefix), tz=TZ, cameras=CAMERAS, answer=echo_answer)
    async with running(api), Requester(*broker, prefix) as req:
        await req.ask({"question": "what moves at the gate", "stream": True}, correlation=b"s")
        parts = []
        while True:
            body, message = await req.reply()
            assert message.properties.CorrelationData == b"s"
            parts.append(body)
            if body.get("done"):
                break
    deltas = parts[:-1]
    assert [p["seq"] for p in deltas] == list(range(len(deltas)))
    assert "".join(p["delta"] for p in deltas).split() == ["you", "asked:", "what", "moves", "at", "the", "gate"]
    assert parts[-1]["seq"] == len(deltas)
    assert parts[-1]["citations"][0]["camera"] == "front_door"
    assert parts[-1]["answer"] == "you asked: what moves at the gate"


async def test_each_malformed_request_gets_its_error_and_service_keeps_serving(broker, prefix):
    api = MqttApi(settings_for(*broker, prefix, max_payload_bytes=1024), tz=TZ, cameras=CAMERAS, answer=echo_answer)
    cases: list[tuple[bytes | dict[str, Any], str]] = [
        (b"{not json", "bad_json"),
        (b"[1, 2]", "bad_json"),
        ({"cameras": ["garage"]}, "bad_request"),
        ({"question": "  "}, "bad_request"),
        ({"question": "x", "top_k": 0}, "bad_request"),
        ({"question": "x", "cameras": ["backyard"]}, "unknown_camera"),
        ({"question": "x", "after": "yesterday-ish"}, "bad_time"),
        ({"question": "x", "after": "2026-11-20T12:00", "before": "2026-11-20T11:00"}, "bad_time"),
        ({"question": "x" * 2000}, "payload_too_large"),
    ]
    async with running(api), Requester(*broker, prefix) as req:
        for body, code in cases:
            await req.ask(body, correlation=code.encode())
            reply, message = await req.reply()
            assert message.properties.CorrelationData == code.encode()
            assert reply["error"]["code"] == code, (body, reply)
            assert reply["error"]["message"]
        await req.ask({"question": "still there?"})
        reply, _ = await req.reply()
    assert reply["answer"] == "you asked: still there?"
    assert api.counters["errors"] == len(cases)


async def test_too_many_in_flight_is_busy_and_a_slow_answer_times_out(broker, prefix):
    release = asyncio.Event()

    async def slow(question: Question, on_delta: Callable[[str], Awaitable[None]] | None) -> Answer:
        if question.text == "hang":
            await asyncio.Event().wait()
        await release.wait()
        return await echo_answer(question, on_delta)

    settings = settings_for(*broker, prefix, max_in_flight=1, answer_timeout_s=1.0)
    api = MqttApi(settings, tz=TZ, cameras=CAMERAS, answer=slow)
    async with running(api), Requester(*broker, prefix) as req:
        await req.ask({"question": "first"}, correlation=b"1")
        await asyncio.sleep(0.2)  # let the first question take the only slot
        await req.ask({"question": "second"}, correlation=b"2")
        busy, message = await req.reply()
        assert message.properties.CorrelationData == b"2"
        assert busy["error"]["code"] == "busy"
        release.set()
        first, message = await req.reply()
        assert message.properties.CorrelationData == b"1"
        assert first["answer"] == "you asked: first"
        await req.ask({"question": "hang"}, correlation=b"3")
        timeout, _ = await req.reply()
        assert timeout["error"]["code"] == "timeout"
        await req.ask({"question": "after the timeout"})
        after, _ = await req.reply()
    assert after["answer"] == "you asked: after the timeout"


async def test_request_without_reply_address_is_counted_not_answered(broker, prefix):
    api = MqttApi(settings_for(*broker, prefix), tz=TZ, cameras=CAMERAS, answer=echo_answer)
    async with running(api), Requester(*broker, prefix, v5=False) as req:
        await req.ask({"question": "into the void"})  # v3.1.1 and no reply_to
        await req.ask({"question": "ping", "reply_to": req.reply_topic})
        reply, _ = await req.reply()
    assert reply["answer"] == "you asked: ping"
    assert api.counters["unanswerable"] == 1
    assert req.replies.empty()


async def test_questions_asked_while_vigil_is_down_are_answered_after_restart(broker, prefix):
    settings = settings_for(*broker, prefix)
    async with running(MqttApi(settings, tz=TZ, cameras=CAMERAS, answer=echo_answer, session_expiry_s=30)):
        pass  # the first run leaves a persistent session with the subscription
    async with Requester(*broker, prefix) as req:
        await req.ask({"question": "asked while down"}, correlation=b"down")
        await asyncio.sleep(0.2)
        assert req.replies.empty()
        api = MqttApi(settings, tz=TZ, cameras=CAMERAS, answer=echo_answer, session_expiry_s=30)
        async with running(api):
            body, message = await req.reply()
    assert message.properties.CorrelationData == b"down"
    assert body["answer"] == "you asked: asked while down"


# --------------------------------------------------------------------------- availability


async def test_online_and_states_are_retained_and_offline_after_clean_stop(broker, prefix):
    api = MqttApi(settings_for(*broker, prefix), tz=TZ, cameras=CAMERAS, answer=echo_answer)
    await api.publish_camera_state("garage", {"state": "connecting"})  # before connecting: remembered
    async with running(api):
        await api.publish_camera_state("front_door", {"state": "connected", "input_fps": 10.0})
        seen = await retained(*broker, f"{prefix}/#")
    assert seen[f"{prefix}/available"] == b"online"
    assert json.loads(seen[f"{prefix}/cameras/front_door/state"]) == {"state": "connected", "input_fps": 10.0}
    assert json.loads(seen[f"{prefix}/cameras/garage/state"]) == {"state": "connecting"}
    after = await retained(*broker, f"{prefix}/available")
    assert after[f"{prefix}/available"] == b"offline"


SERVICE_SCRIPT = """
import asyncio, sys
from zoneinfo import ZoneInfo
from streamer.mqtt_api import MqttApi
from streamer.settings import MqttSettings
from streamer.topics import Topics
from tests.plugins.brokers import retained

async def answer(question, on_delta):
    raise RuntimeError("not used")

async def main():
    settings = MqttSettings(host=sys.argv[1], port=int(sys.argv[2]), topic_prefix=sys.argv[3], client_id=sys.argv[3])
    api = MqttApi(settings, tz=ZoneInfo("UTC"), cameras=[], answer=answer, session_expiry_s=0)
    stop, ready = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(api.run(stop, ready))
    await ready.wait()
    print("ready", flush=True)
    await task

asyncio.run(main())
"""


async def test_last_will_offline_when_the_process_dies(broker, prefix):
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        SERVICE_SCRIPT,
        broker[0],
        str(broker[1]),
        prefix,
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        assert line.strip() == b"ready"
        assert (await retained(*broker, f"{prefix}/available"))[f"{prefix}/available"] == b"online"
        proc.kill()  # no DISCONNECT packet: the broker must publish the will
        await proc.wait()
        for _ in range(50):
            seen = await retained(*broker, f"{prefix}/available", wait_s=0.2)
            if seen.get(f"{prefix}/available") == b"offline":
                break
        assert seen[f"{prefix}/available"] == b"offline"
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


# --------------------------------------------------------------------------- broker restart


async def test_broker_restart_reply_made_while_down_is_delivered(private_broker, prefix):
    host, port = "127.0.0.1", private_broker.port
    started, release = asyncio.Event(), asyncio.Event()

    async def gated(question: Question, on_delta: Callable[[str], Awaitable[None]] | None) -> Answer:
        if question.text == "held":
            started.set()
            await release.wait()
        return await echo_answer(question, on_delta)

    api = MqttApi(settings_for(host, port, prefix), tz=TZ, cameras=CAMERAS, answer=gated, session_expiry_s=60)
    async with running(api):
        async with Requester(host, port, prefix, persistent=True) as req:
            await req.ask({"question": "held"}, correlation=b"held")
            await asyncio.wait_for(started.wait(), WAIT_S)
        private_broker.stop()
        release.set()  # the answer is produced while the broker is down
        for _ in range(100):
            if api.counters["replies_queued"]:
                break
            await asyncio.sleep(0.05)
        assert api.counters["replies_queued"] == 1
        assert not api.connected
        await private_broker.start()
        # The requester comes back on its persistent session (same id, same reply topic).
        async with Requester(
            host, port, prefix, persistent=True, identifier=req.identifier, reply_topic=req.reply_topic
        ) as req2:
            held, message = await req2.reply()
            assert message.properties.CorrelationData == b"held"
            assert held["answer"] == "you asked: held"
            await req2.ask({"question": "after the restart"}, correlation=b"new")
            fresh, message = await req2.reply()
            while message.properties.CorrelationData != b"new":  # at-least-once: skip a repeat
                fresh, message = await req2.reply()
    assert fresh["answer"] == "you asked: after the restart"
    assert api.counters["connects"] >= 2


# --------------------------------------------------------------------------- hostile requests (issue 9)


async def _still_serving(req: Requester, api: MqttApi) -> None:
    await req.ask({"question": "still there?", "reply_to": req.reply_topic}, correlation=b"alive")
    reply, _ = await req.reply()
    assert reply["answer"] == "you asked: still there?"
    assert api.connected


async def test_deep_json_and_huge_integers_get_bad_json_and_the_service_keeps_reading(broker, prefix):
    # Before: RecursionError / ValueError escaped _dispatch and ended the API task (and the daemon).
    api = MqttApi(settings_for(*broker, prefix), tz=TZ, cameras=CAMERAS, answer=echo_answer)
    cases = [b"[" * 1000 + b"]" * 1000, b'{"question": "q", "top_k": ' + b"9" * 5000 + b"}", b"9" * 5000]
    async with running(api), Requester(*broker, prefix) as req:
        for i, raw in enumerate(cases):
            await req.ask(raw, correlation=bytes([i]))
            reply, message = await req.reply()
            assert message.properties.CorrelationData == bytes([i])
            assert reply["error"]["code"] == "bad_json"
        await _still_serving(req, api)


async def test_v311_reply_to_keeps_id_when_the_body_is_refused(broker, prefix):
    api = MqttApi(settings_for(*broker, prefix), tz=TZ, cameras=CAMERAS, answer=echo_answer)
    async with running(api), Requester(*broker, prefix, v5=False) as req:
        await req.ask({"question": "q", "cameras": "rtmp", "reply_to": req.reply_topic, "id": "c-1"})
        reply, _ = await req.reply()
        assert (reply["id"], reply["error"]["code"]) == ("c-1", "bad_request")
        assert "cameras" in reply["error"]["message"]
        await req.ask({"question": "q", "reply_to": req.reply_topic, "id": {"nested": [1]}})
        reply, _ = await req.reply()
        assert "id" not in reply  # an id that is not a bounded string or number is not echoed
        assert reply["error"]["code"] == "bad_request"


async def test_oversized_v311_request_is_answered_when_reply_to_is_cheap_to_find(broker, prefix):
    api = MqttApi(settings_for(*broker, prefix, max_payload_bytes=1024), tz=TZ, cameras=CAMERAS, answer=echo_answer)
    async with running(api), Requester(*broker, prefix, v5=False) as req:
        await req.ask({"reply_to": req.reply_topic, "id": 9, "question": "x" * 5000})
        reply, _ = await req.reply()
        assert (reply["id"], reply["error"]["code"]) == (9, "payload_too_large")
        # reply_to far beyond the sniffed head: dropped and counted, not parsed.
        await req.ask(b'{"question": "' + b"x" * 8000 + b'", "reply_to": "' + req.reply_topic.encode() + b'"}')
        await _still_serving(req, api)
    assert api.counters["unanswerable"] == 1
    assert req.replies.empty()


async def test_lone_surrogate_question_is_bad_request_not_internal(broker, prefix):
    async def utf8_answer(question: Question, on_delta: Callable[[str], Awaitable[None]] | None) -> Answer:
        question.text.encode("utf-8")  # what a tokenizer does first
        return await echo_answer(question, on_delta)

    api = MqttApi(settings_for(*broker, prefix), tz=TZ, cameras=CAMERAS, answer=utf8_answer)
    async with running(api), Requester(*broker, prefix) as req:
        await req.ask(b'{"question": "who \\ud800 came?"}')
        reply, _ = await req.reply()
    assert reply["error"]["code"] == "bad_request"


@pytest.mark.parametrize(
    "reply_to",
    [
        "me/\ud800",  # lone surrogate: paho could not encode it
        "me/\x00nul",  # NUL: not a valid topic name
        "{prefix}/ask",  # would make vigil ask itself
        "{prefix}/available",  # would overwrite availability
        "{prefix}/cameras/garage/state",
        "homeassistant/sensor/vigil/config",  # another system's discovery
        "$SYS/x",
        "me/#",
    ],
)
async def test_unusable_reply_to_is_dropped_and_nothing_is_published_there(broker, prefix, reply_to):
    reply_to = reply_to.replace("{prefix}", prefix)
    api = MqttApi(settings_for(*broker, prefix), tz=TZ, cameras=CAMERAS, answer=echo_answer)
    async with running(api), Requester(*broker, prefix, v5=False) as req:
        async with aiomqtt.Client(*broker, identifier=f"{prefix}-spy") as spy:
            if "\x00" not in reply_to and "\ud800" not in reply_to and not reply_to.startswith("$"):
                await spy.subscribe(reply_to, qos=1)
            for kind in ("bad", "good"):
                body = {"question": "q", "reply_to": reply_to, "id": 1}
                if kind == "good":
                    body = {"question": "q", "reply_to": req.reply_topic}
                await req.client.publish(Topics(prefix).ask, json.dumps(body).encode(), qos=1)
            reply, _ = await req.reply()  # the good one is answered: the bad one did not block it
            assert reply["answer"] == "you asked: q"
            seen = []
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.3):
                    async for message in spy.messages:
                        if not message.retain:
                            seen.append(message)
        assert [m for m in seen if str(m.topic) != Topics(prefix).ask] == []
        assert len([m for m in seen if str(m.topic) == Topics(prefix).ask]) <= 2  # only the requester's own
        assert api.counters["bad_reply_topic"] == 1
        assert api.counters["replies_queued"] == 0
        if reply_to == f"{prefix}/available":
            assert (await retained(*broker, reply_to))[reply_to] == b"online"
        await _still_serving(req, api)


async def test_reply_topics_allow_list(broker, prefix):
    settings = settings_for(*broker, prefix, reply_topics=[f"{prefix}/reply/+"])
    api = MqttApi(settings, tz=TZ, cameras=CAMERAS, answer=echo_answer)
    async with (
        running(api),
        Requester(*broker, prefix) as req,
        Requester(*broker, prefix, reply_topic=f"{prefix}/elsewhere") as other,
    ):
        await other.ask({"question": "refused"})
        await req.ask({"question": "allowed"})
        reply, _ = await req.reply()
    assert reply["answer"] == "you asked: allowed"
    assert other.replies.empty()
    assert api.counters["bad_reply_topic"] == 1


async def test_error_replies_do_not_hold_question_slots(broker, prefix):
    # Before: each error reply ran as a job counted against max_in_flight while it waited for its
    # PUBACK, so a burst of bad requests made the next valid question "busy". Each request has
    # its own reply topic (its own rate budget), so only the slots are under test.
    api = MqttApi(settings_for(*broker, prefix, max_in_flight=1), tz=TZ, cameras=CAMERAS, answer=echo_answer)
    replies: dict[str, dict[str, Any]] = {}
    async with running(api), aiomqtt.Client(*broker, protocol=aiomqtt.ProtocolVersion.V5) as client:
        await client.subscribe(f"{prefix}/r/#", qos=1)
        for i in range(30):
            await client.publish(Topics(prefix).ask, b"{bad", qos=0, properties=_v5_props(f"{prefix}/r/e{i}", b"e"))
        await client.publish(
            Topics(prefix).ask, b'{"question": "valid"}', qos=0, properties=_v5_props(f"{prefix}/r/v", b"v")
        )
        async with asyncio.timeout(WAIT_S):
            async for message in client.messages:
                assert isinstance(message.payload, bytes)
                replies[str(message.topic).rsplit("/", 1)[1]] = json.loads(message.payload)
                if len(replies) == 31:
                    break
    assert replies["v"].get("answer") == "you asked: valid", replies["v"]
    assert all(replies[f"e{i}"]["error"]["code"] == "bad_json" for i in range(30))


async def test_requester_over_its_rate_gets_busy(broker, prefix):
    settings = settings_for(*broker, prefix, client_rate_per_s=0.01, client_burst=3)
    api = MqttApi(settings, tz=TZ, cameras=CAMERAS, answer=echo_answer)
    async with running(api), Requester(*broker, prefix) as req, Requester(*broker, prefix) as other:
        for i in range(5):
            await req.ask({"question": f"q{i}"}, correlation=b"%d" % i)
        codes = {}
        for _ in range(5):
            body, message = await req.reply()
            codes[message.properties.CorrelationData] = body.get("error", {}).get("code", "answered")
        await other.ask({"question": "me too"})  # another reply address has its own budget
        body, _ = await other.reply()
    assert sorted(codes.values()) == ["answered"] * 3 + ["busy"] * 2
    assert body["answer"] == "you asked: me too"
    assert api.counters["rate_limited"] == 2


async def test_a_publish_that_fails_for_its_topic_is_dropped_not_queued(broker, prefix):
    # Before: any failed publish went to the outbox, and the reconnect flush raised on it forever.
    api = MqttApi(settings_for(*broker, prefix), tz=TZ, cameras=CAMERAS, answer=echo_answer)
    async with running(api), Requester(*broker, prefix) as req:
        await api._send(_Outgoing("bad/+/topic", b"{}", None))
        assert api.counters["replies_failed"] == 1
        assert api.counters["replies_queued"] == 0
        await _still_serving(req, api)


def _v5_props(topic: str, correlation: bytes) -> Properties:
    props = Properties(PacketTypes.PUBLISH)
    props.ResponseTopic = topic
    props.CorrelationData = correlation
    return props


async def test_packets_over_the_announced_maximum_never_reach_vigil(broker, prefix):
    # CONNECT announces Maximum Packet Size 4 x max_payload_bytes (at least 1 MiB): the broker
    # drops bigger packets for vigil instead of making it read them.
    settings = settings_for(*broker, prefix, max_payload_bytes=1024)
    api = MqttApi(settings, tz=TZ, cameras=CAMERAS, answer=echo_answer)
    assert max_packet_bytes(1024) == 1 << 20
    async with running(api), Requester(*broker, prefix) as req:
        await req.ask(b'{"question": "' + b"x" * (2 << 20) + b'"}', correlation=b"huge")
        await req.ask(b'{"question": "' + b"x" * 4096 + b'"}', correlation=b"big")
        reply, message = await req.reply()
        assert message.properties.CorrelationData == b"big"
        assert reply["error"]["code"] == "payload_too_large"
        await _still_serving(req, api)
    assert api.counters["requests"] == 2  # "big" and "still there?": the 2 MiB one never arrived
