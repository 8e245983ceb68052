"""systemd notify protocol against real unix datagram sockets (a path and an abstract name)."""

from __future__ import annotations

import asyncio
import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from streamer.notify import Notifier


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A bound SOCK_DGRAM socket standing in for systemd's notify socket, and its address."""
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(2.0)
    yield sock, str(path)
    sock.close()


def received(sock: socket.socket) -> list[str]:
    return sock.recv(4096).decode().split("\n")


def test_ready_status_stopping_reach_the_socket(listener):
    sock, path = listener
    notifier = Notifier({"NOTIFY_SOCKET": path})
    assert notifier.enabled
    assert notifier.ready("serving 2 cameras")
    assert received(sock) == ["READY=1", "STATUS=serving 2 cameras"]
    assert notifier.status("camera garage reconnecting")
    assert received(sock) == ["STATUS=camera garage reconnecting"]
    assert notifier.extend_timeout(30)
    assert received(sock) == ["EXTEND_TIMEOUT_USEC=30000000"]
    assert notifier.stopping()
    assert received(sock) == ["STOPPING=1"]


def test_abstract_socket_address():
    name = f"vigil-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(2.0)
        notifier = Notifier({"NOTIFY_SOCKET": f"@{name}"})
        assert notifier.ready()
        assert received(sock) == ["READY=1"]


def test_noop_without_notify_socket():
    notifier = Notifier({})
    assert not notifier.enabled
    assert notifier.ready() is False
    assert notifier.watchdog() is False
    assert notifier.watchdog_interval_s is None


def test_missing_socket_is_reported_not_raised(tmp_path):
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "absent.sock")})
    assert notifier.ready() is False
    assert notifier.status("still fine") is False


def test_watchdog_interval_only_for_this_process():
    assert Notifier({"WATCHDOG_USEC": "4000000"}).watchdog_interval_s == 4.0
    assert Notifier({"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": str(os.getpid())}).watchdog_interval_s == 4.0
    assert Notifier({"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": str(os.getpid() + 1)}).watchdog_interval_s is None
    assert Notifier({"WATCHDOG_USEC": "0"}).watchdog_interval_s is None
    assert Notifier({"WATCHDOG_USEC": "soon"}).watchdog_interval_s is None


async def test_watchdog_pings_at_half_the_interval_until_stopped(listener):
    sock, path = listener
    sock.setblocking(False)
    interval_s = 0.2
    notifier = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": str(int(interval_s * 1_000_000))})
    stop = asyncio.Event()
    task = asyncio.create_task(notifier.run_watchdog(stop))
    started = time.monotonic()
    await asyncio.sleep(1.0)
    stop.set()
    await asyncio.wait_for(task, 2.0)
    elapsed = time.monotonic() - started
    pings = []
    while True:
        try:
            pings.append(sock.recv(4096).decode())
        except BlockingIOError:
            break
    assert set(pings) == {"WATCHDOG=1"}
    # One ping per half interval (0.1 s) over ~1 s, with slack for a loaded CI machine.
    expected = elapsed / (interval_s / 2)
    assert expected * 0.5 <= len(pings) <= expected + 2


async def test_a_wedged_loop_stops_the_pings(listener):
    sock, path = listener
    sock.setblocking(False)
    notifier = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "100000"})
    stop = asyncio.Event()
    task = asyncio.create_task(notifier.run_watchdog(stop))
    await asyncio.sleep(0.12)
    while True:  # drain what came while the loop ran
        try:
            sock.recv(4096)
        except BlockingIOError:
            break
    time.sleep(0.5)  # the loop is blocked: nothing may be sent meanwhile  # noqa: ASYNC251
    with pytest.raises(BlockingIOError):
        sock.recv(4096)
    stop.set()
    await asyncio.wait_for(task, 2.0)
