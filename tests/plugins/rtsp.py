"""RTSP server fixtures: real GStreamer RTSP servers on free loopback ports.

The server (scripts/rtsp_server.py) needs GStreamer's Python bindings, which only the system
interpreter has, so it always runs as a ``/usr/bin/python3`` subprocess. Every server a test starts
is killed at teardown.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.plugins.net import accepts, free_port

ROOT = Path(__file__).resolve().parents[2]
SERVER_SCRIPT = ROOT / "scripts" / "rtsp_server.py"
DATA = ROOT / "tests" / "data"
SYSTEM_PYTHON = "/usr/bin/python3"
SETUP_HINT = "run `bash scripts/setup.sh` (installs gir1.2-gst-rtsp-server-1.0 and python3-gi)"
# Starting GStreamer and binding takes well under a second; allow for a loaded 2-core machine.
START_TIMEOUT_S = 15.0
POLL_S = 0.05


@dataclass
class RtspServer:
    """One server process; ``start``/``kill`` may be called again to simulate an outage."""

    clip: Path | None
    port: int = field(default_factory=free_port)
    mount: str = "/cam"
    stall_after_s: float | None = None
    silent: bool = False
    protocols: str | None = None  # "udp" or "tcp": offer only that RTP transport
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"rtsp://127.0.0.1:{self.port}{self.mount}"

    def start(self) -> RtspServer:
        cmd = [SYSTEM_PYTHON, str(SERVER_SCRIPT), "--port", str(self.port), "--mount", self.mount]
        if self.silent:
            cmd.append("--silent")
        else:
            cmd += ["--file", str(self.clip)]
        if self.stall_after_s is not None:
            cmd += ["--stall-after", str(self.stall_after_s)]
        if self.protocols is not None:
            cmd += ["--protocols", self.protocols]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not accepts(self.port):
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                pytest.fail(f"RTSP server exited with {self.proc.returncode}: {err.strip()[-500:]}", pytrace=False)
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"RTSP server did not listen on port {self.port} within {START_TIMEOUT_S} s")
            time.sleep(POLL_S)
        return self

    def kill(self) -> None:
        """Kill the process at once (an abrupt outage, like a camera losing power)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.proc is not None and self.proc.stderr is not None:
            self.proc.stderr.close()
        self.proc = None


def _check_gst() -> None:
    probe = (
        "import gi; gi.require_version('Gst', '1.0'); gi.require_version('GstRtspServer', '1.0'); "
        "from gi.repository import GstRtspServer"
    )
    try:
        result = subprocess.run([SYSTEM_PYTHON, "-c", probe], capture_output=True, timeout=30, check=False)
    except FileNotFoundError:
        pytest.fail(f"{SYSTEM_PYTHON} not found: {SETUP_HINT}", pytrace=False)
    if result.returncode != 0:
        pytest.fail(
            f"{SYSTEM_PYTHON} cannot import gi/GstRtspServer: {SETUP_HINT}\n{result.stderr.decode()[-300:]}",
            pytrace=False,
        )


@pytest.fixture(scope="session")
def gst_available() -> None:
    """Fails (never skips) when the GStreamer RTSP server cannot run here."""
    _check_gst()


@pytest.fixture
def rtsp_servers(gst_available: None) -> Iterator[list[RtspServer]]:
    """A list to append started servers to; every one is killed at teardown."""
    servers: list[RtspServer] = []
    yield servers
    for server in servers:
        server.kill()


@pytest.fixture
def rtsp_server_factory(rtsp_servers: list[RtspServer]) -> Callable[..., RtspServer]:
    """``start(clip_name, **kwargs) -> RtspServer``: a started server serving tests/data/<clip_name>."""

    def start(clip_name: str | None = None, **kwargs: object) -> RtspServer:
        server = RtspServer(clip=DATA / clip_name if clip_name else None, **kwargs)  # type: ignore[arg-type]
        rtsp_servers.append(server)
        return server.start()

    return start
