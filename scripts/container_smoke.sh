#!/usr/bin/env bash
# Build the serving image and the trainer image and prove they work the way a cluster runs them:
# read-only root filesystem, non-root, all capabilities dropped. Checks readiness time, a real
# digit prediction from the baked-in model repository, the HEALTHCHECK, a mounted repository
# (MODEL_REPOSITORY), a version published into that mounted repository by the trainer image while
# the server runs and served by every worker without a restart (the Kubernetes volume of
# k8s/overlays/repository in miniature), a single mounted model file (MODEL_PATH), and a graceful
# SIGTERM stop (exit 0, in-flight requests answered). Exits non-zero with a FAIL line on the first
# broken step.
#
#   scripts/container_smoke.sh                   # IMAGE=mnist-service:local, TRAINER_IMAGE=mnist-trainer:local
#   IMAGE=mnist-service:1.0.0 scripts/container_smoke.sh
#
# Knobs (env): IMAGE, TRAINER_IMAGE (default mnist-trainer:<IMAGE's tag>), BASE_IMAGE (default: a
# Debian base built locally by container_base.sh; set python:3.11-slim-bookworm where a registry is
# reachable), PIP_EXTRA_ARGS (default: this machine's pip find-links folder if it has one, else the
# Dockerfile's PyTorch CPU index), PODMAN_RUNTIME (default /usr/sbin/runc; empty for podman's own),
# SMOKE_PORT, READY_TIMEOUT, PICKUP_TIMEOUT (publish to served by every worker), TRAIN_ARGS (used
# only when models/mnist/config.json is missing), PUBLISH_ARGS (the quick training run published
# into the mounted repository).
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${IMAGE:-mnist-service:local}
TRAINER_IMAGE=${TRAINER_IMAGE:-mnist-trainer:${IMAGE##*:}}
BASE_IMAGE=${BASE_IMAGE:-localhost/debian-python:3.11-bookworm-slim}
PODMAN_RUNTIME=${PODMAN_RUNTIME-/usr/sbin/runc}
READY_TIMEOUT=${READY_TIMEOUT:-120}
PICKUP_TIMEOUT=${PICKUP_TIMEOUT:-60}
PUBLISH_ARGS=${PUBLISH_ARGS:---epochs 1 --max-train 1000}
STOP_TIMEOUT=15
# The repository the image bakes in (the Dockerfile copies models/mnist/).
REPOSITORY=models
MODEL_NAME=mnist
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
    for name in "$NAME" "$NAME-repo" "$NAME-train" "$NAME-file"; do
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

# --- base image and model repository --------------------------------------------------------
if [[ "$BASE_IMAGE" == localhost/* ]] && ! pm image exists "$BASE_IMAGE"; then
    BASE_IMAGE="$BASE_IMAGE" PODMAN_RUNTIME="$PODMAN_RUNTIME" scripts/container_base.sh \
        || fail "could not build the base image $BASE_IMAGE"
fi
if [[ ! -f "$REPOSITORY/$MODEL_NAME/config.json" ]]; then
    log "no $REPOSITORY/$MODEL_NAME/config.json: publishing a first version (${TRAIN_ARGS:-default arguments})"
    # shellcheck disable=SC2086  # TRAIN_ARGS is a list of flags
    "$PY" model_train.py --repository "$REPOSITORY" --model-name "$MODEL_NAME" ${TRAIN_ARGS:-} \
        || fail "training failed"
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
log "building $IMAGE and $TRAINER_IMAGE (--target trainer) from $BASE_IMAGE"
build_start=$(date +%s)
# --format docker keeps HEALTHCHECK (the OCI image format has no field for it). The trainer build
# reuses the serving build's cached venv and package layers.
pm build --format docker --network=host "${volumes[@]}" "${build_args[@]}" -t "$IMAGE" . >"$TMP/build.log" 2>&1 \
    || { tail -40 "$TMP/build.log"; fail "podman build failed"; }
pm build --format docker --network=host "${volumes[@]}" "${build_args[@]}" --target trainer \
    -t "$TRAINER_IMAGE" . >"$TMP/build-trainer.log" 2>&1 \
    || { tail -40 "$TMP/build-trainer.log"; fail "podman build --target trainer failed"; }
log "built in $(($(date +%s) - build_start)) s"
size_mb=$(($(pm image inspect --format '{{.Size}}' "$IMAGE") / 1000000))
trainer_mb=$(($(pm image inspect --format '{{.Size}}' "$TRAINER_IMAGE") / 1000000))
log "sizes: $IMAGE ${size_mb} MB, $TRAINER_IMAGE ${trainer_mb} MB (sharing the venv and package layers)"

# --- the test digit: MNIST test image 0, black on white, enlarged and off-centre --------------
"$PY" - "$TMP" <<'PYEOF' || fail "could not make the test images"
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from mnist_service.data import load_split

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

# Prints one field of GET /model: "default" (the version answering unpinned requests) or "ready"
# (the READY versions of the worker that answered, space-separated).
model_field() {
    local port=$1 field=$2 answer
    answer=$(curl -fsS "http://127.0.0.1:$port/model") || fail "GET /model failed"
    "$PY" -c 'import json, sys
d = json.loads(sys.argv[1])
print(d["model_version"] if sys.argv[2] == "default" else " ".join(v["version"] for v in d["versions"] if v["state"] == "READY"))' \
        "$answer" "$field"
}

# Runs the image with a mounted model (NAME PORT VOLUME ENV SERVED WHAT), waits for it, and checks one
# prediction and that it logged serving SERVED; leaves `got` set to the predicted digit.
serve_mounted() {
    local name=$1 port=$2 volume=$3 env=$4 served=$5 what=$6
    pm run -d --name "$name" "${RUN_FLAGS[@]}" -e "PORT=$port" -v "$volume" -e "$env" "$IMAGE" >/dev/null \
        || fail "podman run with a mounted $what failed"
    wait_ready "$name" "$port"
    got=$(predict "$port" "$TMP/digit.png")
    [[ "$got" == "$EXPECTED" ]] || fail "mounted $what: predicted $got for a $EXPECTED"
    [[ $(pm logs "$name" 2>&1) == *"from $served"* ]] || fail "the server didn't log serving the mounted $what $served"
}

# Numbered version folders in a repository's model folder, in order, space-separated.
versions_on_disk() { find "$1" -mindepth 1 -maxdepth 1 -type d -regex '.*/[1-9][0-9]*' -printf '%f\n' | sort -n | xargs; }

# How Kubernetes (and the README) run it: nothing writable but /tmp, no capabilities, not root.
# --read-only-tmpfs=false: podman would otherwise add writable /run and /var/tmp, which Docker
# and Kubernetes don't.
RUN_FLAGS=(--network=host --read-only --read-only-tmpfs=false --tmpfs /tmp
    --cap-drop=ALL --security-opt=no-new-privileges)

# --- run the baked-in model repository ------------------------------------------------------
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
[[ $(pm logs "$NAME" 2>&1) == *"from /app/models/$MODEL_NAME"* ]] \
    || fail "the server didn't log serving the baked-in repository /app/models/$MODEL_NAME"
baked_default=$(model_field "$PORT" default)
log "uid $uid, HEALTHCHECK healthy, baked-in repository /app/models (versions $(model_field "$PORT" ready)," \
    "default $baked_default), POST /predict of a drawn $EXPECTED -> $got"

# --- a mounted repository, and a version published into it while the server runs --------------
# A copy of the host's repository, so the published version lands in $TMP. World-writable because
# the trainer runs as uid 10001 (Kubernetes' fsGroup does this for the volume); the server's
# mount is read-only.
mkdir "$TMP/repo"
cp -r "$REPOSITORY/$MODEL_NAME" "$TMP/repo/"
find "$TMP/repo/$MODEL_NAME" -mindepth 1 -maxdepth 1 -name '.*' -exec rm -rf {} +  # a publish in progress
chmod -R a+rwX "$TMP/repo"
PORT2=$(free_port)
serve_mounted "$NAME-repo" "$PORT2" "$TMP/repo:/models:ro" MODEL_REPOSITORY=/models "/models/$MODEL_NAME" repository
stable=$(model_field "$PORT2" default)
before=$(model_field "$PORT2" ready)
started=$(pm inspect --format '{{.State.StartedAt}}' "$NAME-repo")
log "mounted repository (-v repo:/models:ro, MODEL_REPOSITORY=/models): versions $before, default $stable," \
    "predicted $got"

# The trainer image, run like the Kubernetes Job: read-only root, uid 10001, the repository read-write.
on_disk=$(versions_on_disk "$TMP/repo/$MODEL_NAME")
publish_start=$(date +%s.%N)
# shellcheck disable=SC2086  # PUBLISH_ARGS is a list of flags
pm run --name "$NAME-train" "${RUN_FLAGS[@]}" -v "$TMP/repo:/models" "$TRAINER_IMAGE" \
    python model_train.py --repository /models --model-name "$MODEL_NAME" $PUBLISH_ARGS >"$TMP/train.log" 2>&1 \
    || { tail -20 "$TMP/train.log" >&2; fail "the trainer image failed to publish into the mounted repository"; }
pm rm -f -t 0 "$NAME-train" >/dev/null
new=$(versions_on_disk "$TMP/repo/$MODEL_NAME" | awk '{ print $NF }')
[[ " $on_disk " != *" $new "* ]] || fail "the trainer published no new version (on disk: $on_disk)"
published_s=$(awk -v a="$publish_start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
log "trainer image published version $new into the mounted repository in ${published_s} s: $(tail -1 "$TMP/train.log")"

# Served once every worker has it: several pinned requests in a row, each on a new connection, so
# that each worker answers some. No restart: the same container, started once.
pickup_start=$(date +%s.%N) deadline=$((SECONDS + PICKUP_TIMEOUT)) streak=0
while ((streak < 8)); do
    answer=$(curl -s -F "file=@$TMP/digit.png" "http://127.0.0.1:$PORT2/predict?version=$new" || true)
    answered_by=$("$PY" -c 'import json, sys; print(json.loads(sys.argv[1]).get("model_version"))' "$answer" \
        2>/dev/null || true)
    if [[ "$answered_by" == "$new" ]]; then
        streak=$((streak + 1))
    else
        streak=0
        ((SECONDS < deadline)) || { pm logs "$NAME-repo" 2>&1 | tail -20 >&2; fail "version $new not served by every worker within ${PICKUP_TIMEOUT}s: $answer"; }
        sleep 0.2
    fi
done
pickup_s=$(awk -v a="$pickup_start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
listed=$(model_field "$PORT2" ready)
[[ " $listed " == *" $new "* ]] || fail "GET /model doesn't list version $new as READY: $listed"
[[ $(pm inspect --format '{{.State.StartedAt}}' "$NAME-repo") == "$started" ]] \
    || fail "the container restarted while picking up version $new"
[[ $(model_field "$PORT2" default) == "$stable" ]] || fail "publishing moved the default away from $stable"
pm rm -f -t 0 "$NAME-repo" >/dev/null
log "version $new served by every worker ${pickup_s} s after the trainer exited, without a restart: /model lists" \
    "$listed, default still $stable"

# --- a single mounted model file (MODEL_PATH) --------------------------------------------------
mkdir "$TMP/file"
cp "$TMP/repo/$MODEL_NAME/$stable/model.pt" "$TMP/file/mnist_cnn.pt"
cp "$TMP/repo/$MODEL_NAME/$stable/model.json" "$TMP/file/mnist_cnn.json"
chmod -R a+rX "$TMP/file"
PORT3=$(free_port)
serve_mounted "$NAME-file" "$PORT3" "$TMP/file:/models:ro" MODEL_PATH=/models/mnist_cnn.pt /models/mnist_cnn.pt "model file"
pm rm -f -t 0 "$NAME-file" >/dev/null
log "mounted model file (-v file:/models:ro, MODEL_PATH=/models/mnist_cnn.pt): predicted $got"

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

echo "[smoke] PASS image=$IMAGE size=${size_mb}MB trainer=${trainer_mb}MB ready=${ready_s}s pickup=${pickup_s}s stop=${stop_s}s exit=0"
