# syntax=docker/dockerfile:1
# MNIST inference service: non-root, read-only-rootfs friendly. Three images, one file:
#   docker build -t mnist-service:1.0.0 .                         the server (CPU-only torch, TorchScript), with
#                                                                 the model repository models/mnist/ baked in
#                                                                 (`make image`; needs a published version:
#                                                                 `make train`)
#   docker build --target slim -t mnist-service:1.0.0-slim .      the same server without torch: ONNX Runtime
#                                                                 serves each version's model.onnx
#                                                                 (`make image-slim`; docs/deploy.md)
#   docker build --target trainer -t mnist-trainer:1.0.0 .        the training image: publishes a new version
#                                                                 into a mounted repository (the Job in
#                                                                 k8s/overlays/repository) and runs
#                                                                 model_repository.py (promote, rollback)
# The server and the trainer share the venv and package layers. BASE_IMAGE and PIP_EXTRA_ARGS are
# arguments so that an offline machine can swap in a locally built Debian base and a local wheel
# folder (see scripts/container_smoke.sh).
ARG BASE_IMAGE=python:3.11-slim-bookworm

# What both venv builds start from: binutils (only for `strip`; it stays in the build stages) and an
# empty venv. `python3 -m venv` works on the official image (/usr/local/bin) and on plain Debian (/usr/bin).
#checkov:skip=CKV_DOCKER_7: BASE_IMAGE defaults to the pinned python:3.11-slim-bookworm tag; checkov cannot resolve ARGs in FROM
FROM ${BASE_IMAGE} AS build-base
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends binutils \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv

FROM build-base AS build
# PyPI's Linux torch wheel pulls in several GB of CUDA; PyTorch's CPU index has the +cpu build,
# which sorts above the PyPI one for the same `torch==` pin.
ARG PIP_EXTRA_ARGS="--extra-index-url https://download.pytorch.org/whl/cpu"
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
#   sympy (and it mpmath); the ONNX export goes through torch.export (which imports networkx and
#   filelock too) and needs onnx, onnxscript, onnx_ir and ml_dtypes. Those (about 170 MB) are set
#   aside in /opt/train-extras for the trainer target only; scripts/container_smoke.sh trains and
#   exports with it;
# - onnxruntime's libonnxruntime.so (the C API library: the Python module has the runtime linked in)
#   and its tools, transformers, quantization, datasets and backend packages (RUNTIME=onnxruntime
#   and the trainer's check of the export use neither);
# - numpy's test suites;
# - symbol tables of torch's and uvloop's shared libs (dynamic symbols stay). Not the libraries
#   auditwheel patched (numpy, Pillow, *.libs): strip breaks them ("not page-aligned").
# - pip and setuptools: nothing is installed at runtime.
RUN set -eux; \
    site="$(/opt/venv/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')"; \
    torch_dir="$site/torch"; \
    mkdir /opt/train-extras; \
    for dist in sympy mpmath networkx filelock onnx onnxscript onnx_ir ml_dtypes; do \
        cp -a "$site/$dist" "$site/$dist"-*.dist-info /opt/train-extras/; done; \
    /opt/venv/bin/pip uninstall -y sympy mpmath networkx filelock onnx onnxscript onnx-ir ml_dtypes \
        jinja2 MarkupSafe fsspec; \
    rm -rf "$site"/onnxruntime/capi/libonnxruntime.so* "$site"/onnxruntime/tools "$site"/onnxruntime/transformers \
           "$site"/onnxruntime/quantization "$site"/onnxruntime/datasets "$site"/onnxruntime/backend; \
    rm -rf "$torch_dir/include" "$torch_dir/test" "$torch_dir/share" \
           "$torch_dir"/lib/*test*.so "$torch_dir/lib/libaoti_custom_ops.so" \
           "$torch_dir/lib/libbackend_with_compiler.so"; \
    find "$torch_dir/bin" -mindepth 1 ! -name torch_shm_manager -exec rm -rf {} +; \
    find /opt/venv -name '*.a' -delete; \
    find "$site/numpy" -depth -type d -name tests -exec rm -rf {} +; \
    strip --strip-unneeded "$torch_dir"/lib/*.so* "$torch_dir"/_C*.so "$site"/uvloop/*.so \
          "$site"/httptools/parser/*.so; \
    /opt/venv/bin/python -c 'import torch, onnxruntime, fastapi, uvicorn, PIL, numpy, grpc, grpc_health.v1.health'; \
    PYTHONPATH=/opt/train-extras /opt/venv/bin/python -c 'import torch._dynamo, torch; \
        torch.onnx.export(torch.nn.Linear(4, 2), (torch.zeros(1, 4),), "/tmp/check.onnx", dynamo=True)'; \
    rm /tmp/check.onnx; \
    /opt/venv/bin/pip uninstall -y pip setuptools

# The slim image's venv: ONNX Runtime instead of torch (requirements-slim.txt: what the server imports,
# nothing for training or export), trimmed to what the server loads. Every removal below is a file the
# server never imports or dlopen()s; scripts/container_smoke.sh proves load + predict after them:
# - onnxruntime's libonnxruntime.so (the C API library for C/C++ callers: the Python module has the
#   runtime linked in) and its tools, transformers, quantization, datasets and backend packages;
# - numpy's test suites, its test-only and SIMD-report extensions, headers, f2py, distutils and stubs;
# - Pillow's font, colour-management, Tk and AVIF modules with the libraries only they load (the
#   documented upload formats, docs/api.md, stay);
# - uvicorn[standard]'s websockets, watchfiles and PyYAML: the server speaks no WebSocket, never
#   reloads and reads no YAML (python-dotenv stays: pydantic-settings imports it);
# - symbol tables of uvloop's and httptools' extensions (dynamic symbols stay). Not the libraries
#   auditwheel patched (numpy, Pillow, psycopg, *.libs): strip breaks them ("not page-aligned");
# - pip and setuptools: nothing is installed at runtime.
FROM build-base AS build-slim
ARG PIP_EXTRA_ARGS=""
COPY requirements-slim.txt /tmp/requirements-slim.txt
RUN /opt/venv/bin/pip install ${PIP_EXTRA_ARGS} -r /tmp/requirements-slim.txt
RUN set -eux; \
    site="$(/opt/venv/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')"; \
    ort="$site/onnxruntime"; np="$site/numpy"; \
    for dist in websockets watchfiles PyYAML; do \
        /opt/venv/bin/pip uninstall -y "$dist" 2>/dev/null || true; done; \
    rm -rf "$ort"/capi/libonnxruntime.so* "$ort/tools" "$ort/transformers" "$ort/quantization" \
           "$ort/datasets" "$ort/backend"; \
    find "$np" -depth -type d -name tests -exec rm -rf {} +; \
    rm -rf "$np/f2py" "$np/distutils" "$np/_core/include" "$np/_pyinstaller" "$np"/_core/_simd.*.so \
           "$np"/_core/_*_tests.*.so "$site"/numpy-*.dist-info/entry_points.txt /opt/venv/bin/f2py /opt/venv/bin/numpy-config; \
    find "$np" -name '*.pyi' -delete; \
    rm -f "$site"/PIL/_imagingft.*.so "$site"/PIL/_imagingcms.*.so "$site"/PIL/_imagingtk.*.so \
          "$site"/PIL/_avif.*.so "$site"/pillow.libs/libfreetype-*.so* "$site"/pillow.libs/libharfbuzz-*.so* \
          "$site"/pillow.libs/libbrotli*.so* "$site"/pillow.libs/liblcms2-*.so* "$site"/pillow.libs/libavif-*.so*; \
    find /opt/venv -name '*.a' -delete; \
    strip --strip-unneeded "$site"/uvloop/*.so "$site"/httptools/parser/*.so; \
    /opt/venv/bin/python -c 'import onnxruntime, numpy, PIL.Image, PIL.PngImagePlugin, PIL.JpegImagePlugin, PIL.WebPImagePlugin, PIL.TiffImagePlugin, fastapi, uvicorn, uvloop, httptools, grpc, grpc_health.v1.health, psycopg, pyspng, orjson, pydantic_settings, prometheus_client, python_multipart'; \
    if /opt/venv/bin/python -c 'import torch' 2>/dev/null; then echo "torch is importable in the slim venv" >&2; exit 1; fi; \
    /opt/venv/bin/pip uninstall -y pip setuptools

# What every image runs on: the service user, the venv's place on PATH, /app.
FROM ${BASE_IMAGE} AS system
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/venv/bin:$PATH
# A numeric uid lets Kubernetes' runAsNonRoot verify it without reading /etc/passwd.
RUN useradd --uid 10001 --user-group --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin app
WORKDIR /app

# What the default server and the trainer share: the torch venv and the package.
FROM system AS app
COPY --from=build /opt/venv /opt/venv
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

# The server without torch: `docker build --target slim`. The same package, entry point, repository,
# user, ports, health check and stop as the default target below (tests/test_container_files.py keeps
# them in step); ONNX Runtime serves each version's model.onnx (a version without one is reported as not
# servable). Built on `system`, not on `app`, so that no torch layer is underneath.
FROM system AS slim
LABEL org.opencontainers.image.title="mnist-service" \
      org.opencontainers.image.description="MNIST digit classifier over HTTP (FastAPI + ONNX Runtime, CPU, no torch)"
ENV RUNTIME=onnxruntime \
    MODEL_REPOSITORY=/app/models \
    HOST=0.0.0.0 \
    PORT=8000 \
    GRPC_PORT=8001
COPY --from=build-slim /opt/venv /opt/venv
COPY mnist_service/ mnist_service/
COPY model_inference.py ./
COPY models/mnist/ models/mnist/
# Bytecode compiled now (the root filesystem is read-only at runtime); the server's modules, the ONNX
# Runtime one included, load here without pulling in torch; and the baked-in default version can be
# served by ONNX Runtime (a stable version published before ONNX export fails the build, saying how
# to give it an export), as the server checks at start.
RUN python -m compileall -q mnist_service model_inference.py \
    && python -c 'import sys, model_inference, mnist_service.serving.api, mnist_service.inference.onnx_runtime; \
                  from mnist_service.registry.repository import check_servable; \
                  from mnist_service.settings import Settings; \
                  check_servable(Settings()); \
                  assert "torch" not in sys.modules, "the server imported torch"'
USER 10001:10001
EXPOSE 8001
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('PORT', '8000'), timeout=4)"]
CMD ["python", "model_inference.py"]

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
