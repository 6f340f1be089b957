# syntax=docker/dockerfile:1
# MNIST inference service: CPU-only torch, non-root, read-only-rootfs friendly. Two images, one file:
#   docker build -t mnist-service:1.0.0 .                         the server, with the model repository
#                                                                 models/mnist/ baked in (`make image`;
#                                                                 needs a published version: `make train`)
#   docker build --target trainer -t mnist-trainer:1.0.0 .        the training image: publishes a new version
#                                                                 into a mounted repository (the Job in
#                                                                 k8s/overlays/repository) and runs
#                                                                 model_repository.py (promote, rollback)
# Both share the venv and package layers. BASE_IMAGE and PIP_EXTRA_ARGS are arguments so that an
# offline machine can swap in a locally built Debian base and a local wheel folder (see
# scripts/container_smoke.sh).
ARG BASE_IMAGE=python:3.11-slim-bookworm

#checkov:skip=CKV_DOCKER_7: BASE_IMAGE defaults to the pinned python:3.11-slim-bookworm tag; checkov cannot resolve ARGs in FROM
FROM ${BASE_IMAGE} AS build
# PyPI's Linux torch wheel pulls in several GB of CUDA; PyTorch's CPU index has the +cpu build,
# which sorts above the PyPI one for the same `torch==` pin.
ARG PIP_EXTRA_ARGS="--extra-index-url https://download.pytorch.org/whl/cpu"
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# binutils only for `strip` below; it stays in this stage.
RUN apt-get update \
    && apt-get install -y --no-install-recommends binutils \
    && rm -rf /var/lib/apt/lists/*
# `python3 -m venv` works on the official image (/usr/local/bin) and on plain Debian (/usr/bin).
RUN python3 -m venv /opt/venv
COPY requirements.txt /tmp/requirements.txt
RUN /opt/venv/bin/pip install ${PIP_EXTRA_ARGS} -r /tmp/requirements.txt \
    && if /opt/venv/bin/pip list 2>/dev/null | grep -iE '^(nvidia|triton)'; then \
         echo "CUDA packages were installed: torch must be the +cpu build" >&2; exit 1; fi
# Serving only loads TorchScript and runs it on the CPU. Everything removed here is never
# imported or dlopen'ed on that path; scripts/container_smoke.sh proves load + predict after it:
# - torch's C++ headers, C++ test binaries and libs, CMake files, static libs (but not
#   bin/torch_shm_manager, whose presence `import torch` checks);
# - sympy/mpmath/networkx/jinja2/fsspec/filelock: used only by torch.compile, export and hub.
#   Training is the exception: the optimizers' dynamo guards import torch._dynamo, which imports
#   sympy (and it mpmath). Those two (85 MB) are set aside in /opt/train-extras for the trainer
#   target only; scripts/container_smoke.sh trains with it;
# - numpy's test suites;
# - symbol tables of torch's and uvloop's shared libs (dynamic symbols stay). Not the libraries
#   auditwheel patched (numpy, Pillow, *.libs): strip breaks them ("not page-aligned").
# - pip and setuptools: nothing is installed at runtime.
RUN set -eux; \
    site="$(/opt/venv/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')"; \
    torch_dir="$site/torch"; \
    mkdir /opt/train-extras; \
    cp -a "$site"/sympy "$site"/sympy-*.dist-info "$site"/mpmath "$site"/mpmath-*.dist-info /opt/train-extras/; \
    /opt/venv/bin/pip uninstall -y sympy mpmath networkx jinja2 MarkupSafe fsspec filelock; \
    rm -rf "$torch_dir/include" "$torch_dir/test" "$torch_dir/share" \
           "$torch_dir"/lib/*test*.so "$torch_dir/lib/libaoti_custom_ops.so" \
           "$torch_dir/lib/libbackend_with_compiler.so"; \
    find "$torch_dir/bin" -mindepth 1 ! -name torch_shm_manager -exec rm -rf {} +; \
    find /opt/venv -name '*.a' -delete; \
    find "$site/numpy" -depth -type d -name tests -exec rm -rf {} +; \
    strip --strip-unneeded "$torch_dir"/lib/*.so* "$torch_dir"/_C*.so "$site"/uvloop/*.so \
          "$site"/httptools/parser/*.so; \
    /opt/venv/bin/python -c 'import torch, fastapi, uvicorn, PIL, numpy, grpc, grpc_health.v1.health'; \
    PYTHONPATH=/opt/train-extras /opt/venv/bin/python -c 'import torch._dynamo'; \
    /opt/venv/bin/pip uninstall -y pip setuptools

# What both images share: the venv, the service user and the package.
FROM ${BASE_IMAGE} AS app
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/venv/bin:$PATH
# A numeric uid lets Kubernetes' runAsNonRoot verify it without reading /etc/passwd.
RUN useradd --uid 10001 --user-group --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin app
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
# Code and model stay root-owned: the service user can read but never change them.
COPY mnist_service/ mnist_service/
# Bytecode compiled now, because the root filesystem is read-only at runtime.
RUN python -m compileall -q mnist_service

# The training image: `docker build --target trainer`. Runs read-only like the server; the only
# writable paths are /tmp and the repository mounted at /models (read-write here, read-only in
# the servers). Each run publishes the next version; stable moves only with --promote.
FROM app AS trainer
LABEL org.opencontainers.image.title="mnist-trainer" \
      org.opencontainers.image.description="Trains the MNIST CNN and publishes it into a model repository"
ENV PYTHONPATH=/opt/train-extras \
    MODEL_REPOSITORY=/models
COPY --from=build /opt/train-extras /opt/train-extras
COPY model_train.py model_repository.py ./
COPY data/mnist/ data/mnist/
RUN python -m compileall -q model_train.py model_repository.py
USER 10001:10001
CMD ["python", "model_train.py", "--repository", "/models"]

# The server: the default target, so it stays last.
FROM app AS runtime
LABEL org.opencontainers.image.title="mnist-service" \
      org.opencontainers.image.description="MNIST digit classifier over HTTP (FastAPI + TorchScript, CPU)"
# The baked-in repository serves by default. Mount another over it, or point MODEL_REPOSITORY at a
# mounted one (it is polled: versions published there are loaded without a restart), or set
# MODEL_PATH to serve one .pt file.
ENV MODEL_REPOSITORY=/app/models \
    HOST=0.0.0.0 \
    PORT=8000 \
    GRPC_PORT=8001
COPY model_inference.py ./
# Every version and config.json (its policy and labels), as `make train` published them.
COPY models/mnist/ models/mnist/
RUN python -m compileall -q model_inference.py
USER 10001:10001
# The Open Inference Protocol over gRPC (GRPC_PORT, docs/grpc.md), then HTTP.
EXPOSE 8001
EXPOSE 8000
# stdlib only: no curl in the image. Any non-2xx or refused connection raises -> unhealthy.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('PORT', '8000'), timeout=4)"]
# Exec form: python is PID 1 and gets SIGTERM itself, which starts the graceful drain.
CMD ["python", "model_inference.py"]
