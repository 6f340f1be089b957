#!/usr/bin/env bash
# Installs Debian's PostgreSQL server binaries for the capture tests (tests/test_capture.py,
# tests/test_feedback.py). The tests start their own server with initdb and pg_ctl in a temporary
# folder, as a non-root user, on a free loopback port; the cluster the package may set up is not used.
set -euo pipefail

found() { compgen -G "/usr/lib/postgresql/*/bin/pg_ctl" >/dev/null; }
if ! found; then
    as_root=()
    [ "$(id -u)" -eq 0 ] || as_root=(sudo)
    # Wait for the dpkg lock rather than fail when another apt run holds it.
    "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 update -qq
    "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 \
        install -y -qq --no-install-recommends postgresql
    found || { echo "error: no /usr/lib/postgresql/*/bin/pg_ctl after installing postgresql" >&2; exit 1; }
fi
echo "postgresql: $(ls /usr/lib/postgresql/*/bin/pg_ctl | tail -1)"
