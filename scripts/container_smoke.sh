#!/usr/bin/env bash
# Build the serving image, the trainer image and the slim serving image (no torch: ONNX Runtime), and
# prove they work the way a cluster runs them: read-only root filesystem, non-root, all capabilities
# dropped. For the default image: readiness time, a real digit prediction from the baked-in model
# repository, the HEALTHCHECK, a mounted repository (MODEL_REPOSITORY), a version published into that
# mounted repository by the trainer image while the server runs and served by every worker without a
# restart (the Kubernetes volume of k8s/overlays/repository in miniature), a single mounted model file
# (MODEL_PATH), and a graceful SIGTERM stop (exit 0, in-flight requests answered). For the slim image:
# `import torch` fails in it, then readiness time, the HEALTHCHECK, a real prediction by ONNX Runtime
# from the baked-in repository and the same SIGTERM stop. Prints each image's size. Exits non-zero
# with a FAIL line on the first broken step.
#
#   scripts/container_smoke.sh                   # IMAGE=mnist-service:local, TRAINER_IMAGE=mnist-trainer:local
#   IMAGE=mnist-service:1.0.0 scripts/container_smoke.sh
#
# Knobs (env): IMAGE, TRAINER_IMAGE (default mnist-trainer:<IMAGE's tag>), SLIM_IMAGE (default
# <IMAGE>-slim), SLIM (1: build and check the slim image too, the default; 0: skip it), BASE_IMAGE
# (default: a Debian base built locally by container_base.sh; set python:3.11-slim-bookworm where a
# registry is reachable), PIP_EXTRA_ARGS (default: this machine's pip find-links folder if it has one,
# else the Dockerfile's PyTorch CPU index), PODMAN_RUNTIME (default /usr/sbin/runc; empty for podman's
# own), SMOKE_PORT, READY_TIMEOUT, PICKUP_TIMEOUT (publish to served by every worker), TRAIN_ARGS (used
# only when models/mnist/config.json is missing), PUBLISH_ARGS (the quick training run published into
# the mounted repository).
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${IMAGE:-mnist-service:local}
TRAINER_IMAGE=${TRAINER_IMAGE:-mnist-trainer:${IMAGE##*:}}
SLIM_IMAGE=${SLIM_IMAGE:-${IMAGE}-slim}
SLIM=${SLIM:-1}
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
    for name in "$NAME" "$NAME-repo" "$NAME-train" "$NAME-file" "$NAME-slim"; do
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

# Numbered version folders in a repository's model folder, in order, space-separated.
versions_on_disk() { find "$1" -mindepth 1 -maxdepth 1 -type d -regex '.*/[1-9][0-9]*' -printf '%f\n' | sort -n | xargs; }

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
if [[ "$SLIM" == 1 ]]; then
    # The slim image serves with ONNX Runtime, so its default version needs model.onnx. A stable
    # version published before ONNX export gets one: a new version with the same weights, promoted.
    baked_stable=$("$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["labels"].get("stable", ""))' \
        "$REPOSITORY/$MODEL_NAME/config.json")
    if [[ -n "$baked_stable" && ! -f "$REPOSITORY/$MODEL_NAME/$baked_stable/model.onnx" ]]; then
        log "stable version $baked_stable of $REPOSITORY/$MODEL_NAME has no model.onnx (published before ONNX export):" \
            "adding one (model_train.py --add-onnx) and promoting that version"
        "$PY" model_train.py --add-onnx "$REPOSITORY/$MODEL_NAME/$baked_stable/model.pt" >"$TMP/add-onnx.log" 2>&1 \
            || { tail -20 "$TMP/add-onnx.log" >&2; fail "model_train.py --add-onnx failed"; }
        with_onnx=$(versions_on_disk "$REPOSITORY/$MODEL_NAME" | awk '{ print $NF }')
        [[ -f "$REPOSITORY/$MODEL_NAME/$with_onnx/model.onnx" ]] || fail "--add-onnx published no model.onnx"
        "$PY" model_repository.py --repository "$REPOSITORY" --model-name "$MODEL_NAME" promote "$with_onnx" \
            || fail "could not promote version $with_onnx"
    fi
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
log "building $IMAGE, $TRAINER_IMAGE (--target trainer)$([[ "$SLIM" == 1 ]] && echo " and $SLIM_IMAGE (--target slim)") from $BASE_IMAGE"
build_start=$(date +%s)
# --format docker keeps HEALTHCHECK (the OCI image format has no field for it). The trainer build
# reuses the serving build's cached venv and package layers.
pm build --format docker --network=host "${volumes[@]}" "${build_args[@]}" -t "$IMAGE" . >"$TMP/build.log" 2>&1 \
    || { tail -40 "$TMP/build.log"; fail "podman build failed"; }
pm build --format docker --network=host "${volumes[@]}" "${build_args[@]}" --target trainer \
    -t "$TRAINER_IMAGE" . >"$TMP/build-trainer.log" 2>&1 \
    || { tail -40 "$TMP/build-trainer.log"; fail "podman build --target trainer failed"; }
if [[ "$SLIM" == 1 ]]; then
    pm build --format docker --network=host "${volumes[@]}" "${build_args[@]}" --target slim \
        -t "$SLIM_IMAGE" . >"$TMP/build-slim.log" 2>&1 \
        || { tail -40 "$TMP/build-slim.log"; fail "podman build --target slim failed"; }
fi
log "built in $(($(date +%s) - build_start)) s"
size_mb=$((($(pm image inspect --format '{{.Size}}' "$IMAGE") + 500000) / 1000000))
trainer_mb=$((($(pm image inspect --format '{{.Size}}' "$TRAINER_IMAGE") + 500000) / 1000000))
log "sizes: $IMAGE ${size_mb} MB, $TRAINER_IMAGE ${trainer_mb} MB (sharing the venv and package layers)"
if [[ "$SLIM" == 1 ]]; then
    slim_mb=$((($(pm image inspect --format '{{.Size}}' "$SLIM_IMAGE") + 500000) / 1000000))
    base_mb=$((($(pm image inspect --format '{{.Size}}' "$BASE_IMAGE") + 500000) / 1000000))
    log "size: $SLIM_IMAGE ${slim_mb} MB (no torch; the base $BASE_IMAGE is ${base_mb} MB of it)"
fi

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
    pm run -d --name "$name" "${RUN_FLAGS[@]}" -e "PORT=$port" -e "GRPC_PORT=$(free_port)" -v "$volume" -e "$env" \
        "$IMAGE" >/dev/null \
        || fail "podman run with a mounted $what failed"
    wait_ready "$name" "$port"
    got=$(predict "$port" "$TMP/digit.png")
    [[ "$got" == "$EXPECTED" ]] || fail "mounted $what: predicted $got for a $EXPECTED"
    [[ $(pm logs "$name" 2>&1) == *"from $served"* ]] || fail "the server didn't log serving the mounted $what $served"
}

# How Kubernetes (and docs/deploy.md, "The container") run it: nothing writable but /tmp, no capabilities, not root.
# --read-only-tmpfs=false: podman would otherwise add writable /run and /var/tmp, which Docker
# and Kubernetes don't. On the host network, so every container gets free ports for HTTP and gRPC
# (GRPC_PORT's default 8001 may be taken on the host).
RUN_FLAGS=(--network=host --read-only --read-only-tmpfs=false --tmpfs /tmp
    --cap-drop=ALL --security-opt=no-new-privileges)

# Runs IMAGE as container NAME on PORT from its baked-in repository and checks it as a cluster would run
# it: ready (sets `ready_s`, seconds from `podman run` to 200 on /readyz), uid 10001, the HEALTHCHECK,
# a real prediction (sets `got`) and the log line naming the repository. Extra arguments go to podman run.
serve_baked() {
    local image=$1 name=$2 port=$3 run_start
    shift 3
    log "running $image read-only on 127.0.0.1:$port"
    run_start=$(date +%s.%N)
    pm run -d --name "$name" "${RUN_FLAGS[@]}" -e "PORT=$port" -e "GRPC_PORT=$(free_port)" "$@" "$image" >/dev/null \
        || fail "podman run $image failed"
    wait_ready "$name" "$port"
    ready_s=$(awk -v a="$run_start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    log "ready: 200 on /readyz ${ready_s} s after podman run"
    uid=$(pm exec "$name" id -u)
    [[ "$uid" == 10001 ]] || fail "$image runs as uid $uid, expected 10001"
    pm healthcheck run "$name" >/dev/null || fail "the HEALTHCHECK of $image failed"
    got=$(predict "$port" "$TMP/digit.png")
    [[ "$got" == "$EXPECTED" ]] || fail "$image predicted $got for a $EXPECTED"
    [[ $(pm logs "$name" 2>&1) == *"from /app/models/$MODEL_NAME"* ]] \
        || fail "$image didn't log serving the baked-in repository /app/models/$MODEL_NAME"
    log "uid $uid, HEALTHCHECK healthy, baked-in repository /app/models (versions $(model_field "$port" ready)," \
        "default $(model_field "$port" default)), POST /predict of a drawn $EXPECTED -> $got"
}

# SIGTERM to container NAME (serving on PORT) with a request in flight: /readyz turns 503 while new
# requests are still answered, the in-flight one gets its answer, exit code 0. Sets `stop_s`.
# A 400 kB upload at 45 kB/s takes ~9 s: it is in flight when SIGTERM arrives (t=1 s), through
# the 5 s drain, and while the listener closes (t=6 s); it must still get its answer.
drain_on_sigterm() {
    local name=$1 port=$2 inflight_pid stop_pid stop_start ready_code code exit_code when
    curl -sS -o "$TMP/inflight.json" -w '%{http_code}' --limit-rate 45k \
        -F "file=@$TMP/digit_big.png" "http://127.0.0.1:$port/predict" >"$TMP/inflight.code" 2>"$TMP/inflight.err" &
    inflight_pid=$!
    sleep 1
    stop_start=$(date +%s.%N)
    pm stop -t "$STOP_TIMEOUT" "$name" >/dev/null 2>"$TMP/stop.err" &
    stop_pid=$!
    sleep 1
    ready_code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/readyz" || true)
    [[ "$ready_code" == 503 ]] || fail "$name: /readyz answered $ready_code during the drain, expected 503"
    got=$(predict "$port" "$TMP/digit.png")
    [[ "$got" == "$EXPECTED" ]] || fail "$name during the drain: predicted $got for a $EXPECTED"
    log "after SIGTERM: /readyz 503, new requests still served (predicted $got)"
    wait "$inflight_pid" || true
    code=$(cat "$TMP/inflight.code")
    [[ "$code" == 200 ]] || { cat "$TMP/inflight.err" >&2; fail "$name: the in-flight request got HTTP $code"; }
    got=$("$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["prediction"])' "$TMP/inflight.json")
    [[ "$got" == "$EXPECTED" ]] || fail "$name in-flight request: predicted $got for a $EXPECTED"
    wait "$stop_pid" || { cat "$TMP/stop.err" >&2; fail "podman stop $name failed"; }
    stop_s=$(awk -v a="$stop_start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    exit_code=$(pm inspect --format '{{.State.ExitCode}}' "$name")
    [[ "$exit_code" == 0 ]] \
        || { pm logs "$name" 2>&1 | tail -20 >&2; fail "$name: exit code $exit_code after SIGTERM (137 = killed)"; }
    # Where the in-flight answer falls in the server's log: after "closing listeners" is the harder case.
    when=$(pm logs "$name" 2>&1 | awk '/closing listeners/ { closed = 1 } /path=\/predict status=200/ { last = closed }
        END { print (last ? "after the listener closed" : "during the drain") }')
    log "in-flight request answered 200 ($got) $when; stopped on SIGTERM in ${stop_s} s, exit code 0"
}

# --- run the baked-in model repository ------------------------------------------------------
PORT=${SMOKE_PORT:-$(free_port)}
serve_baked "$IMAGE" "$NAME" "$PORT"
ready_s_default=$ready_s

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
drain_on_sigterm "$NAME" "$PORT"
stop_s_default=$stop_s
summary="image=$IMAGE size=${size_mb}MB trainer=${trainer_mb}MB ready=${ready_s_default}s pickup=${pickup_s}s"
summary+=" stop=${stop_s_default}s exit=0"

# --- the slim image: the same checks without torch ----------------------------------------------
if [[ "$SLIM" == 1 ]]; then
    # Proves what the build's own check says, in the image as shipped: no torch to import.
    torch_error=$(pm run --rm "${RUN_FLAGS[@]}" "$SLIM_IMAGE" python -c 'import torch' 2>&1) \
        && fail "$SLIM_IMAGE can import torch"
    [[ "$torch_error" == *"No module named 'torch'"* ]] || fail "import torch in $SLIM_IMAGE failed oddly: $torch_error"
    PORT_SLIM=$(free_port)
    serve_baked "$SLIM_IMAGE" "$NAME-slim" "$PORT_SLIM"
    slim_ready_s=$ready_s
    runtime=$(curl -fsS "http://127.0.0.1:$PORT_SLIM/model" | "$PY" -c 'import json, sys; print(json.load(sys.stdin)["runtime"])') \
        || fail "GET /model of $SLIM_IMAGE failed"
    [[ "$runtime" == onnxruntime ]] || fail "$SLIM_IMAGE serves with $runtime, expected onnxruntime"
    log "$SLIM_IMAGE: import torch fails (ModuleNotFoundError), /model says runtime=$runtime"
    drain_on_sigterm "$NAME-slim" "$PORT_SLIM"
    summary+=" slim=${slim_mb}MB slim_ready=${slim_ready_s}s slim_stop=${stop_s}s"
fi

echo "[smoke] PASS $summary"
