"""The systemd notify protocol, without dependencies (sd_notify(3)).

systemd passes ``NOTIFY_SOCKET`` (a path, or ``@name`` for an abstract socket) to a ``Type=notify``
service; the service sends newline-separated ``KEY=value`` datagrams to it: ``READY=1`` once it
serves, ``STATUS=…`` for ``systemctl status``, ``WATCHDOG=1`` at least every ``WatchdogSec``,
``STOPPING=1`` when it begins to stop. Outside systemd (no ``NOTIFY_SOCKET``) every call is a no-op.

The watchdog pings come from a task on the event loop, not from a thread: if the loop wedges the
pings stop and systemd kills and restarts the service, which is the point of the watchdog.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Mapping

from memory.aio import wait_set

log = logging.getLogger(__name__)

USEC_PER_S = 1_000_000
# sd_watchdog_enabled(3) recommends pinging at half the interval, leaving room for a slow tick.
WATCHDOG_FRACTION = 0.5


def _address(value: str) -> str | bytes:
    """``@name`` is an abstract socket: a leading NUL byte on the wire (unix(7))."""
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    return value


class Notifier:
    """Sends notify messages to systemd; a no-op outside a notify service."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        raw = env.get("NOTIFY_SOCKET") or None
        self._address = _address(raw) if raw else None
        self._failed = False
        self.watchdog_interval_s = self._watchdog_interval(env)

    @staticmethod
    def _watchdog_interval(env: Mapping[str, str]) -> float | None:
        """WatchdogSec as seconds, when it is set for this process (sd_watchdog_enabled(3))."""
        usec = env.get("WATCHDOG_USEC")
        if not usec:
            return None
        pid = env.get("WATCHDOG_PID")
        if pid and pid.isdigit() and int(pid) != os.getpid():
            return None  # meant for another process (e.g. our parent)
        try:
            value = int(usec)
        except ValueError:
            log.warning("ignoring WATCHDOG_USEC=%r: not an integer", usec)
            return None
        return value / USEC_PER_S if value > 0 else None

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def send(self, *assignments: str) -> bool:
        """Send ``KEY=value`` lines in one datagram; True when systemd got it (False outside systemd)."""
        if self._address is None:
            return False
        try:
            # A socket per message, as sd_notify(3) does: nothing to close, nothing to leak, and
            # the rate (a few per minute) makes the cost irrelevant.
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.sendto("\n".join(assignments).encode(), self._address)
        except OSError as exc:
            # Logged once: a broken notify socket must not flood the journal every watchdog tick.
            if not self._failed:
                log.warning("cannot notify systemd at %s: %s", os.environ.get("NOTIFY_SOCKET", "?"), exc)
                self._failed = True
            return False
        self._failed = False
        return True

    def ready(self, status: str | None = None) -> bool:
        return self.send("READY=1", *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> bool:
        return self.send(f"STATUS={text}")

    def stopping(self, status: str | None = None) -> bool:
        return self.send("STOPPING=1", *([f"STATUS={status}"] if status else []))

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for more time to start or stop (e.g. while a large index loads)."""
        return self.send(f"EXTEND_TIMEOUT_USEC={int(seconds * USEC_PER_S)}")

    async def run_watchdog(self, stop: asyncio.Event) -> None:
        """Ping ``WATCHDOG=1`` every half interval until ``stop``; returns at once when not enabled."""
        interval = self.watchdog_interval_s
        if interval is None or not self.enabled:
            return
        period = interval * WATCHDOG_FRACTION
        log.info("systemd watchdog every %.1f s (WatchdogSec=%.1f s)", period, interval)
        while not stop.is_set():
            self.watchdog()
            await wait_set(stop, period)
