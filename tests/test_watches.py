"""Watches, the pure part: config and runtime validation, hysteresis and cooldown over score sequences."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from streamer.requests import RequestError
from streamer.settings import ConfigError, Settings, WatchSettings, load_settings
from streamer.watches import Change, Rule, WatchState, end_now, fires, parse_watch, run_scores, step, watched_cameras

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_YAML = ROOT / "configs" / "default.yaml"
CAMS = {"front_door": {"url": "rtsp://cam/1"}, "garage": {"url": "rtsp://cam/2"}}


def chunks(scores: list[float], length_s: float = 8.0, t0: float = 1000.0) -> list[tuple[float, float, float]]:
    """Back-to-back chunks of ``length_s`` with these scores: (score, start_s, end_s)."""
    return [(score, t0 + i * length_s, t0 + (i + 1) * length_s) for i, score in enumerate(scores)]


# --------------------------------------------------------------------------- config


def test_config_watches_take_the_issue_defaults_and_every_camera_by_default(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        yaml.safe_dump({"cameras": CAMS, "watches": {"person_at_door": {"question": " Is a person here? "}}})
    )
    watch = load_settings(cfg, environ={}).watches["person_at_door"]
    assert watch == WatchSettings(
        question="Is a person here?",
        cameras=None,
        threshold=0.5,
        on_after=1,
        off_after=2,
        cooldown_s=60.0,
        describe=True,
    )
    assert watched_cameras(watch, ["garage", "front_door"]) == ["front_door", "garage"]


def test_default_yaml_documents_every_watch_key_with_its_default() -> None:
    text = DEFAULT_YAML.read_text().split("\ncameras:")[1]
    example = "\n".join(line[1:] for line in text.splitlines() if re.match(r"^#\s{3}", line))
    watch = yaml.safe_load(example)["person_at_door"]
    assert set(watch) == set(WatchSettings.model_fields)
    defaults = WatchSettings(question=watch["question"]).model_dump()
    assert watch == defaults


@pytest.mark.parametrize(
    ("watch", "message"),
    [
        ({"question": "q?", "cameras": ["attic"]}, "watch w: unknown camera(s) attic"),
        ({"question": "q?", "threshold": 1.5}, "less than or equal to 1"),
        ({"question": "q?", "threshold": -0.1}, "greater than or equal to 0"),
        ({"question": "q?", "on_after": 0}, "greater than or equal to 1"),
        ({"question": "q?", "cameras": []}, "at least 1 item"),
        ({"question": "   "}, "must not be empty"),
        ({"question": "q?", "colour": "red"}, "unknown key"),
        ({}, "Field required"),
    ],
)
def test_invalid_config_watches_are_config_errors(tmp_path: Path, watch: dict, message: str) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"cameras": CAMS, "watches": {"w": watch}}))
    with pytest.raises(ConfigError) as err:
        load_settings(cfg, environ={})
    assert message in str(err.value)


@pytest.mark.parametrize("name", ["Front", "a b", "x/y", "+", "#", "-lead", "a" * 65, "cam\n"])
def test_watch_names_follow_the_camera_name_rules(name: str) -> None:
    with pytest.raises(ValueError, match="camera name"):
        Settings.model_validate({"watches": {name: {"question": "q?"}}})


# --------------------------------------------------------------------------- runtime requests


def test_runtime_watches_are_validated_strictly() -> None:
    cams = ["front_door", "garage"]
    watch = parse_watch({"question": "Is the door open?", "cameras": ["garage"], "threshold": 1}, cameras=cams)
    assert watch.cameras == ["garage"]
    assert watch.threshold == 1.0
    bad = [
        ({"question": "q?", "threshold": "0.5"}, "bad_request"),  # a string is not a number over JSON
        ({"question": "q?", "describe": "yes"}, "bad_request"),
        ({"question": "q?", "on_after": 1.5}, "bad_request"),
        ({"question": "q?", "on_after": True}, "bad_request"),
        ({"question": "q?", "extra": 1}, "bad_request"),
        ({"question": "x" * 1025}, "bad_request"),
        ({"question": "q?", "cameras": ["attic"]}, "unknown_camera"),
        ({"question": "q?", "cameras": ["GARAGE"]}, "bad_request"),
    ]
    for body, code in bad:
        with pytest.raises(RequestError) as err:
            parse_watch(body, cameras=cams)
        assert err.value.code == code, body


# --------------------------------------------------------------------------- hysteresis and cooldown


def test_fires_at_or_above_threshold_zero_always_one_never() -> None:
    assert fires(0.5, 0.5)
    assert not fires(0.4999, 0.5)
    assert fires(0.0, 0.0)
    assert fires(1.0, 0.0)
    assert not fires(1.0, 1.0)
    assert not fires(math.nan, 0.5)
    assert not fires(math.nan, 0.0)


def test_on_after_starts_and_off_after_ends_an_event() -> None:
    rule = Rule(threshold=0.5, on_after=2, off_after=2, cooldown_s=0.0)
    seq = chunks([0.9, 0.1, 0.8, 0.9, 0.2, 0.7, 0.1, 0.1, 0.3])
    state, changes = run_scores(seq, rule)
    # 0.9 alone is not enough; 0.8, 0.9 start it at chunk 2's start; one low (0.2) does not end it;
    # 0.1, 0.1 do, and it ends where its last firing chunk (0.7, chunk 5) ends.
    assert changes == [(3, Change("start", 1016.0, 1032.0, 0.9)), (7, Change("end", 1016.0, 1048.0, 0.9))]
    assert not state.on


def test_cooldown_holds_off_a_new_event_until_it_has_passed() -> None:
    rule = Rule(threshold=0.5, on_after=1, off_after=1, cooldown_s=20.0)
    #         0    1    2    3    4    5
    seq = chunks([0.9, 0.1, 0.9, 0.9, 0.9, 0.9])  # 8 s chunks from t=1000
    _, changes = run_scores(seq, rule)
    # The first event ends at 1008; chunks starting before 1028 (chunks 2 and 3) start nothing.
    assert [(i, c.kind, c.start_s) for i, c in changes] == [
        (0, "start", 1000.0),
        (1, "end", 1000.0),
        (4, "start", 1032.0),
    ]


def test_threshold_zero_fires_on_the_first_chunk_and_never_ends() -> None:
    rule = Rule(threshold=0.0, on_after=1, off_after=1, cooldown_s=60.0)
    state, changes = run_scores(chunks([0.0, 0.0, 1e-9, 0.3]), rule)
    assert changes == [(0, Change("start", 1000.0, 1008.0, 0.0))]
    assert state.on
    assert state.event is not None
    assert state.event.end_s == 1032.0
    assert state.event.peak_score == 0.3


def test_threshold_one_never_fires_even_on_a_saturated_score() -> None:
    state, changes = run_scores(chunks([1.0] * 20), Rule(threshold=1.0, on_after=1, off_after=1, cooldown_s=0.0))
    assert changes == []
    assert state == WatchState()


def test_end_now_ends_an_ongoing_event_at_its_last_firing_chunk() -> None:
    rule = Rule(threshold=0.5, on_after=1, off_after=3, cooldown_s=0.0)
    state, _ = run_scores(chunks([0.9, 0.6, 0.1]), rule)
    ended, change = end_now(state)
    assert change == Change("end", 1000.0, 1016.0, 0.9)
    assert not ended.on
    assert end_now(ended)[1] is None


def reference_events(seq: list[tuple[float, float, float]], rule: Rule) -> list[tuple[int, Change]]:
    """A naive reading of the rules, by looking ahead in the whole sequence (not streaming)."""
    out: list[tuple[int, Change]] = []
    n, i, quiet = len(seq), 0, -math.inf

    def hit(k: int) -> bool:
        return rule.threshold < 1.0 and seq[k][0] >= rule.threshold

    while i < n:
        window = range(i, i + rule.on_after)
        if i + rule.on_after > n or not all(hit(k) and seq[k][1] >= quiet for k in window):
            i += 1
            continue
        on_at = i + rule.on_after - 1
        last, misses, j = on_at, 0, on_at + 1
        while j < n and misses < rule.off_after:
            last, misses = (j, 0) if hit(j) else (last, misses + 1)
            j += 1
        peak_at_start = max(seq[k][0] for k in window)
        out.append((on_at, Change("start", seq[i][1], seq[on_at][2], peak_at_start)))
        if misses < rule.off_after:
            break
        out.append((j - 1, Change("end", seq[i][1], seq[last][2], max(seq[k][0] for k in range(i, last + 1)))))
        quiet = seq[last][2] + rule.cooldown_s
        i = j
    return out


@st.composite
def scored_chunks(draw: st.DrawFn) -> list[tuple[float, float, float]]:
    scores = draw(st.lists(st.sampled_from([0.0, 0.2, 0.5, 0.7, 1.0]), max_size=40))
    out, t = [], 1000.0
    for score in scores:
        t += draw(st.sampled_from([0.0, 0.0, 5.0, 30.0]))  # a gap now and then (an outage)
        length = draw(st.sampled_from([2.0, 8.0]))
        out.append((score, t, t + length))
        t += length
    return out


rules = st.builds(
    Rule,
    threshold=st.sampled_from([0.0, 0.5, 0.7, 1.0]),
    on_after=st.integers(1, 3),
    off_after=st.integers(1, 3),
    cooldown_s=st.sampled_from([0.0, 10.0, 60.0]),
)


@settings(max_examples=300, deadline=None)
@given(seq=scored_chunks(), rule=rules)
def test_the_state_machine_agrees_with_the_naive_reading(seq: list[tuple[float, float, float]], rule: Rule) -> None:
    state, changes = run_scores(seq, rule)
    assert changes == reference_events(seq, rule)
    # Invariants: starts and ends alternate, events never overlap, cooldowns are kept.
    kinds = [c.kind for _, c in changes]
    assert kinds == ["start", "end"] * (len(kinds) // 2) + ["start"] * (len(kinds) % 2)
    assert state.on == (len(kinds) % 2 == 1)
    ends = [c for _, c in changes if c.kind == "end"]
    starts = [c for _, c in changes if c.kind == "start"]
    for ended, following in zip(ends, starts[1:], strict=False):
        assert following.start_s >= ended.end_s + rule.cooldown_s
    for _, change in changes:
        assert change.start_s < change.end_s  # chunks have a length
    if rule.threshold == 1.0:
        assert changes == []


@settings(max_examples=100, deadline=None)
@given(seq=scored_chunks(), rule=rules, cut=st.integers(0, 40))
def test_a_sequence_can_be_fed_in_pieces(seq: list[tuple[float, float, float]], rule: Rule, cut: int) -> None:
    """The state carries everything between chunks: two halves give the events of the whole."""
    _, whole = run_scores(seq, rule)
    state, first = run_scores(seq[:cut], rule)
    _, second = run_scores(seq[cut:], rule, state)
    assert [c for _, c in whole] == [c for _, c in first] + [c for _, c in second]


def test_step_never_looks_at_the_clock() -> None:
    rule = Rule(threshold=0.5, on_after=1, off_after=1, cooldown_s=1e9)
    state, change = step(WatchState(), 0.9, 5.0, 6.0, rule)
    assert change is not None
    assert change.kind == "start"
    state, change = step(state, 0.0, 6.0, 7.0, rule)
    assert change is not None
    assert change.kind == "end"
    assert state.quiet_until_s == 6.0 + 1e9
