#!/usr/bin/env bash
# The main job: vigil watches a bundled clip served as a live RTSP camera, remembers it, and is
# asked a question over MQTT; the answer and its citations are printed.
#   bash scripts/demo.sh          the default models (downloaded from the Hugging Face hub)
#   bash scripts/demo.sh --tiny   tiny random models built locally: a real pipeline, noise answers
set -euo pipefail
cd "$(dirname "$0")/.."

TINY=0
case "${1:-}" in
    --tiny) TINY=1 ;;
    "") ;;
    *) echo "usage: bash scripts/demo.sh [--tiny]" >&2; exit 2 ;;
esac

bash scripts/setup.sh
CONFIG=configs/demo.yaml
CLIP=tests/data/one-by-one-person-detection.mp4
PORT=8554
QUESTION="What is happening in the lobby right now?"
mkdir -p var/demo
VIGIL=.venv/bin/vigil

if [ "$TINY" = 1 ]; then
    echo "WARNING: --tiny uses tiny models with random weights: the pipeline is real, the answers are noise." >&2
    [ -d var/demo/tiny/vlm ] || "$VIGIL" models make-tiny var/demo/tiny
    export VIGIL_MODELS__VLM=var/demo/tiny/vlm VIGIL_MODELS__EMBEDDER=var/demo/tiny/embedder
    WAIT_CHUNKS=3
else
    # The default models come from the Hugging Face hub (or its cache); say so plainly when they can't.
    if ! .venv/bin/python - "$CONFIG" <<'PY'
import sys
from pathlib import Path
from huggingface_hub import snapshot_download
from streamer.settings import load_settings
models = load_settings(sys.argv[1]).models
for repo in (models.vlm, models.embedder):
    if Path(repo).is_dir():  # a local copy: nothing to download
        continue
    try:
        snapshot_download(repo)
    except Exception as exc:  # offline, unknown id, no space: all mean "cannot run the real demo"
        print(f"cannot download the model {repo}: {type(exc).__name__}: {exc}", file=sys.stderr)
        sys.exit(1)
PY
    then
        cat >&2 <<'MSG'

The demo's default models could not be downloaded (no access to the Hugging Face hub from here?).
  - Run `bash scripts/demo.sh --tiny` to watch the same pipeline with tiny random models (answers are noise), or
  - set VIGIL_MODELS__VLM and VIGIL_MODELS__EMBEDDER to local copies of the models and run it again.
MSG
        exit 1
    fi
    # One chunk takes long on a CPU with real models: a single stored chunk is enough to ask about.
    WAIT_CHUNKS=1
fi

cleanup() {
    [ -n "${DAEMON:-}" ] && kill -TERM "$DAEMON" 2>/dev/null && wait "$DAEMON" 2>/dev/null
    [ -n "${SERVER:-}" ] && kill -TERM "$SERVER" 2>/dev/null && wait "$SERVER" 2>/dev/null
    return 0
}
trap cleanup EXIT

# A fresh demo memory each run, so the answer is about this run's footage.
.venv/bin/python - "$CONFIG" <<'PY'
import sys, redis
from streamer.settings import load_settings
settings = load_settings(sys.argv[1])
client = redis.Redis.from_url(settings.redis.url)
keys = list(client.scan_iter(match=f"{settings.redis.key_prefix}:*", count=1000))
if keys:
    client.delete(*keys)
PY
rm -rf var/demo/index

echo "serving $CLIP as rtsp://127.0.0.1:$PORT/lobby" >&2
/usr/bin/python3 scripts/rtsp_server.py --port "$PORT" --file "$CLIP" --mount /lobby >var/demo/rtsp.log 2>&1 &
SERVER=$!
"$VIGIL" serve -c "$CONFIG" 2>var/demo/daemon.log &
DAEMON=$!
echo "vigil serve is running (log: var/demo/daemon.log); waiting for $WAIT_CHUNKS chunk(s) of memory" >&2
if ! .venv/bin/python scripts/wait_chunks.py -c "$CONFIG" --camera lobby --chunks "$WAIT_CHUNKS" --timeout 900; then
    echo "vigil stored no memory in time; the end of its log:" >&2
    tail -n 30 var/demo/daemon.log >&2
    exit 1
fi
echo "asking: $QUESTION" >&2
"$VIGIL" ask "$QUESTION" --camera lobby -c "$CONFIG" --timeout 600
