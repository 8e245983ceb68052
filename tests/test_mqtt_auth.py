"""The question service on a broker that requires TLS and a password (a private Mosquitto)."""

from __future__ import annotations

import asyncio
import json
import ssl
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from zoneinfo import ZoneInfo

import aiomqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from streamer.mqtt_api import MqttApi
from streamer.settings import MqttSettings
from tests.plugins.net import accepts, free_port
from tests.test_mqtt_api import echo_answer

USER, PASSWORD = "vigil", "s3cret-for-tests"
START_TIMEOUT_S = 10.0


def _run(*cmd: str, cwd: Path) -> None:
    subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, timeout=60)


def _make_pki(directory: Path) -> None:
    """A throwaway CA and a server certificate for 127.0.0.1, made with the openssl CLI."""
    _run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=vigil test CA",
         "-keyout", "ca.key", "-out", "ca.crt", cwd=directory)  # fmt: skip
    _run("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
         "-keyout", "server.key", "-out", "server.csr", cwd=directory)  # fmt: skip
    (directory / "san.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    _run("openssl", "x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
         "-days", "1", "-extfile", "san.cnf", "-out", "server.crt", cwd=directory)  # fmt: skip


@pytest.fixture
def secure_broker(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """(port, CA file) of a Mosquitto that accepts only TLS clients with USER/PASSWORD."""
    _make_pki(tmp_path)
    _run("mosquitto_passwd", "-b", "-c", "passwd", USER, PASSWORD, cwd=tmp_path)
    port = free_port()
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(
        f"user root\nlistener {port} 127.0.0.1\nallow_anonymous false\npassword_file {tmp_path / 'passwd'}\n"
        f"cafile {tmp_path / 'ca.crt'}\ncertfile {tmp_path / 'server.crt'}\nkeyfile {tmp_path / 'server.key'}\n"
        "persistence false\nset_tcp_nodelay true\n"
    )
    proc = subprocess.Popen(["mosquitto", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + START_TIMEOUT_S
    try:
        while not accepts(port):
            if proc.poll() is not None:
                pytest.fail(f"mosquitto with TLS did not start: {proc.stderr.read().decode()[-500:]}", pytrace=False)
            assert time.monotonic() < deadline, "mosquitto with TLS did not listen in time"
            time.sleep(0.05)
        yield port, tmp_path / "ca.crt"
    finally:
        proc.kill()
        proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


def _settings(port: int, prefix: str, ca: Path, password: str) -> MqttSettings:
    return MqttSettings.model_validate(
        {
            "host": "127.0.0.1",
            "port": port,
            "topic_prefix": prefix,
            "client_id": f"{prefix}-svc",
            "username": USER,
            "password": password,
            "tls": True,
            "tls_ca_file": str(ca),
            "reconnect_max_s": 0.5,
        }
    )


async def test_questions_over_tls_with_a_password(secure_broker: tuple[int, Path], prefix: str) -> None:
    port, ca = secure_broker
    api = MqttApi(_settings(port, prefix, ca, PASSWORD), tz=ZoneInfo("UTC"), cameras=["door"], answer=echo_answer)
    stop, ready = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(api.run(stop, ready))
    try:
        await asyncio.wait_for(ready.wait(), START_TIMEOUT_S)
        reply_topic = f"{prefix}/replies/{uuid.uuid4().hex[:6]}"
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = reply_topic
        props.CorrelationData = b"tls-1"
        tls = aiomqtt.TLSParameters(ca_certs=str(ca), cert_reqs=ssl.CERT_REQUIRED)
        async with aiomqtt.Client(
            "127.0.0.1", port, username=USER, password=PASSWORD, tls_params=tls, protocol=aiomqtt.ProtocolVersion.V5
        ) as client:
            await client.subscribe(reply_topic, qos=1)
            await client.publish(f"{prefix}/ask", json.dumps({"question": "who is there?"}), qos=1, properties=props)
            async with asyncio.timeout(START_TIMEOUT_S):
                message = await anext(aiter(client.messages))
        assert message.properties is not None
        assert message.properties.CorrelationData == b"tls-1"
        assert "who is there?" in json.loads(message.payload)["answer"]
    finally:
        stop.set()
        await asyncio.wait_for(task, START_TIMEOUT_S)


async def test_a_wrong_password_keeps_retrying_without_crashing(
    secure_broker: tuple[int, Path], prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    port, ca = secure_broker
    api = MqttApi(_settings(port, prefix, ca, "wrong"), tz=ZoneInfo("UTC"), cameras=["door"], answer=echo_answer)
    stop, ready = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(api.run(stop, ready))
    await asyncio.sleep(2.0)
    assert not ready.is_set()
    assert not task.done()  # still retrying: a refused login is a state, not a crash
    stop.set()
    await asyncio.wait_for(task, START_TIMEOUT_S)
    messages = [record.getMessage().lower() for record in caplog.records]
    assert any("refused" in m or "not authorized" in m for m in messages), messages
