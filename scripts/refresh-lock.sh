#!/usr/bin/env bash
# Refreshes requirements.lock: the newest releases inside pyproject.toml's ranges, taken only when
# the whole test suite passes with them.
#   1. a new virtualenv (.venv-refresh) gets the locked torch, then vigil with its dev tools resolved
#      afresh by pip (newest versions that pyproject.toml admits);
#   2. its exact package set is written to a candidate lock;
#   3. the README's test command runs in that virtualenv with that candidate (lint and every test);
#   4. only then does the candidate replace requirements.lock. On failure the old lock stays and
#      the candidate is left in var/requirements.lock.candidate for a look.
# Usage: bash scripts/refresh-lock.sh            (TORCH_SPEC=torch==X to move torch as well)
set -euo pipefail
cd "$(dirname "$0")/.."
log() { printf '[refresh-lock] %s\n' "$*" >&2; }

VENV=.venv-refresh
CANDIDATE=var/requirements.lock.candidate
mkdir -p var
rm -rf "$VENV"
python=$(command -v "${PYTHON:-python3}")
"$python" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
"${pip[@]}" -U pip setuptools
torch_spec=${TORCH_SPEC:-torch==$(sed -n 's/^torch==\([^ ;]*\).*/\1/p' requirements.lock)}
log "installing $torch_spec, then vigil[dev] at the newest versions pyproject.toml admits"
"${pip[@]}" "$torch_spec"
"${pip[@]}" -U -e ".[dev]"
# torchvision (pulled in by nothing today, but by some model extras) breaks transformers on CPU.
"$VENV/bin/python" -m pip uninstall -y -q torchvision 2>/dev/null || true

{
    echo "# The exact Python package set that scripts/setup.sh installs (pip --no-deps)."
    echo "# Written by scripts/refresh-lock.sh on $(date -u +%Y-%m-%d) after the whole suite passed with it;"
    echo "# do not edit by hand. torch's local build label is dropped: the same line takes the CPU"
    echo "# build here and the CUDA build (with the NVIDIA libraries it pins) where the registry gives one."
    "$VENV/bin/python" -m pip freeze --all --exclude-editable \
        | grep -viE '^(pip|vigil)==' | sed -E 's/^(torch==[^+]*)\+.*/\1/' | LC_ALL=C sort -f
} > "$CANDIDATE"
log "candidate lock: $CANDIDATE ($(grep -c '==' "$CANDIDATE") packages); running the suite with it"

if VENV="$VENV" LOCK="$CANDIDATE" bash scripts/test.sh "$@"; then
    if cmp -s <(grep -v '^#' "$CANDIDATE") <(grep -v '^#' requirements.lock); then
        log "suite green; the newest set is the locked one, requirements.lock unchanged"
    else
        diff <(grep -v '^#' requirements.lock) <(grep -v '^#' "$CANDIDATE") || true
        cp "$CANDIDATE" requirements.lock
        log "suite green: requirements.lock rewritten; commit it"
    fi
else
    log "suite failed with the candidate set: requirements.lock left as it was ($CANDIDATE kept)"
    exit 1
fi
