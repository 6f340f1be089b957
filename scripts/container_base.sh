#!/usr/bin/env bash
# Build the base image the Dockerfile's BASE_IMAGE can point at when no registry is reachable:
# Debian bookworm (minbase) with Python 3.11 and venv, from this machine's apt mirror, made slim the
# way debian:bookworm-slim (under python:3.11-slim-bookworm) is: no documentation, man pages or
# translations, and a dpkg rule that keeps later apt-get installs from adding them back. It stands in
# for python:3.11-slim-bookworm; skipped when the image already exists.
set -euo pipefail

BASE_IMAGE=${BASE_IMAGE:-localhost/debian-python:3.11-bookworm-slim}
PODMAN=(podman --runtime "${PODMAN_RUNTIME:-/usr/sbin/runc}")

if "${PODMAN[@]}" image exists "$BASE_IMAGE"; then
    echo "base image $BASE_IMAGE already present"
    exit 0
fi

# deb822 sources first (bookworm's default), then the classic sources.list.
MIRROR=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
if [[ -z "$MIRROR" ]]; then
    MIRROR=$(awk '$1 == "deb" {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
fi
MIRROR=${MIRROR:-http://deb.debian.org/debian}

ROOTFS=$(mktemp -d /tmp/debian-python-rootfs.XXXXXX)
trap 'rm -rf "$ROOTFS"' EXIT

echo "debootstrap bookworm from $MIRROR into $ROOTFS (about 2 minutes)"
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$ROOTFS" "$MIRROR" >"$ROOTFS.log" 2>&1 || { tail -30 "$ROOTFS.log"; exit 1; }
rm -f "$ROOTFS.log"
rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/*
# debuerreotype's slimify (how Debian's -slim images are made): these paths go, the licences stay.
cat >"$ROOTFS/etc/dpkg/dpkg.cfg.d/docker" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/man/*
EOF
find "$ROOTFS/usr/share/doc" -mindepth 1 ! -type d ! -name copyright -delete
find "$ROOTFS/usr/share/doc" -mindepth 1 -type d -empty -delete
rm -rf "$ROOTFS"/usr/share/{groff,info,linda,lintian,locale,man}/*
tar -C "$ROOTFS" -c . | "${PODMAN[@]}" import --change 'CMD ["/bin/bash"]' - "$BASE_IMAGE" >/dev/null
echo "imported $BASE_IMAGE"
