"""``vigil ask`` and ``vigil status`` against a running MqttApi on the real broker."""

from __future__ import annotations

import asyncio
import io
import json
import re
import time

from streamer.cli import build_parser
from streamer.client import STALE_AFTER_S, ask, cli_ask, status
from streamer.daemon import STATUS_INTERVAL_S
from streamer.mqtt_api import MqttApi
from streamer.timefmt import iso_time
from tests.test_mqtt_api import CAMERAS, TZ, echo_answer, running, settings_for


def write_config(tmp_path, host, port, prefix):
    path = tmp_path / "config.yaml"
    path.write_text(f"timezone: Europe/Berlin\nmqtt:\n  host: {host}\n  port: {port}\n  topic_prefix: {prefix}\n")
    return str(path)


async def test_cli_ask_prints_answer_and_sources(broker, prefix, tmp_path, capsys):
    api = MqttApi(settings_for(*broker, prefix), tz=TZ, cameras=CAMERAS, answer=echo_answer)
    config = write_config(tmp_path, *broker, prefix)
    args = build_parser().parse_args(
        ["ask", "who came?", "--camera", "Garage", "--after", "2026-11-20T10:00:00", "-c", config, "--timeout", "10"]
    )
    async with running(api):
        code = await asyncio.to_thread(cli_ask, args)
    out = capsys.readouterr().out
    assert code == 0
    assert out.splitlines()[0] == "you asked: who came?"
    assert "garage  2026-11-20T10:00:00.000+01:00 – 2026-11-20T10:00:08.000+01:00  (score 0.500)" in out


async def test_ask_streams_deltas_and_json(broker, prefix):
    settings = settings_for(*broker, prefix)
    api = MqttApi(settings, tz=TZ, cameras=CAMERAS, answer=echo_answer)
    async with running(api):
        out, err = io.StringIO(), io.StringIO()
        code = await ask(settings, {"question": "any cars", "stream": True}, timeout_s=10, out=out, err=err)
        raw, err2 = io.StringIO(), io.StringIO()
        code2 = await ask(settings, {"question": "any cars"}, timeout_s=10, out=raw, err=err2, as_json=True)
    assert code == 0
    assert out.getvalue().startswith("you asked: any cars \n")
    assert "Sources:" in out.getvalue()
    assert code2 == 0
    assert json.loads(raw.getvalue())["answer"] == "you asked: any cars"


async def test_ask_reports_error_replies_and_timeouts(broker, prefix):
    settings = settings_for(*broker, prefix)
    api = MqttApi(settings, tz=TZ, cameras=CAMERAS, answer=echo_answer)
    async with running(api):
        out, err = io.StringIO(), io.StringIO()
        code = await ask(settings, {"question": "x", "cameras": ["attic"]}, timeout_s=10, out=out, err=err)
    assert code == 1
    assert err.getvalue().startswith("error: unknown_camera: unknown camera(s) attic")
    # Nobody serves this prefix: the client gives up after its timeout.
    lonely = settings_for(*broker, prefix + "-nobody")
    err = io.StringIO()
    assert await ask(lonely, {"question": "hello?"}, timeout_s=0.5, out=io.StringIO(), err=err) == 1
    assert "no answer within 0.5 s" in err.getvalue()


async def test_ask_reports_an_unreachable_broker(prefix):
    settings = settings_for("127.0.0.1", 1, prefix)  # nothing listens on port 1
    err = io.StringIO()
    assert await ask(settings, {"question": "hello?"}, timeout_s=5, out=io.StringIO(), err=err) == 1
    assert err.getvalue().startswith("error: MQTT broker 127.0.0.1:1:")


async def test_status_prints_health_counters_and_the_camera_table(broker, prefix):
    settings = settings_for(*broker, prefix)
    api = MqttApi(settings, tz=TZ, cameras=CAMERAS, answer=echo_answer)
    now = iso_time(time.time(), TZ)
    async with running(api):
        await api.publish_camera_state("garage", {"state": "connected", "input_fps": 10.0, "reconnects": 2})
        await api.publish_camera_state(
            "front_door", {"state": "reconnecting", "error": "connection refused", "published_at": now}
        )
        memory = {
            "garage": {"0": {"chunks": 10, "bytes": 2_500_000}, "total": {"chunks": 10, "bytes": 2_500_000}},
            "attic": None,
            "bogus": {"total": {"chunks": "many"}},  # malformed rows are not shown
        }
        await api.publish_status(
            {"published_at": now, "health": "ok", "reason": None, "chunks_stored": 12, "memory": memory}
        )
        out = io.StringIO()
        code = await status(settings, timeout_s=0.5, out=out, err=io.StringIO())
    lines = out.getvalue().splitlines()
    assert code == 0
    assert lines[0] == f"vigil ({prefix}): online"
    assert lines[1] == "health: ok"
    assert lines[2].split()[0] == "chunks_stored=12"
    assert lines[2].split()[1] == "chunks_failed=-"  # a counter the status did not carry
    assert lines[3].split() == [
        "camera",
        "state",
        "input_fps",
        "sampled_fps",
        "frames_dropped",
        "reconnects",
        "last_frame_age_s",
        "error",
    ]
    assert lines[4].split()[:2] == ["front_door", "reconnecting"]
    assert lines[4].endswith("connection refused")
    assert lines[5].split() == ["garage", "connected", "10.0", "-", "-", "2", "-", "-"]
    assert lines[6:] == [
        "memory attic: unknown (counters not yet recounted)",
        "memory garage: 2.5 MB in 10 chunks (tier 0: 10 chunks, 2.5 MB)",
    ]
    # After the stop `offline` is retained: no camera state can be believed any more.
    out = io.StringIO()
    assert await status(settings, timeout_s=0.3, out=out, err=io.StringIO()) == 1
    lines = out.getvalue().splitlines()
    assert lines[0] == f"vigil ({prefix}): offline"
    assert lines[1] == "health: unknown (stale: vigil is offline; last: ok)"
    assert lines[4].split()[:2] == ["front_door", "unknown"]
    assert lines[4].endswith("stale: vigil is offline; last: reconnecting")
    assert lines[5].split()[:2] == ["garage", "unknown"]


async def test_status_marks_old_states_stale_and_says_when_degraded(broker, prefix):
    settings = settings_for(*broker, prefix)
    api = MqttApi(settings, tz=TZ, cameras=CAMERAS, answer=echo_answer)
    now_s = time.time()
    old = iso_time(now_s - STALE_AFTER_S - 30, TZ)
    async with running(api):
        await api.publish_camera_state("garage", {"state": "connected", "published_at": old})
        await api.publish_camera_state("front_door", {"state": "connected", "published_at": iso_time(now_s, TZ)})
        await api.publish_status(
            {"published_at": iso_time(now_s, TZ), "health": "degraded", "reason": "camera garage: 3 chunks"}
        )
        out = io.StringIO()
        code = await status(settings, timeout_s=0.5, out=out, err=io.StringIO())
    lines = out.getvalue().splitlines()
    assert code == 1  # online, but not doing its job
    assert lines[1] == "health: degraded: camera garage: 3 chunks"
    assert lines[4].split()[:2] == ["front_door", "connected"]
    assert lines[5].split()[:2] == ["garage", "unknown"]
    assert re.search(r"stale: published (\d+) s ago; last: connected$", lines[5])
    assert int(re.search(r"published (\d+) s", lines[5]).group(1)) >= STALE_AFTER_S


def test_the_staleness_bound_leaves_room_for_several_missed_refreshes():
    assert STALE_AFTER_S >= 3 * STATUS_INTERVAL_S
