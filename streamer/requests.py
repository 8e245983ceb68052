"""Bounded request parsing: raw MQTT payload → :class:`Request`, whatever the payload.

Every network message is hostile until validated, so the order is: size first (nothing larger
than ``max_bytes`` is decoded; only a bounded regex looks at its first ``SNIFF_BYTES`` for a
``reply_to`` and ``id``, as for any payload that is not JSON), then strict UTF-8, then a linear
scan that refuses nesting deeper than ``MAX_DEPTH`` (Python's json recurses: a 1,000-deep array
raised RecursionError), then ``json.loads`` with an integer hook that refuses more than
``MAX_INT_DIGITS`` digits (CPython refuses to convert over 4,300 digits with ValueError,
https://github.com/python/cpython/issues/95778, and converting fewer is still quadratic), then
the request's schema (:class:`AskRequest` on ``{prefix}/ask``, :class:`EventsQueryRequest` on
``{prefix}/events/query``). :func:`decode_request` never raises: the result holds either the
request or a :class:`RequestError`, plus whatever reply address and id could be read so the
error can be answered.

Reply addresses (:func:`reply_topic_problem`) must be valid MQTT topic names outside the topics
vigil itself uses (streamer/topics.py), and inside ``mqtt.reply_topics`` when that allow-list is set.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, TypeAlias
from zoneinfo import ZoneInfo

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, field_validator

from retrieval.answer import Question
from streamer.timefmt import BadTimeError, parse_window
from streamer.topics import Topics, topic_matches

MAX_DEPTH = 8  # a request is one object with one list inside; 8 leaves room and stays cheap
MAX_INT_DIGITS = 20  # top_k is at most 64 and an id fits in 64 bits; nothing needs more
MAX_QUESTION_CHARS = 4096  # a question is a sentence; this bounds the text embedder's work
MAX_CAMERAS = 64
MAX_NAME_CHARS = 128  # camera names (memory/keys.py allows 128)
MAX_TIME_CHARS = 64  # an ISO 8601 time with offset is about 32 characters
MAX_ID_CHARS = 256  # an echoed v3.1.1 id: a UUID or a counter, not a document
MAX_ID_INT = 2**63  # |id| below this: what a 64-bit requester can match against
MAX_FIELD_NAME_CHARS = 64  # of a field name quoted in an error message
MAX_TOPIC_BYTES = 65535  # MQTT topic names are length-prefixed with two bytes
MAX_TOP_K = 64  # same bound as RetrievalSettings.top_k
# Events one query returns: about 450 bytes each, so a full reply stays near 0.5 MB.
MAX_EVENTS_LIMIT = 1000
DEFAULT_EVENTS_LIMIT = 100
SNIFF_BYTES = 4096  # of an oversized payload, only this much is searched for reply_to and id
# Bounded patterns over the first SNIFF_BYTES: a JSON string of limited length with escapes.
_SNIFF_REPLY_TO = re.compile(rb'"reply_to"\s*:\s*"((?:[^"\\]|\\.){1,1024})"')
_SNIFF_ID = re.compile(rb'"id"\s*:\s*(-?\d{1,18}(?![\d.eE])|"(?:[^"\\]|\\.){0,256}")')
QUOTE, BACKSLASH = ord('"'), ord("\\")
OPENERS, CLOSERS = frozenset(b"[{"), frozenset(b"]}")
_SPECIAL = re.compile(rb'[\[\]{}"\\]')  # what the depth scan looks at: brackets, quotes, escapes


class RequestError(Exception):
    """A request that cannot be answered; ``code`` is the machine-readable error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _no_surrogates(value: str) -> str:
    """Lone surrogates (JSON ``"\\ud800"``) decode to a str that cannot be encoded as UTF-8."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError("must be valid Unicode text (it contains a lone surrogate escape)") from exc
    return value


CameraName = Annotated[str, StringConstraints(min_length=1, max_length=MAX_NAME_CHARS)]
TimeText = Annotated[str, StringConstraints(max_length=MAX_TIME_CHARS)]


class AskRequest(BaseModel):
    """A question as it arrives on ``{prefix}/ask`` (docs/api.md, Asking). Unknown fields are errors."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    question: str = Field(min_length=1, max_length=MAX_QUESTION_CHARS, description="The question text.")
    cameras: list[CameraName] | None = Field(
        default=None, max_length=MAX_CAMERAS, description="Camera names; absent or empty: all cameras."
    )
    after: TimeText | None = Field(default=None, description="ISO 8601; naive times are in the configured zone.")
    before: TimeText | None = Field(default=None, description="ISO 8601; later than after.")
    top_k: int | None = Field(default=None, ge=1, le=MAX_TOP_K, description="Chunks retrieved by similarity.")
    stream: bool = Field(default=False, description="Answer in parts as they are generated.")
    reply_to: str | None = Field(default=None, description="v3.1.1 reply topic (v5 uses the Response Topic).")
    id: str | int | float | None = Field(default=None, description="v3.1.1: echoed in every reply.")

    @field_validator("question")
    @classmethod
    def _question(cls, value: str) -> str:
        if not _no_surrogates(value).strip():
            raise ValueError("must not be empty or only whitespace")
        return value.strip()

    @field_validator("cameras", "after", "before", "reply_to")
    @classmethod
    def _text(cls, value: object) -> object:
        return _texts_valid(value)

    @field_validator("id")
    @classmethod
    def _id(cls, value: object) -> object:
        return _id_valid(value)


def _texts_valid(value: object) -> object:
    """``value`` (text or a list of texts) if every text is valid Unicode; raise ValueError otherwise."""
    for text in value if isinstance(value, list) else [value]:
        if isinstance(text, str):
            _no_surrogates(text)
    return value


def _id_valid(value: object) -> object:
    """``value`` if it can be echoed as a v3.1.1 reply's ``id`` (or is absent); raise ValueError otherwise."""
    if echoable_id(value) is None and value is not None:
        raise ValueError(f"must be a string of at most {MAX_ID_CHARS} characters or a finite number below 2**63")
    return value


class EventsQueryRequest(BaseModel):
    """An event query as it arrives on ``{prefix}/events/query`` (docs/api.md, Events). Unknown fields are errors."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    camera: CameraName | None = Field(default=None, description="Only this camera's events; absent: every camera.")
    watch: CameraName | None = Field(default=None, description="Only this watch's events; absent: every watch.")
    after: TimeText | None = Field(default=None, description="Events reaching past this time (ISO 8601).")
    before: TimeText | None = Field(default=None, description="Events starting before this time (ISO 8601).")
    limit: int = Field(
        default=DEFAULT_EVENTS_LIMIT, ge=1, le=MAX_EVENTS_LIMIT, description="At most this many, earliest first."
    )
    reply_to: str | None = Field(default=None, description="v3.1.1 reply topic (v5 uses the Response Topic).")
    id: str | int | float | None = Field(default=None, description="v3.1.1: echoed in every reply.")

    @field_validator("camera", "watch", "after", "before", "reply_to")
    @classmethod
    def _text(cls, value: object) -> object:
        return _texts_valid(value)

    @field_validator("id")
    @classmethod
    def _id(cls, value: object) -> object:
        return _id_valid(value)


RequestBody: TypeAlias = AskRequest | EventsQueryRequest


def echoable_id(value: object) -> str | int | float | None:
    """``value`` if it may be echoed back as the reply's ``id`` (a bounded string or number), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        if len(value) > MAX_ID_CHARS:
            return None
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return None
        return value
    if isinstance(value, int):
        return value if abs(value) < MAX_ID_INT else None
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return None


@dataclass(frozen=True)
class Request:
    """What :func:`decode_request` found: the request or the error, and where to reply in any case."""

    body: RequestBody | None  # of the schema decode_request was given
    error: RequestError | None
    reply_to: str | None  # the body's reply_to, if it is a string (its validity is checked apart)
    request_id: str | int | float | None  # the body's id, if it may be echoed

    @property
    def ask(self) -> AskRequest | None:
        """The body, when it is a question."""
        return self.body if isinstance(self.body, AskRequest) else None


def _too_deep(raw: bytes, max_depth: int) -> bool:
    """Whether the JSON text nests objects/arrays deeper than ``max_depth``; O(len(raw)), no recursion.

    One pass over the brackets, quotes and backslashes only; brackets inside strings do not count.
    (A regex that blanks strings first goes quadratic on many escaped quotes after an open one.)
    """
    depth = 0
    in_string = False
    escaped_at = -1  # index of the byte a backslash escapes
    for m in _SPECIAL.finditer(raw):
        i = m.start()
        if i == escaped_at:
            continue
        c = raw[i]
        if in_string:
            if c == BACKSLASH:
                escaped_at = i + 1
            elif c == QUOTE:
                in_string = False
        elif c == QUOTE:
            in_string = True
        elif c in OPENERS:
            depth += 1
            if depth > max_depth:
                return True
        elif c in CLOSERS:
            depth -= 1
    return False


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"integer of {len(text)} characters; at most {MAX_INT_DIGITS} digits are accepted")
    return int(text)


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


def _sniff(raw: bytes) -> tuple[str | None, str | int | None]:
    """reply_to and id from the first SNIFF_BYTES of a payload too large to parse."""
    head = raw[:SNIFF_BYTES]
    reply_to: str | None = None
    request_id: str | int | None = None
    if (m := _SNIFF_REPLY_TO.search(head)) is not None:
        try:
            value = json.loads(b'"' + m.group(1) + b'"')
        except (UnicodeDecodeError, json.JSONDecodeError):
            value = None
        reply_to = value if isinstance(value, str) else None
    if (m := _SNIFF_ID.search(head)) is not None:
        try:
            found = json.loads(m.group(1))
        except (UnicodeDecodeError, json.JSONDecodeError):
            found = None
        request_id = found if isinstance(found, str | int) and echoable_id(found) is not None else None
    return reply_to, request_id


def first_error(exc: ValidationError) -> str:
    """A short message naming the first few invalid fields (pydantic's text is long and repeats input)."""
    parts = []
    for err in exc.errors(include_url=False, include_input=False)[:3]:
        # Field names come from the request (an unknown key can be 64 KiB long): bounded here.
        where = ".".join(str(p) for p in err["loc"])[:MAX_FIELD_NAME_CHARS] or "request"
        parts.append(f"'{where}': {err['msg']}")
    more = len(exc.errors()) - len(parts)
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


@dataclass(frozen=True)
class JsonObject:
    """What :func:`decode_object` found: the object or the error, and the reply address in any case."""

    body: dict[str, object] | None
    error: RequestError | None
    reply_to: str | None  # the body's reply_to, if it is a string (its validity is checked apart)
    request_id: str | int | float | None  # the body's id, if it may be echoed


def decode_object(raw: bytes, *, max_bytes: int) -> JsonObject:
    """Raw payload → a JSON object, bounded as in the module docstring; never raises.

    The first steps of every request (``{prefix}/ask``, ``{prefix}/watches/NAME/set``); the caller
    validates the object against its own schema.
    """
    if len(raw) > max_bytes:
        reply_to, request_id = _sniff(raw)
        error = RequestError("payload_too_large", f"request is {len(raw)} bytes; the limit is {max_bytes}")
        return JsonObject(None, error, reply_to, request_id)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return _unparsed_object(raw, f"request is not UTF-8: {exc.reason} at byte {exc.start}")
    if _too_deep(raw, MAX_DEPTH):
        return _unparsed_object(raw, f"request nests deeper than {MAX_DEPTH} levels")
    try:
        body = json.loads(text, parse_int=_bounded_int, parse_constant=_no_constant)
    except (json.JSONDecodeError, ValueError, RecursionError) as exc:
        # RecursionError cannot happen below MAX_DEPTH; caught so that no payload ends the service.
        return _unparsed_object(raw, f"request is not valid JSON: {str(exc)[:200]}")
    if not isinstance(body, dict):
        return JsonObject(None, RequestError("bad_json", "request must be a JSON object"), None, None)
    reply_to = body.get("reply_to")
    return JsonObject(body, None, reply_to if isinstance(reply_to, str) else None, echoable_id(body.get("id")))


def _unparsed_object(raw: bytes, message: str) -> JsonObject:
    """A ``bad_json`` result; a v3.1.1 reply address is looked for as in an oversized request."""
    reply_to, request_id = _sniff(raw)
    return JsonObject(None, RequestError("bad_json", message), reply_to, request_id)


def decode_request(
    raw: bytes, *, max_bytes: int, schema: type[AskRequest] | type[EventsQueryRequest] = AskRequest
) -> Request:
    """Raw payload → :class:`Request` of ``schema``. Never raises; costs linear in ``min(len(raw), max_bytes)``."""
    found = decode_object(raw, max_bytes=max_bytes)
    if found.body is None:
        return Request(None, found.error, found.reply_to, found.request_id)
    try:
        parsed = schema.model_validate(found.body)
    except ValidationError as exc:
        return Request(None, RequestError("bad_request", first_error(exc)), found.reply_to, found.request_id)
    return Request(parsed, None, found.reply_to, found.request_id)


def resolve_cameras(requested: Sequence[str] | None, known: Sequence[str]) -> list[str] | None:
    """Requested camera names → configured names (matched case-insensitively); None means all."""
    if not requested:
        return None
    by_lower = {name.lower(): name for name in known}
    unknown = [c for c in requested if c.strip().lower() not in by_lower]
    if unknown:
        shown = ", ".join(unknown[:5])  # names are bounded by the schema; JSON escapes the rest
        raise RequestError("unknown_camera", f"unknown camera(s) {shown}; known: {', '.join(sorted(known)) or 'none'}")
    return list(dict.fromkeys(by_lower[c.strip().lower()] for c in requested))


def to_question(ask: AskRequest, *, tz: ZoneInfo, cameras: Sequence[str]) -> Question:
    """A schema-valid request → :class:`Question`; raises :class:`RequestError` (unknown camera, bad time)."""
    try:
        after_s, before_s = parse_window(ask.after, ask.before, tz)
    except BadTimeError as exc:
        raise RequestError("bad_time", str(exc)) from exc
    return Question(
        text=ask.question,
        cameras=resolve_cameras(ask.cameras, cameras),
        after_s=after_s,
        before_s=before_s,
        top_k=ask.top_k,
        stream=ask.stream,
    )


@dataclass(frozen=True)
class EventsQuery:
    """A validated event query: filters in vigil's terms (UTC epoch seconds, configured names)."""

    camera: str | None
    watch: str | None
    after_s: float | None
    before_s: float | None
    limit: int


def to_events_query(req: EventsQueryRequest, *, tz: ZoneInfo, cameras: Sequence[str]) -> EventsQuery:
    """A schema-valid event query → :class:`EventsQuery`; raises :class:`RequestError` (unknown camera, bad time).

    A watch is not checked against the current watches: a removed watch's events stay queryable.
    """
    try:
        after_s, before_s = parse_window(req.after, req.before, tz)
    except BadTimeError as exc:
        raise RequestError("bad_time", str(exc)) from exc
    resolved = resolve_cameras([req.camera] if req.camera is not None else None, cameras)
    return EventsQuery(
        camera=resolved[0] if resolved else None,
        watch=None if req.watch is None else req.watch.strip().lower(),
        after_s=after_s,
        before_s=before_s,
        limit=req.limit,
    )


# --------------------------------------------------------------------------- reply addresses


def reply_topic_problem(topic: object, topics: Topics, allowed: Sequence[str] | None = None) -> str | None:
    """Why ``topic`` cannot be a reply address, or None when it can.

    A valid MQTT topic name (non-empty UTF-8 without NUL or wildcards, at most 65,535 bytes), not
    a ``$`` topic (broker internals), none of vigil's own topics (streamer/topics.py), and inside
    ``allowed`` (topic filters) when that is given.
    """
    if not isinstance(topic, str) or not topic:
        return "no reply topic"
    try:
        size = len(topic.encode("utf-8"))
    except UnicodeEncodeError:
        return "reply topic is not valid UTF-8 (lone surrogate)"
    if size > MAX_TOPIC_BYTES:
        return f"reply topic is {size} bytes; MQTT allows {MAX_TOPIC_BYTES}"
    if "\x00" in topic:
        return "reply topic contains NUL"
    if "+" in topic or "#" in topic:
        return "reply topic contains a wildcard"
    if topic.startswith("$"):
        return "reply topic is a $ (broker) topic"
    for reserved in topics.reserved_filters():
        if topic_matches(reserved, topic):
            return f"reply topic is reserved by vigil ({reserved})"
    if allowed is not None and not any(topic_matches(f, topic) for f in allowed):
        return "reply topic is outside mqtt.reply_topics"
    return None
