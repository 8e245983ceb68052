#!/usr/bin/env bash
# Installs what vigil and its tests need on Debian/Ubuntu and starts the services they talk to.
# Safe to run twice: every step checks first and does nothing when its work is already done.
#   - Debian packages: redis-server, mosquitto, ffmpeg, GStreamer's RTSP server (for the tests)
#   - .venv with PyTorch (CUDA build where an NVIDIA GPU is present, else the CPU build) and vigil
#   - redis-server on 127.0.0.1:6379 and mosquitto on 127.0.0.1:1883, started only when not listening
# Environment: PYTHON (interpreter, >= 3.11), TORCH_SPEC (pip requirement for torch),
# TORCH_INDEX_URL (an extra index for torch wheels, e.g. PyTorch's CPU-only index).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

log() { printf '[setup] %s\n' "$*" >&2; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo -n "$@"; fi
}

APT_PACKAGES=(
    redis-server mosquitto mosquitto-clients ffmpeg
    python3-gi gir1.2-gst-rtsp-server-1.0 gstreamer1.0-rtsp gstreamer1.0-tools
    gstreamer1.0-plugins-base gstreamer1.0-plugins-good gstreamer1.0-plugins-bad gstreamer1.0-libav
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

install_python() {
    if [ ! -x .venv/bin/python ]; then
        local py; py=$(pick_python)
        log "creating .venv with $py"
        "$py" -m venv .venv || { as_root apt-get install -y -qq python3-venv >/dev/null && "$py" -m venv .venv; }
        .venv/bin/python -m pip install -q -U pip
    fi
    local pip=(.venv/bin/python -m pip install -q)
    if ! .venv/bin/python -c 'import torch' 2>/dev/null; then
        local spec=${TORCH_SPEC:-}
        if [ -z "$spec" ]; then
            # An unpinned torch pulls several GB of CUDA libraries: take them only where a GPU can use them.
            if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then spec="torch"
            else spec="torch==2.13.0"; fi
        fi
        log "installing $spec"
        if [ -n "${TORCH_INDEX_URL:-}" ]; then "${pip[@]}" --extra-index-url "$TORCH_INDEX_URL" "$spec"
        else "${pip[@]}" "$spec"; fi
    fi
    # Reinstall only when pyproject.toml changed since the last install.
    local stamp=.venv/.vigil-installed
    if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
        log "installing vigil and its Python dependencies"
        "${pip[@]}" -e ".[dev]"
        if .venv/bin/python -m pip show torchvision >/dev/null 2>&1; then
            # torchvision's CUDA-only build breaks transformers' VLM imports on CPU machines.
            log "removing torchvision (breaks transformers' VLM imports without CUDA)"
            .venv/bin/python -m pip uninstall -y -q torchvision
        fi
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
        mkdir -p "$ROOT/var"
        mosquitto -d -c "$ROOT/configs/mosquitto.conf"
    fi
    for _ in $(seq 50); do listening 6379 && listening 1883 && return; sleep 0.1; done
    log "redis (6379) or mosquitto (1883) did not start listening"; exit 1
}

install_apt
install_python
start_services
log "ready"
