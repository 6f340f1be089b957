#!/usr/bin/env bash
# Build the container image and prove it serves, the way a cluster runs it:
# read-only root filesystem, non-root, all capabilities dropped. Checks readiness time, a real
# digit prediction, a mounted model, the HEALTHCHECK, and a graceful SIGTERM stop (exit 0,
# in-flight requests answered). Exits non-zero with a FAIL line on the first broken step.
#
#   scripts/container_smoke.sh                   # IMAGE=mnist-service:local
#   IMAGE=mnist-service:1.0.0 scripts/container_smoke.sh
#
# Knobs (env): IMAGE, BASE_IMAGE (default: a Debian base built locally by container_base.sh;
# set python:3.11-slim-bookworm where a registry is reachable), PIP_EXTRA_ARGS (default: this
# machine's pip find-links folder if it has one, else the Dockerfile's PyTorch CPU index),
# PODMAN_RUNTIME (default /usr/sbin/runc; empty for podman's own), SMOKE_PORT, READY_TIMEOUT,
# TRAIN_ARGS (used only when models/mnist_cnn.pt is missing).
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${IMAGE:-mnist-service:local}
BASE_IMAGE=${BASE_IMAGE:-localhost/debian-python:3.11-bookworm}
PODMAN_RUNTIME=${PODMAN_RUNTIME-/usr/sbin/runc}
READY_TIMEOUT=${READY_TIMEOUT:-120}
STOP_TIMEOUT=15
MODEL=models/mnist_cnn.pt
PY=.venv/bin/python
NAME=mnist-smoke-$$
TMP=$(mktemp -d /tmp/container-smoke.XXXXXX)

log() { echo "[smoke] $*"; }
fail() {
    echo "[smoke] FAIL: $*" >&2
    exit 1
}
# Best effort only: this runs on every exit, including after a failure.
cleanup() {
    jobs -p | xargs -r kill 2>/dev/null || true
    # One name per call: podman 4.3's `rm -f` skips every name in the list if one is missing.
    for name in "$NAME" "$NAME-mounted"; do
        podman "${RUNTIME_ARGS[@]}" rm -f -t 0 "$name" >/dev/null 2>&1 || true
    done
    rm -rf "$TMP"
}
RUNTIME_ARGS=()
trap cleanup EXIT

# --- tools ----------------------------------------------------------------------------------
if ! command -v podman >/dev/null || ! command -v debootstrap >/dev/null \
    || { [[ -n "$PODMAN_RUNTIME" ]] && [[ ! -x "$PODMAN_RUNTIME" ]]; }; then
    [[ $(id -u) -eq 0 ]] || fail "podman, runc and debootstrap are missing; install them (apt-get) or run as root"
    log "installing podman runc debootstrap"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman runc debootstrap >/dev/null
fi
[[ -n "$PODMAN_RUNTIME" ]] && RUNTIME_ARGS=(--runtime "$PODMAN_RUNTIME")
if [[ -z "${CONTAINERS_CONF:-}" ]]; then
    # Podman's default ulimits can't be set in some sandboxes (setrlimit RLIMIT_NPROC: EPERM).
    printf '[containers]\ndefault_ulimits = []\n' >"$TMP/containers.conf"
    export CONTAINERS_CONF="$TMP/containers.conf"
fi
pm() { podman "${RUNTIME_ARGS[@]}" "$@"; }
command -v curl >/dev/null || fail "curl is needed"
[[ -x "$PY" ]] || fail "$PY not found: create the venv first (make test or make run does)"

# --- base image and model -------------------------------------------------------------------
if [[ "$BASE_IMAGE" == localhost/* ]] && ! pm image exists "$BASE_IMAGE"; then
    BASE_IMAGE="$BASE_IMAGE" PODMAN_RUNTIME="$PODMAN_RUNTIME" scripts/container_base.sh \
        || fail "could not build the base image $BASE_IMAGE"
fi
if [[ ! -f "$MODEL" ]]; then
    log "no $MODEL: training one (${TRAIN_ARGS:-default arguments})"
    # shellcheck disable=SC2086  # TRAIN_ARGS is a list of flags
    "$PY" model_train.py --output models/ ${TRAIN_ARGS:-} || fail "training failed"
fi

# --- build ----------------------------------------------------------------------------------
build_args=(--build-arg "BASE_IMAGE=$BASE_IMAGE")
volumes=()
[[ -f /etc/ssl/certs/ca-certificates.crt ]] \
    && volumes+=(-v /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro)
if [[ -z "${PIP_EXTRA_ARGS:-}" ]]; then
    # This machine's pip config may name a local wheel folder that holds the torch CPU wheel.
    links=$("$PY" -m pip config get global.find-links 2>/dev/null || true)
    if [[ -n "$links" && -d "$links" ]]; then
        volumes+=(-v "$links:/wheels:ro")
        PIP_EXTRA_ARGS="--find-links /wheels"
    fi
fi
[[ -n "${PIP_EXTRA_ARGS:-}" ]] && build_args+=(--build-arg "PIP_EXTRA_ARGS=$PIP_EXTRA_ARGS")
log "building $IMAGE from $BASE_IMAGE"
build_start=$(date +%s)
# --format docker keeps HEALTHCHECK (the OCI image format has no field for it).
pm build --format docker --network=host "${volumes[@]}" "${build_args[@]}" -t "$IMAGE" . >"$TMP/build.log" 2>&1 \
    || { tail -40 "$TMP/build.log"; fail "podman build failed"; }
log "built in $(($(date +%s) - build_start)) s"
size_bytes=$(pm image inspect --format '{{.Size}}' "$IMAGE")
size_mb=$((size_bytes / 1000000))

# --- the test digit: MNIST test image 0, black on white, enlarged and off-centre --------------
"$PY" - "$TMP" <<'PYEOF' || fail "could not make the test images"
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from mnist_service.training.data import load_split

out = Path(sys.argv[1])
test = load_split("data/mnist", "test")
digit = Image.fromarray(255 - test.images[0]).resize((200, 200), Image.Resampling.BILINEAR)
canvas = Image.new("L", (360, 280), 255)
canvas.paste(digit, (130, 20))
canvas.save(out / "digit.png")
# Uncompressed, so that a rate-limited upload of it stays in flight for seconds.
canvas.resize((720, 560)).save(out / "digit_big.png", compress_level=0)
(out / "label").write_text(str(int(test.labels[0])))
PYEOF
EXPECTED=$(cat "$TMP/label")

free_port() { "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# Waits for a 200 on /readyz; prints the container's logs if it dies or never gets ready.
wait_ready() {
    local name=$1 port=$2 deadline=$((SECONDS + READY_TIMEOUT))
    until curl -fs -o /dev/null "http://127.0.0.1:$port/readyz"; do
        if [[ $(pm inspect --format '{{.State.Running}}' "$name") != true ]]; then
            pm logs "$name" >&2 || true
            fail "$name exited before it was ready"
        fi
        if ((SECONDS >= deadline)); then
            pm logs "$name" >&2 || true
            fail "$name not ready within ${READY_TIMEOUT}s"
        fi
        sleep 0.1
    done
}

# Prints the predicted digit of a /predict answer, or fails.
predict() {
    local port=$1 file=$2 answer
    answer=$(curl -fsS -F "file=@$file" "http://127.0.0.1:$port/predict") || fail "POST /predict failed"
    "$PY" -c 'import json, sys; print(json.loads(sys.argv[1])["prediction"])' "$answer"
}

# How Kubernetes (and the README) run it: nothing writable but /tmp, no capabilities, not root.
# --read-only-tmpfs=false: podman would otherwise add writable /run and /var/tmp, which Docker
# and Kubernetes don't.
RUN_FLAGS=(--network=host --read-only --read-only-tmpfs=false --tmpfs /tmp
    --cap-drop=ALL --security-opt=no-new-privileges)

# --- run the baked-in model -----------------------------------------------------------------
PORT=${SMOKE_PORT:-$(free_port)}
log "running $IMAGE read-only on 127.0.0.1:$PORT"
run_start=$(date +%s.%N)
pm run -d --name "$NAME" "${RUN_FLAGS[@]}" -e "PORT=$PORT" "$IMAGE" >/dev/null || fail "podman run failed"
wait_ready "$NAME" "$PORT"
ready_s=$(awk -v a="$run_start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
log "ready: 200 on /readyz ${ready_s} s after podman run"

uid=$(pm exec "$NAME" id -u)
[[ "$uid" == 10001 ]] || fail "the service runs as uid $uid, expected 10001"
pm healthcheck run "$NAME" >/dev/null || fail "the image's HEALTHCHECK failed"
got=$(predict "$PORT" "$TMP/digit.png")
[[ "$got" == "$EXPECTED" ]] || fail "predicted $got for a $EXPECTED"
log "uid $uid, HEALTHCHECK healthy, POST /predict of a drawn $EXPECTED -> $got"

# --- a mounted model overrides the baked one --------------------------------------------------
PORT2=$(free_port)
pm run -d --name "$NAME-mounted" "${RUN_FLAGS[@]}" -e "PORT=$PORT2" \
    -v "$PWD/models:/models:ro" -e MODEL_PATH=/models/mnist_cnn.pt "$IMAGE" >/dev/null \
    || fail "podman run with a mounted model failed"
wait_ready "$NAME-mounted" "$PORT2"
got=$(predict "$PORT2" "$TMP/digit.png")
[[ "$got" == "$EXPECTED" ]] || fail "mounted model: predicted $got for a $EXPECTED"
mounted_logs=$(pm logs "$NAME-mounted" 2>&1)
[[ "$mounted_logs" == *"/models/mnist_cnn.pt"* ]] || fail "the server didn't log loading /models/mnist_cnn.pt"
pm rm -f -t 0 "$NAME-mounted" >/dev/null
log "mounted model (-v ./models:/models, MODEL_PATH=/models/mnist_cnn.pt): predicted $got"

# --- graceful stop: SIGTERM with a request in flight ------------------------------------------
# A 400 kB upload at 45 kB/s takes ~9 s: it is in flight when SIGTERM arrives (t=1 s), through
# the 5 s drain, and while the listener closes (t=6 s); it must still get its answer.
curl -sS -o "$TMP/inflight.json" -w '%{http_code}' --limit-rate 45k \
    -F "file=@$TMP/digit_big.png" "http://127.0.0.1:$PORT/predict" >"$TMP/inflight.code" 2>"$TMP/inflight.err" &
inflight_pid=$!
sleep 1
stop_start=$(date +%s.%N)
pm stop -t "$STOP_TIMEOUT" "$NAME" >/dev/null 2>"$TMP/stop.err" &
stop_pid=$!
sleep 1
ready_code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$PORT/readyz" || true)
[[ "$ready_code" == 503 ]] || fail "/readyz answered $ready_code during the drain, expected 503"
got=$(predict "$PORT" "$TMP/digit.png")
[[ "$got" == "$EXPECTED" ]] || fail "during the drain: predicted $got for a $EXPECTED"
log "after SIGTERM: /readyz 503, new requests still served (predicted $got)"
wait "$inflight_pid" || true
code=$(cat "$TMP/inflight.code")
[[ "$code" == 200 ]] || { cat "$TMP/inflight.err" >&2; fail "the in-flight request got HTTP $code"; }
got=$("$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["prediction"])' "$TMP/inflight.json")
[[ "$got" == "$EXPECTED" ]] || fail "in-flight request: predicted $got for a $EXPECTED"
wait "$stop_pid" || { cat "$TMP/stop.err" >&2; fail "podman stop failed"; }
stop_s=$(awk -v a="$stop_start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
exit_code=$(pm inspect --format '{{.State.ExitCode}}' "$NAME")
[[ "$exit_code" == 0 ]] || { pm logs "$NAME" 2>&1 | tail -20 >&2; fail "exit code $exit_code after SIGTERM (137 = killed)"; }
# Where the in-flight answer falls in the server's log: after "closing listeners" is the harder case.
when=$(pm logs "$NAME" 2>&1 | awk '/closing listeners/ { closed = 1 } /path=\/predict status=200/ { last = closed }
    END { print (last ? "after the listener closed" : "during the drain") }')
log "in-flight request answered 200 ($got) $when; stopped on SIGTERM in ${stop_s} s, exit code 0"

echo "[smoke] PASS image=$IMAGE size=${size_mb}MB ready=${ready_s}s stop=${stop_s}s exit=0"
