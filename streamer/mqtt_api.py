"""The question service over MQTT: requests on ``{prefix}/ask`` and ``{prefix}/events/query``,
availability, camera states, Home Assistant discovery.

Protocol (docs/api.md has the full reference):

* MQTT v5 requests carry a Response Topic and Correlation Data; the reply goes to that topic with
  the same Correlation Data. MQTT v3.1.1 requests have no properties, so they put ``reply_to`` and
  ``id`` in the JSON body and the reply repeats the ``id``. One v5 connection serves both kinds.
* Every request gets a reply: an answer, or ``{"error": {"code", "message"}}``. A request without
  any reply address is logged and counted.
* ``{prefix}/available`` is retained ``online`` while connected, with ``offline`` as the last
  will and as the last thing published on a clean stop. Camera states are retained on
  ``{prefix}/cameras/{name}/state`` and re-published after every reconnect.
* ``{prefix}/events/query`` follows the same request/response rules (size, schema, reply address,
  rate limit, ``max_in_flight``); its reply lists stored events (streamer/events.py).
* Home Assistant discovery (streamer/discovery.py): the retained device config is published on
  connect (before ``online``), when Home Assistant's birth ``{discovery_prefix}/status`` =
  ``online`` arrives, and on :meth:`MqttApi.publish_discovery` (the watches changed). vigil also
  reads its own retained config back, so components of watches removed while it was down are
  removed too.

Connection: aiomqtt 2.5 does not reconnect by itself, so :meth:`MqttApi.run` is a loop around
``async with client`` with exponential backoff and jitter. The session is persistent
(clean_start False + Session Expiry) so QoS 1 questions the broker queued while vigil was
away are delivered when it is back. Replies that cannot be published while the broker is away
wait in a bounded outbox and go out after the reconnect. Delivery is QoS 1, at least once: after
a reconnect a reply may arrive twice, and requesters match replies by correlation id.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import socket
import ssl
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from zoneinfo import ZoneInfo

import aiomqtt
import paho.mqtt.client as paho
from paho.mqtt.exception import MQTTException
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from redis.exceptions import RedisError

from memory.aio import wait_set
from memory.events import EventStore
from memory.store import REDIS_AWAY_ERRORS
from retrieval.answer import Answer, Question
from streamer.backoff import backoff_delays
from streamer.discovery import announced, components, device_config
from streamer.events import event_payload
from streamer.requests import (
    AskRequest,
    EventsQuery,
    EventsQueryRequest,
    RequestError,
    decode_object,
    decode_request,
    reply_topic_problem,
    to_events_query,
    to_question,
)
from streamer.settings import DiscoverySettings, MqttSettings
from streamer.timefmt import iso_time
from streamer.topics import HOME_ASSISTANT_PREFIX, Topics

log = logging.getLogger(__name__)

AnswerFn = Callable[[Question, Callable[[str], Awaitable[None]] | None], Awaitable[Answer]]


class WatchControl(Protocol):
    """What the API asks of the watches (streamer/watch_service.py) for ``{prefix}/watches/NAME/set``."""

    async def apply(self, name: str, body: dict[str, Any] | None) -> dict[str, Any]:
        """Add or change (``body``) or remove (None) a watch; the reply body, or RequestError."""
        ...


QOS = 1  # questions, answers and retained state: at least once (see the module docstring)
RECONNECT_INITIAL_S = 0.5  # first retry comes fast: a broker restart takes about a second
CONNECT_TIMEOUT_S = 10.0  # CONNACK, SUBACK and PUBACK waits; a broker slower than this is down
# How long the broker keeps our session (subscription + queued QoS 1 questions) while we are away:
# long enough to cover a restart of vigil by systemd, short enough not to answer stale questions.
SESSION_EXPIRY_S = 600
OUTBOX_SIZE = 256  # replies held while disconnected; the oldest is dropped beyond this
INBOX_SIZE = 256  # received messages not yet dispatched; aiomqtt drops (and we count) beyond this
DRAIN_TIMEOUT_S = 10.0  # on stop: how long running answers may finish before they are cancelled
JSON_CONTENT_TYPE = "application/json"
# Error replies being published at once; beyond this a flood's error replies are dropped and
# counted (they are cheap, but each is a task and a PUBACK wait).
MAX_PENDING_ERRORS = 1024
# Requesters whose rate is tracked; the least recently seen is forgotten beyond this, so a flood of
# made-up reply addresses costs bounded memory.
MAX_TRACKED_CLIENTS = 4096
# The largest packet vigil accepts from the broker (MQTT v5 Maximum Packet Size): the broker drops
# bigger ones without sending them. Requests between max_payload_bytes and this get
# payload_too_large (a response topic and correlation data of up to 64 KiB each fit beside them).
MIN_MAX_PACKET_BYTES = 1 << 20
# Home Assistant asks that discovery after its birth message wait a random delay, so that every
# device does not publish at once (home-assistant.io/integrations/mqtt, "Birth and last will").
DISCOVERY_JITTER_S = 1.0
HA_ONLINE = b"online"  # Home Assistant's default birth payload
# paho's publish results that mean the connection is gone (the reply waits in the outbox then).
CONNECTION_RCS = frozenset({paho.MQTT_ERR_NO_CONN, paho.MQTT_ERR_CONN_LOST})


def max_packet_bytes(max_payload_bytes: int) -> int:
    """The Maximum Packet Size vigil announces for a payload limit of ``max_payload_bytes``."""
    return max(MIN_MAX_PACKET_BYTES, 4 * max_payload_bytes)


# A flood of bad requests must not become a flood of log lines: per kind of refusal, one line
# per this interval, saying how many were not logged since.
LOG_INTERVAL_S = 10.0


class LogThrottle:
    """At most one log line per key and interval; counts the lines it held back."""

    def __init__(self, interval_s: float = LOG_INTERVAL_S, clock: Callable[[], float] = time.monotonic) -> None:
        self._interval_s = interval_s
        self._clock = clock
        self._next_s: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def log(self, key: str, level: int, msg: str, *args: object) -> None:
        now_s = self._clock()
        if now_s < self._next_s.get(key, 0.0):
            self._held[key] = self._held.get(key, 0) + 1
            return
        self._next_s[key] = now_s + self._interval_s
        held = self._held.pop(key, 0)
        if held:
            msg += f" (and {held} more like it in the last {self._interval_s:g} s)"
        log.log(level, msg, *args)


class TokenBucket:
    """Per-key token buckets (rate ``rate_per_s``, capacity ``burst``), at most ``max_keys`` kept."""

    def __init__(self, rate_per_s: float, burst: int, *, max_keys: int = MAX_TRACKED_CLIENTS) -> None:
        self._rate = rate_per_s
        self._burst = float(burst)
        self._max_keys = max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key → (tokens, at_s)

    def take(self, key: str, now_s: float) -> bool:
        """Spend one token of ``key``; False when it has none left."""
        tokens, at_s = self._buckets.pop(key, (self._burst, now_s))
        tokens = min(self._burst, tokens + (now_s - at_s) * self._rate)
        allowed = tokens >= 1.0
        self._buckets[key] = (tokens - 1.0 if allowed else tokens, now_s)
        if len(self._buckets) > self._max_keys:
            self._buckets.popitem(last=False)
        return allowed


@dataclass(frozen=True)
class ReplyTo:
    """Where a request's replies go: the topic, the v5 correlation data, the v3.1.1 body id."""

    topic: str
    correlation: bytes | None
    request_id: Any


@dataclass(frozen=True)
class _Outgoing:
    topic: str
    payload: bytes
    correlation: bytes | None
    retain: bool = False


def answer_payload(answer: Answer, tz: ZoneInfo) -> dict[str, Any]:
    """The JSON body of an answer (times ISO 8601 with the configured zone's offset)."""
    return {
        "answer": answer.text,
        "citations": [
            {
                "camera": c.camera,
                "start": iso_time(c.start_s, tz),
                "end": iso_time(c.end_s, tz),
                "score": round(c.score, 4),
            }
            for c in answer.citations
        ],
        "window": {
            "after": None if answer.after_s is None else iso_time(answer.after_s, tz),
            "before": None if answer.before_s is None else iso_time(answer.before_s, tz),
            "phrase": answer.window_phrase,
        },
        "offline": [
            {
                "camera": o.camera,
                "start": iso_time(o.start_s, tz),
                "end": None if o.end_s is None else iso_time(o.end_s, tz),
            }
            for o in answer.offline
        ],
        "about_now": answer.about_now,
        "fresh": answer.fresh,
        "age_s": None if answer.age_s is None else round(answer.age_s, 1),
        "latest": [
            {"camera": m.camera, "end": iso_time(m.end_s, tz), "age_s": round(m.age_s, 1), "fresh": m.fresh}
            for m in answer.latest
        ],
        "timing_ms": {name: round(ms, 2) for name, ms in answer.timing_ms.items()},
    }


def error_payload(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


# What a publish raises: the client's errors (lost connection, refused, no PUBACK in time) and
# paho's for a packet it cannot build from a client's input (topic, correlation data). Anything
# else is a bug and ends the daemon.
PUBLISH_ERRORS: tuple[type[Exception], ...] = (aiomqtt.MqttError, MQTTException, ValueError, TypeError, OSError)


def _connection_failure(exc: BaseException) -> bool:
    """Whether a failed publish means the connection is gone (retry after reconnect) or the reply is bad."""
    if isinstance(exc, aiomqtt.MqttCodeError):
        return exc.rc in CONNECTION_RCS
    # A PUBACK that did not come in time: the broker or the path to it is in trouble.
    return isinstance(exc, aiomqtt.MqttError | TimeoutError | OSError)


async def _first_of(*tasks: asyncio.Future[Any]) -> None:
    """Wait until one of ``tasks`` is done, then cancel the others and wait for them to end."""
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class MqttApi:
    """Serves questions over MQTT and publishes vigil's availability and camera states."""

    def __init__(
        self,
        settings: MqttSettings,
        *,
        tz: ZoneInfo,
        cameras: Sequence[str] | Callable[[], Sequence[str]],
        answer: AnswerFn,
        events: EventStore | None = None,
        discovery: DiscoverySettings | None = None,
        watches: Callable[[], Mapping[str, Sequence[str]]] = dict,
        session_expiry_s: int = SESSION_EXPIRY_S,
        outbox_size: int = OUTBOX_SIZE,
        drain_timeout_s: float = DRAIN_TIMEOUT_S,
        discovery_jitter_s: float = DISCOVERY_JITTER_S,
    ) -> None:
        """``events``: the store ``{prefix}/events/query`` reads (None: not served). ``discovery``:
        Home Assistant discovery (None: off, nothing published). ``watches``: the current watches,
        name → cameras, asked each time the discovery config is built (default: none)."""
        self._settings = settings
        self._events = events
        self._discovery = discovery
        self._discovery_watches = watches
        self._discovery_jitter_s = discovery_jitter_s
        self._tz = tz
        # The names a question may use: a fixed list, or a provider asked per request (the daemon
        # adds cameras that have memory only through `vigil import`).
        self._cameras: Callable[[], Sequence[str]]
        if callable(cameras):
            self._cameras = cameras
        else:
            names = list(cameras)
            self._cameras = lambda: names
        self._answer = answer
        self._drain_timeout_s = drain_timeout_s
        self.topics = Topics(
            settings.topic_prefix, discovery_prefix=discovery.prefix if discovery else HOME_ASSISTANT_PREFIX
        )
        self.ask_topic = self.topics.ask
        self.available_topic = self.topics.available
        self.status_topic = self.topics.status
        self._rates = TokenBucket(settings.client_rate_per_s, settings.client_burst)
        self._throttle = LogThrottle()
        self._states: dict[str, bytes] = {}
        self._status: bytes | None = None  # the daemon's retained status, re-published on connect
        self._outbox: deque[_Outgoing] = deque()
        self._outbox_size = outbox_size
        self._jobs: set[asyncio.Task[None]] = set()  # answers: these hold max_in_flight slots
        self._error_replies: set[asyncio.Task[None]] = set()  # error replies: no slot, bounded apart
        # Discovery: component id → platform of what the retained config announces now, so that a
        # component that goes is removed explicitly; one re-announcement pending at a time, so a
        # flood of birth messages costs one publish.
        self._announced: dict[str, str] = {}
        self._discovery_lock = asyncio.Lock()
        self._discovery_task: asyncio.Task[None] | None = None
        self._watches: WatchControl | None = None  # set by serve_watches()
        self._watch_jobs: set[asyncio.Task[None]] = set()  # watch changes being applied (bounded apart)
        self._retained: dict[str, bytes] = {}  # watch topics → retained payload (b"": cleared)
        self._client: aiomqtt.Client | None = None  # set while connected
        self._lost = asyncio.Event()  # set when the current connection drops
        self._stopping = False
        self._rng = random.Random()
        self.counters: dict[str, int] = dict.fromkeys(
            (
                "requests",
                "answered",
                "events_queried",
                "discovery_published",
                "errors",
                "unanswerable",
                "bad_reply_topic",
                "rate_limited",
                "errors_dropped",
                "replies_failed",
                "replies_queued",
                "outbox_dropped",
                "inbox_dropped",
                "connects",
                "watch_sets",
                "watch_sets_dropped",
            ),
            0,
        )
        self._mqtt = self._make_client(session_expiry_s)

    # ------------------------------------------------------------------ connection

    def _make_client(self, session_expiry_s: int) -> aiomqtt.Client:
        s = self._settings
        connect_props = Properties(PacketTypes.CONNECT)
        connect_props.SessionExpiryInterval = session_expiry_s
        connect_props.MaximumPacketSize = max_packet_bytes(s.max_payload_bytes)
        tls_params = None
        if s.tls:
            tls_params = aiomqtt.TLSParameters(
                ca_certs=str(s.tls_ca_file) if s.tls_ca_file else None, cert_reqs=ssl.CERT_REQUIRED
            )
        api = self

        class _Inbox(asyncio.Queue[aiomqtt.Message]):
            """aiomqtt's incoming queue, bounded; overflow is counted here and logged by aiomqtt."""

            def put_nowait(self, item: aiomqtt.Message) -> None:
                try:
                    super().put_nowait(item)
                except asyncio.QueueFull:
                    api.counters["inbox_dropped"] += 1
                    raise

        return aiomqtt.Client(
            s.host,
            s.port,
            username=s.username,
            password=s.password.get_secret_value() if s.password else None,
            identifier=s.client_id,
            protocol=aiomqtt.ProtocolVersion.V5,
            will=aiomqtt.Will(self.available_topic, b"offline", qos=QOS, retain=True),
            clean_start=False,
            properties=connect_props,
            keepalive=s.keepalive_s,
            timeout=CONNECT_TIMEOUT_S,
            queue_type=_Inbox,
            max_queued_incoming_messages=INBOX_SIZE,
            tls_params=tls_params,
            # Without TCP_NODELAY a QoS 1 round trip waits ~40-88 ms on Nagle + delayed ACK
            # (docs/api.md, Latency); the broker side is set in configs/mosquitto.conf.
            socket_options=((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),),
        )

    @property
    def connected(self) -> bool:
        return self._client is not None

    @property
    def in_flight(self) -> int:
        return len(self._jobs)

    async def run(self, stop: asyncio.Event, ready: asyncio.Event | None = None) -> None:
        """Connect, serve and reconnect until ``stop`` is set; then drain and go offline."""
        s = self._settings
        delays = backoff_delays(RECONNECT_INITIAL_S, s.reconnect_max_s, self._rng)
        failures = 0  # failed attempts since the last successful connection
        try:
            while not stop.is_set():
                try:
                    async with self._mqtt as client:
                        await self._on_connect(client)
                        delays = backoff_delays(RECONNECT_INITIAL_S, s.reconnect_max_s, self._rng)
                        failures = 0
                        if ready is not None:
                            ready.set()
                        if await self._serve(client, stop):
                            await self._shutdown(client)
                            return
                except aiomqtt.MqttError as exc:
                    self._connection_lost()
                    delay = next(delays)
                    # One warning per outage; the retries while it lasts are debug lines.
                    level = logging.WARNING if failures == 0 else logging.DEBUG
                    failures += 1
                    log.log(
                        level,
                        "MQTT broker %s:%d unreachable or lost (%s); retrying in %.1f s",
                        s.host,
                        s.port,
                        exc,
                        delay,
                    )
                    await wait_set(stop, delay)
                finally:
                    self._connection_lost()
            await self._cancel_jobs()
        finally:
            log.info(
                "MQTT API stopped: %s, %d repl(ies) still queued",
                ", ".join(f"{k}={v}" for k, v in self.counters.items()),
                len(self._outbox),
            )

    async def _on_connect(self, client: aiomqtt.Client) -> None:
        """Subscribe, re-publish retained state and queued replies, then announce ``online``."""
        self.counters["connects"] += 1
        await client.subscribe(self.ask_topic, qos=QOS)
        if self._events is not None:
            await client.subscribe(self.topics.events_query, qos=QOS)
        if self._discovery_on:
            # The retained config comes back first: what it announces that is gone now is removed.
            await client.subscribe(self._discovery_topic, qos=QOS)
            await client.subscribe(self.topics.discovery_status, qos=QOS)
        if self._watches is not None:
            await client.subscribe(self.topics.watch_sets, qos=QOS)
        self._lost = asyncio.Event()
        self._client = client
        for camera, payload in list(self._states.items()):
            await client.publish(self.topics.camera_state(camera), payload, qos=QOS, retain=True)
        for topic, payload in list(self._retained.items()):
            await client.publish(topic, payload, qos=QOS, retain=True)
            if not payload and self._retained.get(topic) == b"":
                del self._retained[topic]
        if self._status is not None:
            await client.publish(self.status_topic, self._status, qos=QOS, retain=True)
        await self._flush_outbox()
        if self._discovery_on:
            await self._publish_discovery(client)
        elif self._discovery is not None:
            # Turned off: an empty retained config makes Home Assistant remove the device.
            await client.publish(self._discovery_topic, b"", qos=QOS, retain=True)
        await client.publish(self.available_topic, b"online", qos=QOS, retain=True)
        log.info(
            "MQTT connected to %s:%d as %s; serving %s",
            self._settings.host,
            self._settings.port,
            self._settings.client_id,
            self.ask_topic,
        )

    def _connection_lost(self) -> None:
        self._client = None
        self._lost.set()

    async def _serve(self, client: aiomqtt.Client, stop: asyncio.Event) -> bool:
        """Dispatch messages until stop (returns True) or the connection drops (MqttError)."""
        reader = asyncio.create_task(self._read(client), name="mqtt:read")
        stopper = asyncio.create_task(stop.wait(), name="mqtt:stop")
        await _first_of(reader, stopper)
        if stopper.done() and not stopper.cancelled():
            return True
        # Publishes waiting for a PUBACK on the dead connection give up now, into the outbox.
        self._connection_lost()
        exc = reader.exception() if not reader.cancelled() else None
        raise exc if exc is not None else aiomqtt.MqttError("message stream ended")

    async def _read(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            self._route(message)

    def _route(self, message: aiomqtt.Message) -> None:
        """Hand one received message to its handler; never raises for any payload."""
        topic = message.topic
        if topic.matches(self.ask_topic):
            self._dispatch(message, AskRequest)
        elif self._events is not None and topic.matches(self.topics.events_query):
            self._dispatch(message, EventsQueryRequest)
        elif self._watches is not None and topic.matches(self.topics.watch_sets):
            self._dispatch_watch(message)
        elif self._discovery_on and not self._stopping:
            if topic.matches(self.topics.discovery_status):
                if message.payload == HA_ONLINE:
                    self._announce_soon(self._discovery_jitter_s * self._rng.random())
            elif topic.matches(self._discovery_topic):
                self._read_back(message.payload)

    async def _shutdown(self, client: aiomqtt.Client) -> None:
        """Staged stop: no new questions, running answers finish (with a deadline), go offline.

        The subscription stays in the persistent session, so questions asked while vigil is down
        are queued by the broker and answered after the restart. Questions already received but
        not started are refused with ``shutdown`` (the client library acknowledged them).
        """
        self._stopping = True
        messages = client.messages
        for _ in range(len(messages)):
            message = await anext(messages)  # already queued: does not wait
            self._route(message)
        if self._jobs or self._error_replies or self._watch_jobs:
            log.info("waiting up to %.0f s for %d answer(s) in flight", self._drain_timeout_s, len(self._jobs))
            await asyncio.wait({*self._jobs, *self._error_replies, *self._watch_jobs}, timeout=self._drain_timeout_s)
        await self._cancel_jobs()
        with contextlib.suppress(aiomqtt.MqttError):
            await client.publish(self.available_topic, b"offline", qos=QOS, retain=True)

    async def _cancel_jobs(self) -> None:
        tasks = [*self._jobs, *self._error_replies, *self._watch_jobs]
        if self._discovery_task is not None:
            tasks.append(self._discovery_task)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    # ------------------------------------------------------------------ publishing

    async def publish_camera_state(self, camera: str, state: dict[str, Any]) -> None:
        """Retain ``state`` on the camera's topic now if connected, and after every reconnect."""
        payload = json.dumps(state, separators=(",", ":"), default=str).encode()
        self._states[camera] = payload
        client = self._client
        if client is None:
            return
        try:
            await client.publish(
                self.topics.camera_state(camera), payload, qos=QOS, retain=True, timeout=CONNECT_TIMEOUT_S
            )
        except aiomqtt.MqttError as exc:
            # Remembered above; _on_connect publishes it again.
            log.debug("camera state of %s not published now (%s); will be after reconnect", camera, exc)

    async def publish_status(self, status: dict[str, Any]) -> None:
        """Retain the daemon's ``status`` (health, counters) now if connected, and after every reconnect."""
        payload = json.dumps(status, separators=(",", ":"), default=str).encode()
        self._status = payload
        client = self._client
        if client is None:
            return
        try:
            await client.publish(self.status_topic, payload, qos=QOS, retain=True, timeout=CONNECT_TIMEOUT_S)
        except aiomqtt.MqttError as exc:
            log.debug("status not published now (%s); will be after reconnect", exc)

    @property
    def _discovery_on(self) -> bool:
        return self._discovery is not None and self._discovery.enabled

    @property
    def _node_id(self) -> str:
        assert self._discovery is not None
        return self._discovery.node_id_for(self._settings.client_id)

    @property
    def _discovery_topic(self) -> str:
        return self.topics.discovery_config(self._node_id)

    async def publish_discovery(self) -> None:
        """Announce the device with the current watches and cameras now (retained), removing the
        components of watches that are gone. Call it when the watches change. Without a connection
        it does nothing: every connect announces again."""
        client = self._client
        if client is None or not self._discovery_on:
            return
        try:
            await self._publish_discovery(client)
        except PUBLISH_ERRORS as exc:
            log.warning("discovery config not published now (%s: %s); will be after reconnect", type(exc).__name__, exc)

    async def _publish_discovery(self, client: aiomqtt.Client) -> None:
        """Publish the device config; a component that went is first sent alone as ``{"platform": P}``."""
        node_id = self._node_id
        async with self._discovery_lock:
            cameras, watches = list(self._cameras()), dict(self._discovery_watches())
            config = device_config(self.topics, node_id, cameras=cameras, watches=watches, removed=self._announced)
            if any(set(comp) == {"platform"} for comp in config["components"].values()):
                await self._publish_config(client, config)
                config = device_config(self.topics, node_id, cameras=cameras, watches=watches)
            await self._publish_config(client, config)
            self._announced = {cid: comp["platform"] for cid, comp in config["components"].items()}
            self.counters["discovery_published"] += 1

    async def _publish_config(self, client: aiomqtt.Client, config: dict[str, Any]) -> None:
        payload = json.dumps(config, separators=(",", ":")).encode()
        await client.publish(self._discovery_topic, payload, qos=QOS, retain=True, timeout=CONNECT_TIMEOUT_S)

    def _announce_soon(self, delay_s: float) -> None:
        """Publish the discovery config after ``delay_s``, unless a publish is pending already."""
        if self._discovery_task is not None and not self._discovery_task.done():
            return

        async def announce() -> None:
            await asyncio.sleep(delay_s)
            await self.publish_discovery()

        self._discovery_task = asyncio.create_task(announce(), name="mqtt:discovery")

    def _read_back(self, payload: object) -> None:
        """Our retained config as the broker has it: components it announces that are gone now
        (a watch removed while vigil was down) are remembered for removal and removed."""
        if not isinstance(payload, bytes | bytearray) or not payload:
            return
        try:
            config = json.loads(payload)
        except (ValueError, RecursionError):  # anyone may publish there: bad JSON is ignored
            self._throttle.log("discovery_read_back", logging.WARNING, "unreadable discovery config ignored")
            return
        found = announced(config)
        current = components(self.topics, self._node_id, list(self._cameras()), dict(self._discovery_watches()))
        stale = {cid: platform for cid, platform in found.items() if cid not in current}
        if stale:
            log.info(
                "discovery: removing %d component(s) of an earlier config: %s", len(stale), ", ".join(sorted(stale))
            )
            self._announced.update(stale)
            self._announce_soon(0.0)

    async def publish_retained(self, topic: str, payload: bytes) -> None:
        """Retain ``payload`` on a watch topic now if connected, and after every reconnect.

        An empty payload clears the topic (MQTT deletes a retained message that way); a clear that
        could not be sent is sent after the reconnect, one that was sent is forgotten (removals of
        made-up names must not pile up here).
        """
        self._retained[topic] = payload
        client = self._client
        if client is None:
            return
        try:
            await client.publish(topic, payload, qos=QOS, retain=True, timeout=CONNECT_TIMEOUT_S)
        except aiomqtt.MqttError as exc:
            log.debug("%s not published now (%s); will be after reconnect", topic, exc)
            return
        if not payload and self._retained.get(topic) == b"":
            del self._retained[topic]

    async def publish_event(self, body: dict[str, Any]) -> None:
        """One watch event on ``{prefix}/events``; held in the outbox while the broker is away."""
        payload = json.dumps(body, separators=(",", ":")).encode()
        await self._send(_Outgoing(self.topics.events, payload, None))

    async def _send(self, out: _Outgoing) -> None:
        """Publish now, or keep it in the outbox until the next connection.

        aiomqtt waits for the PUBACK until its timeout even when the connection has dropped, so
        the wait also ends when the run loop sees the connection go.
        """
        client, lost = self._client, self._lost
        if client is not None:
            publish = asyncio.ensure_future(self._publish(client, out))
            gone = asyncio.ensure_future(lost.wait())
            await _first_of(publish, gone)
            if publish.done() and not publish.cancelled() and publish.exception() is None:
                return
            exc = None if publish.cancelled() else publish.exception()
            if exc is not None and not isinstance(exc, PUBLISH_ERRORS):
                raise exc
            if exc is not None and not lost.is_set() and not _connection_failure(exc):
                # Not the connection: the same publish would fail again after a reconnect, and a
                # reply that fails every flush would hold the outbox (and the reconnect) forever.
                self.counters["replies_failed"] += 1
                log.warning("reply to %r failed and is dropped: %s: %s", out.topic[:200], type(exc).__name__, exc)
                return
            why = "connection lost" if exc is None else exc
            log.info("reply to %s not published (%s); queued for after reconnect", out.topic, why)
        self._enqueue(out)

    async def _publish(self, client: aiomqtt.Client, out: _Outgoing) -> None:
        await client.publish(
            out.topic, out.payload, qos=QOS, retain=out.retain, properties=self._props(out), timeout=CONNECT_TIMEOUT_S
        )

    def _enqueue(self, out: _Outgoing) -> None:
        if len(self._outbox) >= self._outbox_size:
            dropped = self._outbox.popleft()
            self.counters["outbox_dropped"] += 1
            log.warning("outbox full (%d): dropped the oldest reply to %s", self._outbox_size, dropped.topic)
        self._outbox.append(out)
        self.counters["replies_queued"] += 1

    async def _flush_outbox(self) -> None:
        client = self._client
        if client is None or not self._outbox:
            return
        log.info("publishing %d repl(ies) queued while disconnected", len(self._outbox))
        while self._outbox and self._client is client:
            out = self._outbox[0]
            try:
                await self._publish(client, out)
            except PUBLISH_ERRORS as exc:
                if _connection_failure(exc):
                    raise  # the connection went again: the reply stays first in the outbox
                self.counters["replies_failed"] += 1
                log.warning("queued reply to %r failed, dropped: %s: %s", out.topic[:200], type(exc).__name__, exc)
            self._outbox.popleft()

    @staticmethod
    def _props(out: _Outgoing) -> Properties:
        props = Properties(PacketTypes.PUBLISH)
        props.ContentType = JSON_CONTENT_TYPE
        if out.correlation is not None:
            props.CorrelationData = out.correlation
        return props

    async def _reply(self, to: ReplyTo, body: dict[str, Any]) -> None:
        if to.request_id is not None:
            body = {"id": to.request_id, **body}
        payload = json.dumps(body, separators=(",", ":")).encode()
        await self._send(_Outgoing(to.topic, payload, to.correlation))

    # ------------------------------------------------------------------ requests

    def _dispatch(self, message: aiomqtt.Message, schema: type[AskRequest] | type[EventsQueryRequest]) -> None:
        """Validate a request (a question or an event query) and start its job, or reply with the error at once.

        Never raises for any payload or properties: a request is answered, refused with an
        error reply, or dropped and counted (no usable reply address, rate limit, error flood).
        """
        self.counters["requests"] += 1
        payload = message.payload
        raw = payload if isinstance(payload, bytes | bytearray) else str(payload).encode("utf-8", "replace")
        props = message.properties
        response_topic = getattr(props, "ResponseTopic", None) if props is not None else None
        correlation = getattr(props, "CorrelationData", None) if props is not None else None
        request = decode_request(bytes(raw), max_bytes=self._settings.max_payload_bytes, schema=schema)
        reply_topic = response_topic if response_topic is not None else request.reply_to
        if reply_topic is None:
            self.counters["unanswerable"] += 1
            self._throttle.log(
                "unanswerable",
                logging.WARNING,
                "request on %s has no reply address (no v5 response topic, no 'reply_to'); dropped",
                message.topic,
            )
            return
        problem = reply_topic_problem(reply_topic, self.topics, self._settings.reply_topics)
        if problem is not None:
            self.counters["bad_reply_topic"] += 1
            self._throttle.log(
                "bad_reply_topic",
                logging.WARNING,
                "request on %s dropped: %s (%r)",
                message.topic,
                problem,
                str(reply_topic)[:200],
            )
            return
        to = ReplyTo(reply_topic, correlation if isinstance(correlation, bytes) else None, request.request_id)
        if not self._rates.take(reply_topic, time.monotonic()):
            self.counters["rate_limited"] += 1
            self._refuse(
                to,
                RequestError(
                    "busy",
                    f"more than {self._settings.client_rate_per_s:g} requests/s (burst "
                    f"{self._settings.client_burst}) to this reply address; slow down",
                ),
            )
            return
        try:
            if request.error is not None:
                raise request.error
            job: Coroutine[Any, Any, None]
            if isinstance(request.body, EventsQueryRequest):
                query = to_events_query(request.body, tz=self._tz, cameras=self._cameras())
                job = self._query_job(query, to)
            else:
                assert request.ask is not None
                question = to_question(request.ask, tz=self._tz, cameras=self._cameras())
                job = self._job(question, to)
            if self._stopping:
                job.close()
                raise RequestError("shutdown", "vigil is stopping; ask again when it is back online")
            if len(self._jobs) >= self._settings.max_in_flight:
                job.close()
                raise RequestError(
                    "busy", f"{len(self._jobs)} requests are being answered (max_in_flight); ask again later"
                )
        except RequestError as exc:
            self._refuse(to, exc)
            return
        task = asyncio.ensure_future(job)
        self._jobs.add(task)
        task.add_done_callback(self._jobs.discard)

    def _refuse(self, to: ReplyTo, error: RequestError) -> None:
        """Send an error reply without taking a question slot; under a flood, drop and count it."""
        if len(self._error_replies) >= MAX_PENDING_ERRORS:
            self.counters["errors_dropped"] += 1
            self._throttle.log(
                "errors_dropped", logging.WARNING, "%d error replies pending: dropped one", len(self._error_replies)
            )
            return
        task = asyncio.ensure_future(self._fail(to, error.code, error.message))
        self._error_replies.add(task)
        task.add_done_callback(self._error_replies.discard)

    async def _fail(self, to: ReplyTo, code: str, message: str) -> None:
        self.counters["errors"] += 1
        self._throttle.log(f"refused:{code}", logging.INFO, "request to %s refused: %s: %s", to.topic, code, message)
        await self._reply(to, error_payload(code, message))

    async def _job(self, question: Question, to: ReplyTo) -> None:
        """Answer one question and reply; every outcome, failure included, is replied."""
        seq = 0

        async def on_delta(text: str) -> None:
            nonlocal seq
            await self._reply(to, {"delta": text, "seq": seq})
            seq += 1

        try:
            async with asyncio.timeout(self._settings.answer_timeout_s):
                answer = await self._answer(question, on_delta if question.stream else None)
        except TimeoutError:
            await self._fail(to, "timeout", f"no answer within {self._settings.answer_timeout_s:g} s")
            return
        except RequestError as exc:
            await self._fail(to, exc.code, exc.message)
            return
        except asyncio.CancelledError:
            # Stopping: the requester still learns that its question will not be answered.
            with contextlib.suppress(Exception):
                await self._fail(to, "shutdown", "vigil is shutting down")
            raise
        except Exception as exc:
            # One failing answer must not take the service down; the traceback goes to the log.
            log.exception("answering %r failed", question.text)
            await self._fail(to, "internal", f"answering failed: {type(exc).__name__}: {exc}")
            return
        body = answer_payload(answer, self._tz)
        if question.stream:
            body = {"done": True, "seq": seq, **body}
        self.counters["answered"] += 1
        await self._reply(to, body)

    async def _query_job(self, query: EventsQuery, to: ReplyTo) -> None:
        """Read the events of one query and reply; every outcome, failure included, is replied."""
        assert self._events is not None
        try:
            async with asyncio.timeout(self._settings.answer_timeout_s):
                events = await self._events.query(
                    camera=query.camera,
                    watch=query.watch,
                    after_s=query.after_s,
                    before_s=query.before_s,
                    limit=query.limit,
                )
        except TimeoutError:
            await self._fail(to, "timeout", f"no events read within {self._settings.answer_timeout_s:g} s")
            return
        except REDIS_AWAY_ERRORS as exc:
            await self._fail(
                to, "unavailable", f"the event store is unreachable ({type(exc).__name__}); ask again later"
            )
            return
        except RedisError as exc:
            log.error("event query failed: %s: %s", type(exc).__name__, exc)
            await self._fail(to, "internal", f"reading events failed: {type(exc).__name__}")
            return
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await self._fail(to, "shutdown", "vigil is shutting down")
            raise
        self.counters["events_queried"] += 1
        await self._reply(to, {"events": [event_payload(event, self._tz) for event in events]})

    # ------------------------------------------------------------------ watches

    def serve_watches(self, control: WatchControl) -> None:
        """Serve ``{prefix}/watches/NAME/set`` with ``control`` (call before :meth:`run`)."""
        self._watches = control

    def _dispatch_watch(self, message: aiomqtt.Message) -> None:
        """Validate a watch change and apply it, replying when the request names a reply address.

        Same rules as a question: bounded decoding, reply addresses checked, per-requester rate
        limit. An empty payload removes the watch; then only a v5 Response Topic can get the reply.
        A request without a reply address is still applied when valid; an invalid one is logged
        and counted (``unanswerable``). Never raises for any payload.
        """
        self.counters["watch_sets"] += 1  # not "requests": that one counts questions
        name = self.topics.watch_of_set(str(message.topic)) or ""
        payload = message.payload
        raw = payload if isinstance(payload, bytes | bytearray) else str(payload).encode("utf-8", "replace")
        props = message.properties
        response_topic = getattr(props, "ResponseTopic", None) if props is not None else None
        correlation = getattr(props, "CorrelationData", None) if props is not None else None
        body: dict[str, Any] | None = None
        error: RequestError | None = None
        reply_topic, request_id = response_topic, None
        if raw:
            found = decode_object(bytes(raw), max_bytes=self._settings.max_payload_bytes)
            body, error = found.body, found.error
            reply_topic = response_topic if response_topic is not None else found.reply_to
            request_id = found.request_id
        to: ReplyTo | None = None
        if reply_topic is not None:
            problem = reply_topic_problem(reply_topic, self.topics, self._settings.reply_topics)
            if problem is not None:
                self.counters["bad_reply_topic"] += 1
                self._throttle.log(
                    "bad_reply_topic", logging.WARNING, "watch change on %s dropped: %s (%r)",
                    message.topic, problem, str(reply_topic)[:200],
                )  # fmt: skip
                return
            to = ReplyTo(reply_topic, correlation if isinstance(correlation, bytes) else None, request_id)
        if not self._rates.take(reply_topic or self.topics.watch_sets, time.monotonic()):
            self.counters["rate_limited"] += 1
            error = RequestError("busy", f"more than {self._settings.client_rate_per_s:g} requests/s; slow down")
        elif self._stopping:
            error = RequestError("shutdown", "vigil is stopping; change the watch when it is back online")
        elif len(self._watch_jobs) >= MAX_PENDING_ERRORS:
            self.counters["watch_sets_dropped"] += 1
            error = RequestError("busy", f"{len(self._watch_jobs)} watch changes pending; try again later")
        if error is not None:
            self._refuse_watch(to, name, error)
            return
        task = asyncio.ensure_future(self._watch_job(name, body, to))
        self._watch_jobs.add(task)
        task.add_done_callback(self._watch_jobs.discard)

    def _refuse_watch(self, to: ReplyTo | None, name: str, error: RequestError) -> None:
        if to is not None:
            self._refuse(to, error)
            return
        self.counters["unanswerable"] += 1
        self._throttle.log(
            "watch_unanswerable", logging.WARNING, "watch change of %r refused, and it has no reply address: %s: %s",
            name[:70], error.code, error.message,
        )  # fmt: skip

    async def _watch_job(self, name: str, body: dict[str, Any] | None, to: ReplyTo | None) -> None:
        assert self._watches is not None
        try:
            reply = await self._watches.apply(name, body)
        except RequestError as exc:
            if to is None:
                self._refuse_watch(None, name, exc)
            else:
                await self._fail(to, exc.code, exc.message)
            return
        if to is not None:
            await self._reply(to, reply)
