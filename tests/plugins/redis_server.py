"""A redis-server of one test alone, which the test may stop and start again."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.plugins.net import accepts, free_port

START_TIMEOUT_S = 10.0


class PrivateRedis:
    """A redis-server of this test alone, which the test can stop and start again."""

    def __init__(self, port: int, data_dir: Path | None = None) -> None:
        """``data_dir``: keep data across stop/start (an fsynced append-only file), like a real Redis."""
        self.port = port
        self.data_dir = data_dir
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed; install it with `bash scripts/setup.sh`", pytrace=False)
        persistence = ["--appendonly", "no"]
        if self.data_dir is not None:
            persistence = ["--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.data_dir)]
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", *persistence],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if accepts(self.port):
                return
            time.sleep(0.05)
        pytest.fail(f"private redis-server did not listen on port {self.port} within 10 s", pytrace=False)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None


@pytest.fixture
def private_redis() -> Iterator[PrivateRedis]:
    server = PrivateRedis(free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop()
