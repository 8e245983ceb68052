"""Bounded request parsing and reply-address rules (streamer/requests.py, streamer/topics.py).

Pure functions, so no broker: each hostile payload class from issue 9 (deep nesting, huge
integers, lone surrogates, bad UTF-8, oversized v3.1.1 requests, wrong field types) gets the
error it should, and a hypothesis fuzz checks that no payload at all makes the parser raise.
"""

from __future__ import annotations

import json
import time
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamer.mqtt_api import TokenBucket, answer_payload
from streamer.requests import (
    MAX_DEPTH,
    MAX_ID_CHARS,
    RequestError,
    decode_request,
    echoable_id,
    reply_topic_problem,
    to_question,
)
from streamer.topics import Topics, topic_matches, valid_topic_filter

TZ = ZoneInfo("Europe/Berlin")
LIMIT = 65536
TOPICS = Topics("vigil")


def decode(payload: bytes | dict, *, max_bytes: int = LIMIT):
    raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return decode_request(raw, max_bytes=max_bytes)


def code_of(payload: bytes | dict, **kw) -> str | None:
    request = decode(payload, **kw)
    return None if request.error is None else request.error.code


# --------------------------------------------------------------------------- regressions (issue 9)


def test_thousand_deep_nesting_is_bad_json_not_recursion_error():
    # Before: json.loads raised RecursionError out of MqttApi._dispatch and stopped the daemon.
    for raw in (b"[" * 1000 + b"]" * 1000, b'{"a":' * 1000 + b"1" + b"}" * 1000, b"[" * 60_000):
        request = decode(raw)
        assert request.error is not None
        assert request.error.code == "bad_json"
        assert "deeper" in request.error.message


def test_deep_nesting_keeps_the_reply_address_when_it_comes_first():
    raw = b'{"reply_to": "me/r", "id": 3, "x": ' + b"[" * 50 + b"]" * 50 + b"}"
    request = decode(raw)
    assert request.error is not None
    assert request.error.code == "bad_json"
    # Deeper than MAX_DEPTH: the body is not parsed; the bounded sniff of its head finds these.
    assert (request.reply_to, request.request_id) == ("me/r", 3)


def test_depth_at_the_limit_is_parsed():
    inner = "[" * (MAX_DEPTH - 1) + "]" * (MAX_DEPTH - 1)
    request = decode(f'{{"question": "q", "x": {inner}}}'.encode())
    assert request.error is not None
    assert request.error.code == "bad_request"  # parsed fine; 'x' is an unknown field


def test_brackets_inside_strings_do_not_count_as_depth():
    question = "[" * 500 + '\\"{' * 100
    request = decode(f'{{"question": "{question}"}}'.encode())
    assert request.error is None
    assert request.ask is not None
    assert request.ask.question.startswith("[[[")


def test_five_thousand_digit_integer_is_bad_json_not_value_error():
    # Before: CPython's int() limit raised ValueError out of _dispatch and stopped the daemon.
    huge = b"9" * 5000
    for raw in (b'{"question": "q", "top_k": ' + huge + b"}", huge, b'{"id": -' + b"7" * 30 + b"}"):
        request = decode(raw)
        assert request.error is not None
        assert request.error.code == "bad_json"


def test_nan_and_infinity_are_refused():
    assert code_of(b'{"question": "q", "top_k": NaN}') == "bad_json"
    assert code_of(b'{"question": "q", "id": Infinity}') == "bad_json"


def test_lone_surrogate_in_question_is_bad_request_not_internal():
    request = decode(b'{"question": "who \\ud800 came?", "reply_to": "me/r"}')
    assert request.error is not None
    assert request.error.code == "bad_request"
    assert request.reply_to == "me/r"  # so the refusal can be answered


def test_invalid_utf8_is_bad_json():
    for raw in (b'{"question": "\xff\xfe"}', b'{"question": "\xed\xa0\x80"}', b"\xc3"):
        assert code_of(raw) == "bad_json"


def test_cameras_as_a_string_is_refused():
    # docs/api.md: cameras is a list; a bare string ("rtmp") was silently accepted before.
    request = decode({"question": "q", "cameras": "rtmp"})
    assert request.error is not None
    assert request.error.code == "bad_request"
    assert "cameras" in request.error.message


@pytest.mark.parametrize(
    "body",
    [
        {"question": "q", "top_k": True},
        {"question": "q", "top_k": 1.0},
        {"question": "q", "top_k": 65},
        {"question": "q", "stream": "yes"},
        {"question": "q", "stream": 1},
        {"question": 5},
        {"question": " \t"},
        {"question": "q", "after": 1700000000},
        {"question": "q", "cameras": [1]},
        {"question": "q", "cameras": ["a"] * 65},
        {"question": "q", "unknown": 1},
        {"question": "q" * 5000},
        {"question": "q", "id": [1]},
        {"question": "q", "id": "x" * (MAX_ID_CHARS + 1)},
        {"question": "q", "id": 2**63},
        {"question": "q", "reply_to": 7},
    ],
)
def test_schema_refuses_wrong_types_and_ranges(body):
    request = decode(body)
    assert request.error is not None, body
    assert request.error.code == "bad_request", (body, request.error.message)
    assert len(request.error.message) < 600


def test_error_message_is_bounded_whatever_the_field_names():
    request = decode({"question": "q", "k" * 50_000: 1, "\ud800": 2})
    assert request.error is not None
    assert request.error.code == "bad_request"
    assert len(request.error.message) < 400
    json.dumps({"error": request.error.message})  # ensure_ascii escapes the surrogate


def test_valid_request_becomes_a_question():
    request = decode(
        {
            "question": "  who came?  ",
            "cameras": ["GARAGE"],
            "after": "2026-11-20T10:00:00",
            "top_k": 3,
            "stream": True,
            "reply_to": "me/replies",
            "id": "q-1",
        }
    )
    assert request.error is None
    assert request.ask is not None
    assert (request.reply_to, request.request_id) == ("me/replies", "q-1")
    question = to_question(request.ask, tz=TZ, cameras=["front_door", "garage"])
    assert question.text == "who came?"
    assert question.cameras == ["garage"]
    assert question.after_s == pytest.approx(1_795_165_200.0)
    assert (question.top_k, question.stream) == (3, True)


def test_unknown_camera_and_bad_time_are_their_own_codes():
    ask = decode({"question": "q", "cameras": ["attic"]}).ask
    assert ask is not None
    with pytest.raises(RequestError) as exc:
        to_question(ask, tz=TZ, cameras=["garage"])
    assert exc.value.code == "unknown_camera"
    ask = decode({"question": "q", "after": "2026-11-20T12:00", "before": "2026-11-20T11:00"}).ask
    assert ask is not None
    with pytest.raises(RequestError) as exc:
        to_question(ask, tz=TZ, cameras=["garage"])
    assert exc.value.code == "bad_time"


def test_id_echoed_only_when_a_bounded_string_or_number():
    assert decode({"question": "q", "id": 7}).request_id == 7
    assert decode({"question": "q", "id": 1.5}).request_id == 1.5
    assert decode({"question": "q", "id": "x" * MAX_ID_CHARS}).request_id == "x" * MAX_ID_CHARS
    for bad in ({"a": 1}, [1], True, None, "x" * (MAX_ID_CHARS + 1), 2**63, -(2**63)):
        assert decode({"question": "q", "id": bad}).request_id is None, bad
    assert echoable_id("\ud800") is None


# --------------------------------------------------------------------------- oversized


def test_oversized_request_is_not_parsed_but_its_reply_to_and_id_are_found():
    body = {"reply_to": "me/r", "id": "big-1", "question": "x" * 10_000}
    request = decode(body, max_bytes=1024)
    assert request.error is not None
    assert request.error.code == "payload_too_large"
    assert (request.reply_to, request.request_id) == ("me/r", "big-1")


def test_oversized_request_without_a_cheap_reply_to_has_no_address():
    # reply_to after the first 4 KiB, or nested too deep to matter: not searched for.
    body = b'{"question": "' + b"x" * 10_000 + b'", "reply_to": "me/r"}'
    request = decode(body, max_bytes=1024)
    assert request.error is not None
    assert request.error.code == "payload_too_large"
    assert request.reply_to is None


def test_oversized_request_costs_time_linear_in_the_sniffed_prefix():
    # Megabytes of quotes and backslashes: the sniff sees 4 KiB, the parser nothing.
    raw = b'{"reply_to": "' + b'\\"' * 2_000_000
    started = time.perf_counter()
    request = decode(raw, max_bytes=LIMIT)
    assert time.perf_counter() - started < 0.5
    assert request.error is not None
    assert request.error.code == "payload_too_large"


def test_many_escaped_quotes_under_the_limit_parse_in_linear_time():
    raw = b'{"question": "' + b'\\"' * 30_000  # unterminated; 60 KB
    started = time.perf_counter()
    assert code_of(raw) == "bad_json"
    assert time.perf_counter() - started < 0.5


# --------------------------------------------------------------------------- reply addresses


@pytest.mark.parametrize(
    ("topic", "why"),
    [
        (None, "no reply topic"),
        ("", "no reply topic"),
        ("me/\ud800", "surrogate"),
        ("me/\x00x", "NUL"),
        ("me/+", "wildcard"),
        ("me/#", "wildcard"),
        ("$SYS/broker", "$"),
        ("x" * 65536, "bytes"),
        ("vigil/ask", "reserved"),
        ("vigil/available", "reserved"),
        ("vigil/status", "reserved"),
        ("vigil/cameras/front_door/state", "reserved"),
        ("vigil/cameras", "reserved"),
        ("vigil/watches/1", "reserved"),
        ("vigil/events", "reserved"),
        ("vigil/nodes/a/b", "reserved"),
        ("homeassistant/sensor/vigil/config", "reserved"),
        ("homeassistant", "reserved"),
    ],
)
def test_unusable_reply_topics(topic, why):
    problem = reply_topic_problem(topic, TOPICS)
    assert problem is not None
    assert why in problem


def test_usable_reply_topics():
    usable = ("me/replies", "vigil/replies/abc", "vigil/reply/1", "other/ask", "vigil2/ask", "x" * 65535, "ä/ü")
    for topic in usable:
        assert reply_topic_problem(topic, TOPICS) is None, topic


def test_allow_list_limits_reply_topics():
    allowed = ["clients/+/replies", "ops/#"]
    assert reply_topic_problem("clients/a/replies", TOPICS, allowed) is None
    assert reply_topic_problem("ops", TOPICS, allowed) is None
    assert reply_topic_problem("ops/x/y", TOPICS, allowed) is None
    assert "outside" in (reply_topic_problem("clients/a/b/replies", TOPICS, allowed) or "")
    assert "outside" in (reply_topic_problem("me/replies", TOPICS, allowed) or "")
    # The allow-list cannot open vigil's own topics.
    assert "reserved" in (reply_topic_problem("vigil/ask", TOPICS, ["#"]) or "")


def test_topic_filter_matching_and_validity():
    assert topic_matches("a/+/c", "a/b/c")
    assert not topic_matches("a/+/c", "a/b/c/d")
    assert topic_matches("a/#", "a")
    assert not topic_matches("a/b", "a")
    assert valid_topic_filter("a/+/#")
    for bad in ("", "a/#/b", "a/b#", "a+/b", "a/\x00"):
        assert not valid_topic_filter(bad)


def test_topics_module_names_every_topic():
    t = Topics("home/vigil")
    assert (t.ask, t.available, t.status) == ("home/vigil/ask", "home/vigil/available", "home/vigil/status")
    assert t.camera_state("garage") == "home/vigil/cameras/garage/state"
    assert t.camera_of_state("home/vigil/cameras/garage/state") == "garage"
    assert t.camera_of_state("home/vigil/cameras/a/b/state") is None
    assert t.camera_of_state("home/vigil/status") is None
    for topic in (t.ask, t.available, t.status, t.camera_state("garage")):
        assert reply_topic_problem(topic, t) is not None


# --------------------------------------------------------------------------- rate limit, payload


def test_token_bucket_allows_the_burst_then_the_rate():
    bucket = TokenBucket(rate_per_s=5.0, burst=20, max_keys=2)
    assert all(bucket.take("a", 0.0) for _ in range(20))
    assert not bucket.take("a", 0.0)
    assert bucket.take("b", 0.0)  # another requester has its own bucket
    assert bucket.take("a", 0.2)  # 0.2 s at 5/s: one token back
    assert not bucket.take("a", 0.2)
    bucket.take("c", 0.2)  # beyond max_keys the least recently seen ("b") is forgotten
    assert len(bucket._buckets) == 2


def test_answer_payload_carries_offline_and_freshness():
    from memory.outage import Outage
    from retrieval.answer import Answer, Citation, Latest

    answer = Answer(
        text="t",
        citations=[Citation("garage", 100.0, 108.0, 0.5)],
        after_s=None,
        before_s=None,
        offline=[Outage("garage", 200.0, None, "eof"), Outage("front_door", 50.0, 60.0, "x")],
        about_now=True,
        latest=[Latest("garage", 108.0, 392.0, False), Latest("front_door", 480.0, 20.0, True)],
    )
    body = answer_payload(answer, ZoneInfo("UTC"))
    assert body["offline"] == [
        {"camera": "garage", "start": "1970-01-01T00:03:20.000+00:00", "end": None},
        {"camera": "front_door", "start": "1970-01-01T00:00:50.000+00:00", "end": "1970-01-01T00:01:00.000+00:00"},
    ]
    assert (body["about_now"], body["fresh"], body["age_s"]) == (True, False, 392.0)
    assert body["latest"][0] == {
        "camera": "garage",
        "end": "1970-01-01T00:01:48.000+00:00",
        "age_s": 392.0,
        "fresh": False,
    }
    past = Answer(text="t", citations=[], after_s=None, before_s=None)
    assert (answer_payload(past, TZ)["fresh"], answer_payload(past, TZ)["age_s"]) == (None, None)
    empty_now = Answer(text="t", citations=[], after_s=None, before_s=None, about_now=True)
    assert answer_payload(empty_now, TZ)["fresh"] is False  # nothing recorded is not "fresh"


# --------------------------------------------------------------------------- fuzz


_json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False),
    st.text(alphabet=st.characters(codec=None, exclude_categories=()), max_size=40),
)
_json_values = st.recursive(
    _json_leaf,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
    max_leaves=30,
)
_fields = st.sampled_from(["question", "cameras", "after", "before", "top_k", "stream", "reply_to", "id"])
_requests = st.dictionaries(_fields, _json_values, max_size=8)


def _check(raw: bytes, max_bytes: int) -> None:
    request = decode_request(raw, max_bytes=max_bytes)  # must not raise, whatever raw is
    assert (request.ask is None) != (request.error is None)
    if request.error is not None:
        assert request.error.code in {"bad_json", "bad_request", "payload_too_large"}
        json.dumps({"error": request.error.message}).encode()  # the error reply can be encoded
    if request.reply_to is not None:
        reply_topic_problem(request.reply_to, TOPICS)  # must not raise either
    if request.request_id is not None:
        json.dumps({"id": request.request_id}).encode("utf-8")
    if request.ask is not None:
        json.dumps(request.ask.model_dump()).encode("utf-8")  # every accepted string is encodable
        to_question_or_error(request)


def to_question_or_error(request) -> None:
    code = None
    try:
        to_question(request.ask, tz=TZ, cameras=["garage"])
    except RequestError as exc:
        code = exc.code
    assert code in {None, "unknown_camera", "bad_time"}


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2048), st.integers(min_value=256, max_value=4096))
def test_fuzz_random_bytes_never_raise(raw, max_bytes):
    _check(raw, max_bytes)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_requests)
def test_fuzz_json_shaped_requests_never_raise(body):
    raw = json.dumps(body, ensure_ascii=True).encode()  # ensure_ascii: surrogates travel as \\udXXX
    _check(raw, LIMIT)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.integers(min_value=1, max_value=3000),
    st.sampled_from([b"[", b'{"a":', b'{"question":[']),
    st.binary(max_size=20),
)
def test_fuzz_nesting_and_truncation_never_raise(depth, opener, tail):
    _check(opener * depth + tail, LIMIT)


def test_log_throttle_logs_once_per_interval_and_says_how_many_it_held(caplog):
    import logging

    from streamer import mqtt_api

    clock = [100.0]
    throttle = mqtt_api.LogThrottle(interval_s=10.0, clock=lambda: clock[0])
    with caplog.at_level(logging.WARNING, logger="streamer.mqtt_api"):
        for _ in range(500):
            throttle.log("bad_reply_topic", logging.WARNING, "dropped %s", "x")
        throttle.log("unanswerable", logging.WARNING, "no address")  # another kind has its own budget
        clock[0] += 10.0
        throttle.log("bad_reply_topic", logging.WARNING, "dropped %s", "y")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["dropped x", "no address", "dropped y (and 499 more like it in the last 10 s)"]
