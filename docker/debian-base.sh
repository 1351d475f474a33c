#!/usr/bin/env bash
# A Debian 12 base image built from Debian packages alone, for machines that reach no container registry (CI):
# debootstrap's minbase plus what the Dockerfile needs (python3, python3-venv, ca-certificates, tini), so its
# apt step is skipped, then `docker import`. About a minute and 170 MB.
#
#   docker/debian-base.sh [IMAGE]        default lora-trainer-base:bookworm; kept when it exists (FORCE=1 rebuilds)
#   docker build --build-arg BASE_IMAGE=lora-trainer-base:bookworm ...
#
# Needs root and debootstrap (apt-get install debootstrap). DEBIAN_MIRROR overrides the mirror.
set -euo pipefail
image=${1:-lora-trainer-base:bookworm}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
docker=${DOCKER:-docker}

if [ -z "${FORCE:-}" ] && "$docker" image inspect "$image" >/dev/null 2>&1; then
  echo "debian-base: $image already exists" >&2
  exit 0
fi
command -v debootstrap >/dev/null || { echo "debian-base: needs debootstrap (apt-get install debootstrap)" >&2; exit 1; }
[ "$(id -u)" = 0 ] || { echo "debian-base: debootstrap needs root" >&2; exit 1; }

root=$(mktemp -d "${TMPDIR:-/tmp}/lora-trainer-base.XXXXXX")
trap 'rm -rf "$root"' EXIT
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates,tini bookworm "$root" "$mirror" >&2
# The downloaded .debs and package lists are 95 MB the image never needs (a later apt-get update refetches lists).
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
tar -C "$root" -c . | "$docker" import --change 'ENV LANG=C.UTF-8' --change 'CMD ["/bin/bash"]' - "$image" >/dev/null
echo "debian-base: built $image" >&2
