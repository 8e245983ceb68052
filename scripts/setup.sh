#!/usr/bin/env bash
# Installs what vigil and its tests need on Debian/Ubuntu and starts the services they talk to.
# Safe to run twice: every step checks first and does nothing when its work is already done.
#   - Debian packages: redis-server, mosquitto, ffmpeg, GStreamer's RTSP server and promtool (for the tests)
#   - .venv with exactly the Python packages of requirements.lock (PyTorch: the locked version, the
#     CPU build here, the CUDA build where the registry gives one) and vigil in editable mode
#   - redis-server on 127.0.0.1:6379 and mosquitto on 127.0.0.1:1883, started only when not listening
# Environment: PYTHON (interpreter, >= 3.11), TORCH_SPEC (pip requirement for torch, default the
# locked version), TORCH_INDEX_URL (an extra index for torch wheels, e.g. PyTorch's CPU-only index),
# VENV (default .venv), LOCK (default requirements.lock).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV=${VENV:-.venv}             # where the virtualenv lives (scripts/refresh-lock.sh uses another)
LOCK=${LOCK:-requirements.lock} # the exact Python package set to install

log() { printf '[setup] %s\n' "$*" >&2; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo -n "$@"; fi
}

APT_PACKAGES=(
    redis-server mosquitto mosquitto-clients ffmpeg
    python3-gi gir1.2-gst-rtsp-server-1.0 gstreamer1.0-rtsp gstreamer1.0-tools
    gstreamer1.0-plugins-base gstreamer1.0-plugins-good gstreamer1.0-plugins-bad gstreamer1.0-libav
    prometheus  # promtool, for the /metrics test (tests/test_metrics.py)
)

install_apt() {
    local missing=()
    for pkg in "${APT_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        log "installing Debian packages: ${missing[*]}"
        as_root apt-get update -qq
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
}

pick_python() {
    local candidates=("${PYTHON:-}" python3.13 python3.12 python3.11 python3)
    for py in "${candidates[@]}"; do
        [ -n "$py" ] && command -v "$py" >/dev/null 2>&1 || continue
        if "$py" -c 'import sys, venv; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            echo "$py"; return
        fi
    done
    log "Python >= 3.11 with the venv module is required (Debian: apt-get install python3 python3-venv)"
    exit 1
}

# The lock decides what a fresh machine gets: exact versions of every Python package, torch included
# (the CPU build here; on a GPU machine the same version's CUDA build, whose own metadata pins the
# NVIDIA libraries exactly). scripts/refresh-lock.sh rewrites it, only when the whole suite is green.
locked_version() { sed -n "s/^$1==\([^ ;]*\).*/\1/p" "$LOCK"; }

install_python() {
    if [ ! -x "$VENV/bin/python" ]; then
        local py; py=$(pick_python)
        log "creating $VENV with $py"
        "$py" -m venv "$VENV" || { as_root apt-get install -y -qq python3-venv >/dev/null && "$py" -m venv "$VENV"; }
    fi
    local python="$VENV/bin/python"
    local pip=("$python" -m pip install -q --disable-pip-version-check)
    local torch_version; torch_version=$(locked_version torch)
    if [ "$("$python" -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null)" != "$torch_version" ]; then
        local spec=${TORCH_SPEC:-torch==$torch_version}
        log "installing $spec"
        # With its dependencies: a CUDA build brings the NVIDIA libraries its metadata pins.
        if [ -n "${TORCH_INDEX_URL:-}" ]; then "${pip[@]}" --extra-index-url "$TORCH_INDEX_URL" "$spec"
        else "${pip[@]}" "$spec"; fi
    fi
    # Reinstall only when the lock or pyproject.toml changed since the last install.
    local stamp="$VENV/.vigil-installed"
    if [ ! -f "$stamp" ] || [ "$LOCK" -nt "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
        log "installing the locked Python packages ($LOCK) and vigil"
        # --no-deps: the lock is the whole set; nothing is resolved on the install machine.
        "${pip[@]}" --no-deps -r <(grep -v '^torch==' "$LOCK")
        "${pip[@]}" --no-deps --no-build-isolation -e .
        # Packages a previous install left that the lock no longer names (torch's CUDA libraries stay).
        local extra
        extra=$("$python" - "$LOCK" <<'PY'
import re, sys
from importlib.metadata import distributions

def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()

locked = {norm(line.split("==")[0]) for line in open(sys.argv[1]) if "==" in line}
installed = {norm(d.metadata["Name"]) for d in distributions()}
# torch's own dependencies on a GPU machine (NVIDIA libraries, triton) come with torch, not the lock.
extra = {n for n in installed - locked - {"vigil", "pip"} if not n.startswith(("nvidia-", "triton", "cuda-"))}
print(" ".join(sorted(extra)))
PY
)
        if [ -n "$extra" ]; then
            log "removing packages the lock does not name: $extra"
            "$python" -m pip uninstall -y -q $extra
        fi
        "$python" -m pip check >/dev/null || { "$python" -m pip check; log "the installed set is inconsistent"; exit 1; }
        touch "$stamp"
    fi
}

listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

start_services() {
    if ! listening 6379; then
        log "starting redis-server on 127.0.0.1:6379"
        mkdir -p "$ROOT/var/redis"
        redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
            --dir "$ROOT/var/redis" --logfile "$ROOT/var/redis/redis.log"
    fi
    if ! listening 1883; then
        log "starting mosquitto on 127.0.0.1:1883"
        # persistence_location in configs/mosquitto.conf is relative: start it from the repo root.
        mkdir -p "$ROOT/var/mosquitto"
        # Started as root, mosquitto drops to its own user before it saves the database.
        if [ "$(id -u)" = 0 ] && id mosquitto >/dev/null 2>&1; then chown mosquitto "$ROOT/var/mosquitto"; fi
        (cd "$ROOT" && mosquitto -d -c "$ROOT/configs/mosquitto.conf")
    fi
    for _ in $(seq 50); do listening 6379 && listening 1883 && return; sleep 0.1; done
    log "redis (6379) or mosquitto (1883) did not start listening"; exit 1
}

install_apt
install_python
start_services
log "ready"
