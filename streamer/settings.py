"""vigil's configuration: pydantic models, YAML loading, environment overrides, secrets.

Settings are loaded and validated once, before the event loop starts. Unknown keys are errors,
every field carries a description, units are in the names. Secrets (MQTT and Redis passwords)
never need to be in YAML: they come from the environment or from systemd credentials.

Environment overrides use ``VIGIL_`` plus the key path joined by ``__``, for example
``VIGIL_MQTT__HOST=broker.lan`` or ``VIGIL_CAMERAS__FRONT_DOOR__SAMPLE_FPS=2``. What a value means
depends on the field it sets: text fields (host names, URLs, passwords, prefixes) take it verbatim,
so ``VIGIL_MQTT__PASSWORD='abc #def'`` is that whole string, quotes and all; numbers, booleans and
other typed fields read it as a YAML scalar, so ``VIGIL_MQTT__PORT=8883`` is an integer. An empty
value unsets an optional field.

Error messages never contain a configured value: a value may be a secret, and pydantic's own
messages would print it (``input_value=...``).
"""

from __future__ import annotations

import itertools
import os
import re
import types
import typing
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from streamer.topics import valid_topic_filter

ENV_PREFIX = "VIGIL_"
ENV_SEPARATOR = "__"

# Camera names become MQTT topic levels and parts of Redis keys, so they must not contain
# MQTT wildcards/separators or Redis hash-tag braces. Lower case keeps case-insensitive lookup simple.
# Always used with fullmatch: '$' also matches before a final newline, so match() with '$' accepts "cam\n".
CAMERA_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
TOPIC_PREFIX_RE = re.compile(r"[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*")
# Redis key prefixes: printable, no whitespace, no hash-tag braces (memory/keys.py puts camera names
# in a {tag} after it).
KEY_PREFIX_RE = re.compile(r"[!-z|~]{1,128}")

# Camera URL schemes and the kind of source each opens as (streamer/sources.py opens them).
# No scheme (a path) and file:// are files; lavfi:GRAPH and /dev/videoN are matched by prefix.
SOURCE_SCHEMES: dict[str, Literal["rtsp", "rtmp", "http", "file"]] = {
    "rtsp": "rtsp",
    "rtsps": "rtsp",
    "rtmp": "rtmp",
    "rtmps": "rtmp",
    "http": "http",
    "https": "http",
    "file": "file",
    "": "file",
}
LAVFI_PREFIX = "lavfi:"
V4L2_PREFIX = "/dev/video"


def url_scheme(url: str) -> str:
    """The lower-cased scheme of a camera URL ('' for a plain path); never raises."""
    try:
        return urlsplit(url).scheme.lower()
    except ValueError:  # a malformed IPv6 host: take the text before ':'
        return url.partition(":")[0].lower() if "://" in url else ""


def _check_camera_url(url: str) -> str:
    # The message never repeats the URL: it may hold credentials.
    if url.startswith((LAVFI_PREFIX, V4L2_PREFIX)):
        return url
    if not url.strip():
        raise ValueError("must not be empty")
    scheme = url_scheme(url)
    if scheme not in SOURCE_SCHEMES:
        raise ValueError(
            f"unsupported scheme {scheme!r}: use rtsp, rtsps, rtmp, rtmps, http(s) (HLS, MJPEG), a file path "
            "or file://, /dev/videoN or lavfi:GRAPH"
        )
    if SOURCE_SCHEMES[scheme] != "file":
        try:
            host = urlsplit(url).hostname
        except ValueError:
            raise ValueError("the host is not a valid address (an IPv6 address goes in [brackets])") from None
        if not host:
            raise ValueError(f"a {scheme}:// URL needs a host")
    return url


def _check_camera_name(name: str) -> str:
    if not CAMERA_NAME_RE.fullmatch(name):
        raise ValueError(
            f"camera name {name!r} is invalid: use 1-64 characters of a-z, 0-9, '_' or '-', "
            "starting with a letter or digit (names become MQTT topic levels and Redis keys)"
        )
    return name


CameraName = Annotated[str, AfterValidator(_check_camera_name)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


# Durations of memory tiers ("1d", "12h") and byte sizes of budgets ("2GB", "512MiB"). The unit is
# required: a bare number would leave seconds-or-days and bytes-or-megabytes to guesswork.
_DURATION_RE = re.compile(r"([0-9]+(?:\.[0-9]+)?)(s|m|h|d|w)")
_DURATION_S = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_SIZE_RE = re.compile(r"([0-9]+(?:\.[0-9]+)?) ?(B|kB|KB|MB|GB|TB|KiB|MiB|GiB|TiB)")
_SIZE_BYTES = {
    "B": 1,
    "kB": 10**3,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KiB": 2**10,
    "MiB": 2**20,
    "GiB": 2**30,
    "TiB": 2**40,
}
# More tiers than this is a configuration mistake, not a memory plan (each tier multiplies the grain).
MAX_TIERS = 8


def parse_duration_s(value: object) -> float:
    """'90s', '30m', '12h', '1d', '2w' (or already seconds, from a dumped model) -> seconds > 0."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and (match := _DURATION_RE.fullmatch(value.strip())):
        seconds = float(match[1]) * _DURATION_S[match[2]]
    else:
        raise ValueError("must be a duration with a unit: a number followed by s, m, h, d or w (e.g. 1d)")
    if not 0 < seconds < float("inf"):
        raise ValueError("must be a positive duration")
    return seconds


def parse_size_bytes(value: object) -> int:
    """'2GB', '512MiB', '100 MB' (or already bytes, from a dumped model) -> bytes > 0."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    elif isinstance(value, str) and (match := _SIZE_RE.fullmatch(value.strip())):
        size = int(float(match[1]) * _SIZE_BYTES[match[2]])
    else:
        raise ValueError("must be a size with a unit: a number followed by B, KB, MB, GB, TB, KiB, MiB, GiB or TiB")
    if size <= 0:
        raise ValueError("must be a positive size")
    return size


DurationS = Annotated[float, BeforeValidator(parse_duration_s)]
SizeBytes = Annotated[int, BeforeValidator(parse_size_bytes)]


class TierSettings(_Strict):
    """One consolidation tier: memory older than ``after`` is merged ``merge`` chunks to one."""

    after: DurationS = Field(
        description="Age from which chunks are consolidated into this tier, with a unit (e.g. 1d, 12h); in seconds."
    )
    merge: int = Field(ge=2, le=64, description="Neighbouring chunks of the tier below merged into one.")
    keep_ratio: float = Field(gt=0, le=1, description="Share of the merged chunks' tokens the merge keeps.")


def _check_tiers(tiers: list[TierSettings]) -> list[TierSettings]:
    if len(tiers) > MAX_TIERS:
        raise ValueError(f"at most {MAX_TIERS} tiers")
    for lower, upper in itertools.pairwise(tiers):
        if upper.after <= lower.after:
            raise ValueError("tiers must be ordered by strictly increasing 'after'")
    return tiers


Tiers = Annotated[list[TierSettings], AfterValidator(_check_tiers)]


def _default_tiers() -> list[TierSettings]:
    # Issue 10: 8 chunks (about a minute) to one with an eighth of their tokens after a day, then 8
    # of those (about 8 minutes) to one after a week; a camera-month then fits in about 1 GB.
    return [
        TierSettings.model_validate({"after": "1d", "merge": 8, "keep_ratio": 0.125}),
        TierSettings.model_validate({"after": "7d", "merge": 8, "keep_ratio": 0.125}),
    ]


class MemorySettings(_Strict):
    """How old memory is consolidated and how much of it is kept (issue 10)."""

    tiers: Tiers = Field(
        default_factory=_default_tiers,
        description=(
            "Consolidation tiers in order of age; a camera may set its own. An empty list keeps full "
            "resolution until retention."
        ),
    )
    max_bytes_per_camera: SizeBytes | None = Field(
        default=parse_size_bytes("2GB"),
        description=(
            "Size budget of one camera's memory with a unit (e.g. 2GB); over it, the oldest memory is "
            "consolidated, then deleted. null: no budget."
        ),
    )
    max_bytes: SizeBytes | None = Field(
        default=None, description="Size budget of all cameras' memory together (e.g. 16GB); null: no budget."
    )


class CameraSettings(_Strict):
    """One camera: where to read it and how to sample it."""

    url: Annotated[str, AfterValidator(_check_camera_url)] = Field(
        description=(
            "Source: rtsp://, rtsps://, rtmp://, rtmps://, http(s):// (HLS, MJPEG), a local file path or file://, "
            "a V4L2 device (/dev/videoN) or lavfi:GRAPH (an FFmpeg test source, "
            "e.g. lavfi:testsrc2=size=640x360:rate=10)."
        )
    )
    enabled: bool = Field(default=True, description="Set false to keep the camera configured but not ingested.")
    sample_fps: float = Field(
        default=1.0,
        gt=0,
        le=30,
        description="Frames sampled per second of stream time (by timestamp, not frame count).",
    )
    chunk_s: float = Field(default=8.0, gt=0, le=120, description="Length of a memory chunk in seconds.")
    max_frames_per_chunk: int = Field(
        default=16, ge=1, le=256, description="Cap on frames in one chunk; a chunk closes early when it is reached."
    )
    rtsp_transport: Literal["auto", "tcp", "udp"] = Field(
        default="auto",
        description=(
            "RTSP transport. auto: TCP, and UDP when the camera refuses TCP. TCP survives lossy networks "
            "and NAT; UDP has lower latency."
        ),
    )
    loop: bool = Field(default=False, description="Files only: start again at the end, acting as a live camera.")
    realtime: bool | None = Field(
        default=None,
        description="Files only: pace decoding at real time. Default: true when loop is true, else false.",
    )
    start: datetime | None = Field(
        default=None,
        description=(
            "Files only: wall-clock time of the file's first frame (ISO 8601; naive means the configured "
            "timezone). Default: the container's creation time, else now."
        ),
    )
    open_timeout_s: float = Field(default=10.0, gt=0, description="Give up opening the source after this long.")
    read_timeout_s: float = Field(default=10.0, gt=0, description="Socket read timeout of the demuxer.")
    stall_timeout_s: float = Field(
        default=20.0, gt=0, description="Reconnect when the connection is open but no frame arrived for this long."
    )
    reconnect_initial_s: float = Field(default=1.0, gt=0, description="First reconnect delay.")
    reconnect_max_s: float = Field(default=30.0, gt=0, description="Cap of the exponential reconnect delay.")
    frame_queue_size: int = Field(
        default=32,
        ge=1,
        description="Frames buffered between the decoder thread and the loop; when full the oldest is dropped.",
    )
    retention_days: float = Field(default=7.0, gt=0, description="Memory of this camera older than this is deleted.")
    tiers: Tiers | None = Field(
        default=None, description="This camera's consolidation tiers (same form as memory.tiers); null: memory.tiers."
    )

    @model_validator(mode="after")
    def _backoff_order(self) -> CameraSettings:
        if self.reconnect_max_s < self.reconnect_initial_s:
            raise ValueError("reconnect_max_s must be >= reconnect_initial_s")
        return self

    @property
    def paced(self) -> bool:
        """Whether a file source is decoded at real time (loop implies a live camera)."""
        return self.loop if self.realtime is None else self.realtime


class MqttSettings(_Strict):
    """The MQTT broker and the question API on it."""

    host: str = Field(default="127.0.0.1", description="Broker host name or address.")
    port: int = Field(default=1883, ge=1, le=65535, description="Broker port (8883 is usual with TLS).")
    topic_prefix: str = Field(default="vigil", description="First topic levels of everything vigil publishes.")
    client_id: str = Field(default="vigil", description="MQTT client identifier; unique per vigil instance.")
    username: str | None = Field(default=None, description="Broker user name, if the broker requires one.")
    password: SecretStr | None = Field(
        default=None,
        description="Broker password. Prefer VIGIL_MQTT__PASSWORD or the systemd credential 'mqtt_password'.",
    )
    tls: bool = Field(default=False, description="Connect with TLS.")
    tls_ca_file: Path | None = Field(default=None, description="CA bundle for TLS; the system store when unset.")
    keepalive_s: int = Field(default=30, ge=5, description="MQTT keepalive interval.")
    reconnect_max_s: float = Field(default=30.0, gt=0, description="Cap of the exponential reconnect delay.")
    max_payload_bytes: int = Field(default=65536, ge=256, description="Larger question payloads are refused.")
    max_in_flight: int = Field(default=4, ge=1, description="Questions answered at once; more are refused with 'busy'.")
    answer_timeout_s: float = Field(
        default=120.0, gt=0, description="A question not answered by then gets a timeout error."
    )
    reply_topics: list[str] | None = Field(
        default=None,
        description="Topic filters replies may go to (e.g. 'clients/+/replies'); null: any topic outside vigil's own.",
    )
    client_rate_per_s: float = Field(
        default=5.0, gt=0, description="Requests per second one requester (v5 client / reply address) may sustain."
    )
    client_burst: int = Field(
        default=20, ge=1, description="Requests one requester may send at once before its rate applies."
    )

    @field_validator("reply_topics")
    @classmethod
    def _reply_topics(cls, value: list[str] | None) -> list[str] | None:
        bad = [f for f in value or [] if not valid_topic_filter(f)]
        if bad:
            raise ValueError(f"not MQTT topic filters: {', '.join(map(repr, bad))}")
        return value

    @field_validator("topic_prefix")
    @classmethod
    def _topic(cls, value: str) -> str:
        if not TOPIC_PREFIX_RE.fullmatch(value):
            raise ValueError("must be topic levels of letters, digits, '_' or '-' joined by '/'")
        return value


# Home Assistant's rule for the <node_id>/<object_id> levels of a discovery topic
# (home-assistant.io/integrations/mqtt, "Discovery topic").
DISCOVERY_ID_MAX_CHARS = 64
DISCOVERY_ID_RE = re.compile(rf"[A-Za-z0-9_-]{{1,{DISCOVERY_ID_MAX_CHARS}}}")


class DiscoverySettings(_Strict):
    """Home Assistant MQTT discovery: vigil announces itself as one device (docs/homeassistant.md).

    On by default, as in the other MQTT tools Home Assistant users run (Zigbee2MQTT, ESPHome,
    Tasmota): the device appears without setup in Home Assistant and costs nothing without it
    (a few retained messages under the prefix, which nobody else reads).
    """

    enabled: bool = Field(default=True, description="Publish the retained device discovery config.")
    prefix: str = Field(default="homeassistant", description="Home Assistant's discovery prefix (its own default).")
    node_id: str | None = Field(
        default=None,
        description="Device id in the discovery topic and unique ids; null: mqtt.client_id (unique per instance).",
    )

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if not TOPIC_PREFIX_RE.fullmatch(value):
            raise ValueError("must be topic levels of letters, digits, '_' or '-' joined by '/'")
        return value

    @field_validator("node_id")
    @classmethod
    def _node_id(cls, value: str | None) -> str | None:
        if value is not None and not DISCOVERY_ID_RE.fullmatch(value):
            raise ValueError("must be 1-64 letters, digits, '_' or '-' (Home Assistant's rule for discovery ids)")
        return value

    def node_id_for(self, client_id: str) -> str:
        """The device id: ``node_id``, else the MQTT client id (already unique per instance on a
        broker) with every character Home Assistant does not allow replaced by '_'."""
        if self.node_id is not None:
            return self.node_id
        return re.sub(r"[^A-Za-z0-9_-]", "_", client_id)[:DISCOVERY_ID_MAX_CHARS] or "vigil"


class RedisSettings(_Strict):
    """Redis, where the compressed memory lives (the source of truth)."""

    url: str = Field(default="redis://127.0.0.1:6379/0", description="redis:// or rediss:// URL.")
    password: SecretStr | None = Field(
        default=None,
        description="Redis password. Prefer VIGIL_REDIS__PASSWORD or the systemd credential 'redis_password'.",
    )
    key_prefix: str = Field(default="vigil", description="First part of every Redis key vigil writes.")
    write_buffer_chunks: int = Field(
        default=512,
        ge=1,
        description="Chunks held for retry while Redis is unreachable; older ones are dropped and counted.",
    )

    @field_validator("url")
    @classmethod
    def _scheme(cls, value: str) -> str:
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return value

    @field_validator("key_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if not KEY_PREFIX_RE.fullmatch(value):
            raise ValueError("must be 1-128 printable characters without whitespace or braces")
        return value


class ModelSettings(_Strict):
    """Which models encode frames, embed for retrieval and answer."""

    vlm: str = Field(
        default="llava-hf/llava-onevision-qwen2-0.5b-ov-hf",
        description="Vision-language model: a hub id or a local directory (LLaVA-OneVision or Qwen2.5-VL).",
    )
    embedder: str = Field(
        default="google/siglip-base-patch16-224",
        description="Retrieval embedder with aligned image and text towers (SigLIP): a hub id or a local directory.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(default="auto", description="auto: CUDA when available, else CPU.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto", description="auto: bfloat16 on GPU (float16 where bf16 is unsupported), float32 on CPU."
    )
    encode_batch_frames: int = Field(
        default=8, ge=1, description="Frames from all cameras batched into one encoder call."
    )
    encode_max_wait_ms: float = Field(default=50.0, ge=0, description="Longest a frame waits for its batch to fill.")
    max_new_tokens: int = Field(default=256, ge=1, description="Cap on the length of an answer in tokens.")
    generation_timeout_s: float = Field(default=90.0, gt=0, description="Cap on the time spent generating one answer.")


class CompressionSettings(_Strict):
    """How each chunk's visual tokens are reduced before they are stored."""

    method: Literal["vigil", "uniform", "random"] = Field(
        default="vigil", description="vigil: the streaming compressor; uniform/random: baselines at the same budget."
    )
    keep_ratio: float = Field(
        default=0.04,
        gt=0,
        le=1,
        description=(
            "Share of the encoder's tokens a chunk may keep: a cap, calmer chunks keep fewer. 0.04 with int8 "
            "stays under 20 MB per camera-hour at 1 fps; 0.10 keeps more detail at about twice that "
            "(docs/compression.md)."
        ),
    )
    tau_static: float | None = Field(
        default=None,
        ge=-1,
        le=1,
        description=(
            "Cosine to a cell's run head above which a token counts as unchanged; null: the compressor's "
            "default. Feature-space dependent: calibrate for your model (docs/compression.md)."
        ),
    )
    tau_segment: float | None = Field(
        default=None,
        ge=-1,
        le=1,
        description="Cosine between consecutive frames' global features below which a new scene starts; null: default.",
    )
    skip_unchanged: bool = Field(
        default=True,
        description="Skip the encoder for frames whose pixels did not change; they extend the previous frame.",
    )
    codec: Literal["fp16", "int8"] = Field(
        default="int8",
        description="Storage precision of kept tokens: int8 with per-channel scales (half the bytes of fp16), or fp16.",
    )


class RetrievalSettings(_Strict):
    """How questions find memory."""

    top_k: int = Field(
        default=6, ge=1, le=64, description="Chunks retrieved for a question unless the question sets top_k."
    )
    recent_chunks: int = Field(
        default=2, ge=0, description="Freshest chunks per selected camera added for questions about now."
    )
    max_prompt_chunks: int = Field(default=12, ge=1, description="Cap on chunks placed in one prompt.")


class AnswerSettings(_Strict):
    """How much a prompt may hold (issue 10: long-window questions)."""

    max_prompt_tokens: int = Field(
        default=8192,
        ge=256,
        le=131_072,
        description=(
            "Prompt budget in tokens (text and visual). A question whose time window holds more memory gets "
            "coverage of the whole window at a coarser grain plus the best hits, within it (docs/answering.md). "
            "8192: a quarter of the 32k context of LLaVA-OV's and Qwen2.5-VL's language models, a prefill of "
            "about 40 s on two CPU cores."
        ),
    )


class MetricsSettings(_Strict):
    """The Prometheus endpoint (``/metrics``) and ``/healthz`` (docs/metrics.md)."""

    enabled: bool = Field(default=True, description="Serve /metrics and /healthz over HTTP.")
    host: str = Field(default="127.0.0.1", description="Address to listen on; 0.0.0.0 exposes it to the network.")
    port: int = Field(default=9464, ge=1, le=65535, description="TCP port (9464: the usual port of exporters).")


# Watches (docs/watches.md). A question is one sentence; this bounds the prompt each check adds.
MAX_WATCH_QUESTION_CHARS = 1024
MAX_WATCH_CHUNKS = 1000  # on_after / off_after: a run longer than this is a configuration mistake
MAX_WATCH_COOLDOWN_S = 7 * 86400.0
# Watches in force (config and runtime together): each adds its question to every check of its cameras.
MAX_WATCHES = 64


class WatchSettings(_Strict):
    """A standing yes/no question checked against every new chunk of its cameras (docs/watches.md).

    The same fields arrive as JSON on ``{prefix}/watches/{name}/set`` (validated strictly there:
    streamer/watches.py).
    """

    question: str = Field(
        min_length=1,
        max_length=MAX_WATCH_QUESTION_CHARS,
        description="The yes/no question, e.g. 'Is a person at the door?'.",
    )
    cameras: list[CameraName] | None = Field(
        default=None, min_length=1, description="Cameras the watch checks; null: every camera."
    )
    threshold: float = Field(
        default=0.5, ge=0.0, le=1.0, description="Fire when P(yes) >= threshold; 0 always fires, 1 never does."
    )
    on_after: int = Field(
        default=1,
        ge=1,
        le=MAX_WATCH_CHUNKS,
        description="Consecutive chunks at or above threshold that start an event.",
    )
    off_after: int = Field(
        default=2, ge=1, le=MAX_WATCH_CHUNKS, description="Consecutive chunks below threshold that end the event."
    )
    cooldown_s: float = Field(
        default=60.0, ge=0.0, le=MAX_WATCH_COOLDOWN_S, description="No new event for this long after one ends."
    )
    describe: bool = Field(default=True, description="Generate a one-sentence description when an event starts.")

    @field_validator("question")
    @classmethod
    def _question(cls, value: str) -> str:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("must be valid Unicode text (it contains a lone surrogate escape)") from None
        if not value.strip():
            raise ValueError("must not be empty or only whitespace")
        return value.strip()

    @field_validator("cameras")
    @classmethod
    def _unique(cls, value: list[str] | None) -> list[str] | None:
        return None if value is None else list(dict.fromkeys(value))


class Settings(_Strict):
    """Everything vigil reads at start."""

    data_dir: Path = Field(default=Path("/var/lib/vigil"), description="Index files and other local state.")
    timezone: str = Field(default="UTC", description="IANA zone for naive times in questions and times in answers.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(default="INFO", description="Logging threshold.")
    mqtt: MqttSettings = Field(default_factory=MqttSettings, description="Broker connection and question API.")
    discovery: DiscoverySettings = Field(
        default_factory=DiscoverySettings, description="Home Assistant MQTT discovery."
    )
    redis: RedisSettings = Field(default_factory=RedisSettings, description="Memory store.")
    models: ModelSettings = Field(default_factory=ModelSettings, description="Models.")
    compression: CompressionSettings = Field(default_factory=CompressionSettings, description="Token compression.")
    retrieval: RetrievalSettings = Field(default_factory=RetrievalSettings, description="Question retrieval.")
    answer: AnswerSettings = Field(default_factory=AnswerSettings, description="Prompt budget of answers.")
    metrics: MetricsSettings = Field(default_factory=MetricsSettings, description="Prometheus metrics and health.")
    memory: MemorySettings = Field(default_factory=MemorySettings, description="Consolidation and size budgets.")
    cameras: dict[CameraName, CameraSettings] = Field(
        default_factory=dict, description="Camera name -> source. Names: a-z, 0-9, '_' and '-'."
    )
    watches: dict[CameraName, WatchSettings] = Field(
        default_factory=dict,
        max_length=MAX_WATCHES,
        description="Watch name -> standing question (docs/watches.md). Names follow the camera-name rules.",
    )

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError("unknown time zone (use an IANA name such as Europe/Berlin)") from exc
        return value

    @model_validator(mode="after")
    def _watched_cameras_exist(self) -> Settings:
        for name, watch in self.watches.items():
            unknown = [c for c in watch.cameras or () if c not in self.cameras]
            if unknown:
                raise ValueError(
                    f"watch {name}: unknown camera(s) {', '.join(unknown)}; configured: "
                    f"{', '.join(sorted(self.cameras)) or 'none'}"
                )
        return self

    @property
    def tz(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    def tiers_for(self, camera: str) -> list[TierSettings]:
        """The consolidation tiers of ``camera``: its own, else memory.tiers."""
        cam = self.cameras.get(camera)
        return list(self.memory.tiers if cam is None or cam.tiers is None else cam.tiers)


# --------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class ConfigIssue:
    """One problem in a config file, located by key path and, where known, line."""

    path: str
    message: str
    line: int | None = None

    def __str__(self) -> str:
        where = f"line {self.line}: " if self.line is not None else ""
        return f"{where}{self.path or '<root>'}: {self.message}"


class ConfigError(Exception):
    """The configuration is invalid; ``issues`` lists every problem found."""

    def __init__(self, source: str, issues: list[ConfigIssue]) -> None:
        self.source = source
        self.issues = issues
        super().__init__(f"{source}: " + "; ".join(str(i) for i in issues))


def _yaml_lines(text: str) -> dict[tuple[str, ...], int]:
    """Map each key path in a YAML document to its 1-based line number."""
    lines: dict[tuple[str, ...], int] = {}

    def walk(node: yaml.Node, path: tuple[str, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                key_path = (*path, str(key_node.value))
                lines[key_path] = key_node.start_mark.line + 1
                walk(value_node, key_path)
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                item_path = (*path, str(index))
                lines[item_path] = item.start_mark.line + 1
                walk(item, item_path)

    root = yaml.compose(text)
    if root is not None:
        walk(root, ())
    return lines


def _set_path(raw: dict[str, Any], keys: list[str], value: Any) -> None:
    node = raw
    for key in keys[:-1]:
        child = node.get(key)
        if not isinstance(child, dict):
            child = {}
            node[key] = child
        node = child
    node[keys[-1]] = value


_TEXT_TYPES = (str, SecretStr, Path)


def _field_type(model: type[BaseModel], keys: list[str]) -> Any:
    """The annotation of the field at ``keys`` under ``model``; None where the path is not in the schema."""
    annotation: Any = model
    for key in keys:
        annotation = _unwrap(annotation)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            field = annotation.model_fields.get(key)
            if field is None:
                return None
            annotation = field.annotation
        elif typing.get_origin(annotation) is dict:
            annotation = typing.get_args(annotation)[1]  # cameras: {name: CameraSettings}
        else:
            return None
    return annotation


def _unwrap(annotation: Any) -> Any:
    """``Annotated[T, ...]`` → T."""
    while typing.get_origin(annotation) is Annotated:
        annotation = typing.get_args(annotation)[0]
    return annotation


def _union_members(annotation: Any) -> tuple[Any, ...]:
    annotation = _unwrap(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return tuple(_unwrap(member) for member in typing.get_args(annotation))
    return (annotation,)


def _is_text(annotation: Any) -> bool:
    """Whether a field holds text (its env value is verbatim): str, SecretStr, Path, a Literal of
    strings, each optionally None."""
    members = [m for m in _union_members(annotation) if m is not type(None)]

    def text(member: Any) -> bool:
        if typing.get_origin(member) is Literal:
            return all(isinstance(choice, str) for choice in typing.get_args(member))
        return isinstance(member, type) and issubclass(member, _TEXT_TYPES)

    return bool(members) and all(text(m) for m in members)


def _is_optional(annotation: Any) -> bool:
    return type(None) in _union_members(annotation)


def env_value(keys: list[str], text: str) -> Any:
    """What the environment value ``text`` for the key path ``keys`` means (module docstring).

    Raises ValueError, without the value in the message, when a typed field's text is not YAML.
    """
    annotation = _field_type(Settings, keys)
    if text == "":
        return None if annotation is not None and _is_optional(annotation) else ""
    if annotation is None or _is_text(annotation):
        # Unknown keys too: the schema reports them, and a typo'd secret stays a plain string.
        return text
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        # The YAML error would quote the value, so it is not passed on.
        raise ValueError("not a valid value for this field (parsed as a YAML scalar)") from None


def apply_env_overrides(raw: dict[str, Any], environ: dict[str, str]) -> dict[str, Any]:
    """Overlay ``VIGIL_A__B=value`` variables onto the raw config mapping (keys lower-cased).

    Raises ConfigError (naming the variable, never its value) for a typed value that is not YAML.
    """
    issues: list[ConfigIssue] = []
    for name, text in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX) or name == "VIGIL_CONFIG":
            continue
        keys = [part.lower() for part in name[len(ENV_PREFIX) :].split(ENV_SEPARATOR)]
        if not all(keys):
            continue
        try:
            value = env_value(keys, text)
        except ValueError as exc:
            issues.append(ConfigIssue(".".join(keys), f"environment variable {name}: {exc}"))
            continue
        _set_path(raw, keys, value)
    if issues:
        raise ConfigError("<environment>", issues)
    return raw


def _credential(name: str, environ: dict[str, str]) -> str | None:
    """Read a systemd credential (LoadCredential=NAME:...) if the service has one."""
    directory = environ.get("CREDENTIALS_DIRECTORY")
    if not directory:
        return None
    path = Path(directory) / name
    # Only the line end an editor or `echo` adds: spaces may be part of the secret.
    return path.read_text().rstrip("\r\n") if path.is_file() else None


def load_settings(path: str | Path | None, environ: dict[str, str] | None = None) -> Settings:
    """Read, overlay and validate a config file; raise ConfigError listing every located problem.

    ``path=None`` validates an empty document (all defaults) plus the environment.
    """
    env = dict(os.environ if environ is None else environ)
    source = str(path) if path is not None else "<defaults>"
    text = ""
    if path is not None:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(source, [ConfigIssue("", f"cannot read config: {exc.strerror or exc}")]) from exc
    try:
        raw = yaml.safe_load(text) if text.strip() else {}
        lines = _yaml_lines(text) if text.strip() else {}
    except yaml.YAMLError as exc:
        # Only the problem and its place: str(exc) quotes the offending line, which may hold a secret.
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        where = f" (column {mark.column + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise ConfigError(source, [ConfigIssue("", f"not valid YAML: {problem}{where}", line)]) from None
    if not isinstance(raw, dict):
        raise ConfigError(source, [ConfigIssue("", "the top level must be a mapping of keys to values", 1)])
    try:
        raw = apply_env_overrides(raw, env)
    except ConfigError as exc:
        raise ConfigError(source, exc.issues) from None
    for section, cred in (("mqtt", "mqtt_password"), ("redis", "redis_password")):
        secret = _credential(cred, env)
        if secret is not None and not (raw.get(section) or {}).get("password"):
            _set_path(raw, [section, "password"], secret)
    try:
        return Settings.model_validate(raw)
    except ValidationError as exc:
        issues = []
        for err in exc.errors():
            loc = tuple(str(part) for part in err["loc"])
            message = "unknown key (not part of the schema)" if err["type"] == "extra_forbidden" else err["msg"]
            # The line of the deepest key that exists in the file.
            line = next((lines[loc[:n]] for n in range(len(loc), 0, -1) if loc[:n] in lines), None)
            issues.append(ConfigIssue(".".join(loc), message, line))
        # from None: the ValidationError's text repeats each input value (input_value=...), and a
        # traceback of this error would print it.
        raise ConfigError(source, issues) from None
