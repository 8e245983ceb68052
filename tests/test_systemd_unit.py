"""The shipped unit file: the settings the daemon's notify protocol and GPU access rely on."""

from __future__ import annotations

import shlex
from collections import defaultdict
from pathlib import Path

from streamer.cli import build_parser

UNIT = Path(__file__).resolve().parents[1] / "systemd" / "vigil.service"


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """[Section] → key → every value (systemd allows repeated keys, e.g. DeviceAllow)."""
    sections: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1]
            continue
        key, _, value = line.partition("=")
        sections[current][key.strip()].append(value.strip())
    return sections


def test_unit_is_a_notify_service_with_watchdog_and_restart() -> None:
    service = parse_unit(UNIT.read_text())["Service"]
    assert service["Type"] == ["notify"]
    assert service["NotifyAccess"] == ["main"]
    assert float(service["WatchdogSec"][0]) > 0
    assert service["Restart"] == ["on-failure"]
    assert service["StateDirectory"] == ["vigil"]


def test_exec_start_is_a_valid_vigil_serve_command() -> None:
    service = parse_unit(UNIT.read_text())["Service"]
    argv = shlex.split(service["ExecStart"][0])
    assert Path(argv[0]).name == "vigil"
    args = build_parser().parse_args(argv[1:])
    assert args.command == "serve"
    assert args.config == "/etc/vigil/config.yaml"


def test_hardening_still_lets_the_gpu_through() -> None:
    service = parse_unit(UNIT.read_text())["Service"]
    # PrivateDevices=yes would hide /dev/nvidia*; the device policy opens exactly what CUDA needs.
    assert service["PrivateDevices"] == ["no"]
    assert service["DevicePolicy"] == ["closed"]
    allowed = {value.split()[0] for value in service["DeviceAllow"]}
    assert {"char-nvidiactl", "char-nvidia-uvm"} <= allowed
    assert service["ProtectSystem"] == ["strict"]
    assert service["NoNewPrivileges"] == ["yes"]
