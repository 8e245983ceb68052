"""``vigil ask`` and ``vigil status`` against a running MqttApi on the real broker."""

from __future__ import annotations

import asyncio
import io
import json

from streamer.cli import build_parser
from streamer.client import ask, cli_ask, status
from streamer.mqtt_api import MqttApi
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


async def test_status_prints_the_camera_table(broker, prefix):
    settings = settings_for(*broker, prefix)
    api = MqttApi(settings, tz=TZ, cameras=CAMERAS, answer=echo_answer)
    async with running(api):
        await api.publish_camera_state("garage", {"state": "connected", "input_fps": 10.0, "reconnects": 2})
        await api.publish_camera_state("front_door", {"state": "reconnecting", "error": "connection refused"})
        out = io.StringIO()
        code = await status(settings, timeout_s=0.5, out=out, err=io.StringIO())
    lines = out.getvalue().splitlines()
    assert code == 0
    assert lines[0] == f"vigil ({prefix}): online"
    assert lines[1].split() == [
        "camera",
        "state",
        "input_fps",
        "sampled_fps",
        "frames_dropped",
        "reconnects",
        "last_frame_age_s",
        "error",
    ]
    assert lines[2].split()[:2] == ["front_door", "reconnecting"]
    assert lines[2].endswith("connection refused")
    assert lines[3].split() == ["garage", "connected", "10.0", "-", "-", "2", "-", "-"]
    out = io.StringIO()
    assert await status(settings, timeout_s=0.3, out=out, err=io.StringIO()) == 1  # offline after stop
    assert out.getvalue().splitlines()[0] == f"vigil ({prefix}): offline"
