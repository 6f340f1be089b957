#!/usr/bin/env bash
# Installs Debian's Chromium for the browser tests (tests/test_web.py). Playwright drives this
# system browser through executable_path; `playwright install` downloads are not used.
set -euo pipefail

if [ -x /usr/bin/chromium ]; then
    echo "chromium already installed: $(/usr/bin/chromium --version 2>/dev/null || echo /usr/bin/chromium)"
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get -o DPkg::Lock::Timeout=600 update
# Wait for the dpkg lock rather than fail when another apt run (unattended upgrades, CI) holds it.
$SUDO apt-get -o DPkg::Lock::Timeout=600 install -y --no-install-recommends chromium chromium-driver
/usr/bin/chromium --version
