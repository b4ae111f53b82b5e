#!/usr/bin/env bash
# `make images`: the coordinator and client images, built with no registry and no network in the build.
#
#   1. A wheelhouse (build/wheelhouse): every wheel the images install, the locked releases with their hashes
#      (requirements/runtime.lock, torch's CPU build from requirements/torch-cpu.lock), made by this host's
#      own pip and its configuration (index, proxy, local wheels).
#   2. A base image with Python 3.11: $BASE if given; else python:3.11-slim if a registry gives it; else one
#      made here from Debian 12's packages (mmdebstrap, then `docker import`), as an air-gapped site would.
#   3. `docker build --network none` of both targets of deploy/Dockerfile: pip installs from the wheelhouse
#      with --no-index.
#
# Knobs (environment or `make images VAR=...`): BASE, TAG (default dev), PY (the Python that makes the
# wheelhouse), TORCH_INDEX (a torch wheel index for the CUDA variant, docs/deploy.md), DEBIAN_MIRROR.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
TAG=${TAG:-dev}
BASE=${BASE:-}
TORCH_INDEX=${TORCH_INDEX:-}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
WHEELS=build/wheelhouse
MADE_BASE=offsite-base:bookworm

docker info >/dev/null 2>&1 || { echo "images: no Docker engine answers (start dockerd, or check DOCKER_HOST)" >&2; exit 1; }

echo "images: wheelhouse in $WHEELS"
rm -rf "$WHEELS" build/lib  # a stale build/lib would end up in the project's wheel
mkdir -p "$WHEELS"
pip_wheel() { "$PY" -m pip wheel -q --disable-pip-version-check --wheel-dir "$WHEELS" "$@"; }
# The lock's releases and hashes (requirements/*.lock, as `make test` installs them): torch's CPU build by
# default; with TORCH_INDEX, that index's torch and the CUDA libraries its wheel pins.
if [ -n "$TORCH_INDEX" ]; then
  pip_wheel --index-url "$TORCH_INDEX" torch==2.13.0
else
  pip_wheel --require-hashes --no-deps -r requirements/torch-cpu.lock
fi
pip_wheel --require-hashes --no-deps -r requirements/runtime.lock
pip_wheel --no-deps .                                                            # the project's own wheel
cp requirements/runtime.lock "$WHEELS/"

if [ -n "$BASE" ]; then
  echo "images: base $BASE (given)"
elif docker image inspect python:3.11-slim >/dev/null 2>&1 || timeout 120 docker pull -q python:3.11-slim >/dev/null 2>&1; then
  BASE=python:3.11-slim
  echo "images: base python:3.11-slim (from a registry)"
else
  BASE=$MADE_BASE
  if ! docker image inspect "$BASE" >/dev/null 2>&1; then
    command -v mmdebstrap >/dev/null || { echo "images: no registry gives python:3.11-slim and mmdebstrap is missing: apt-get install mmdebstrap" >&2; exit 1; }
    # Debian 12 with its Python 3.11, venv and CA certificates; no documentation, manual pages or locales
    mmdebstrap --quiet --variant=apt --include=python3.11,python3.11-venv,ca-certificates,passwd \
      --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
      --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
      bookworm - "$DEBIAN_MIRROR" \
      | docker import --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
                      --change 'ENV LANG=C.UTF-8' - "$BASE" >/dev/null
  fi
  echo "images: base $BASE (Debian 12 made from its packages with mmdebstrap: no registry reachable)"
fi

for target in coordinator client; do
  docker build --quiet --network none -f deploy/Dockerfile --build-arg BASE="$BASE" --target "$target" \
    -t "offsite-$target:$TAG" . >/dev/null
  echo "images: offsite-$target:$TAG, $(docker image inspect -f '{{.Size}}' "offsite-$target:$TAG" | awk '{printf "%.0f MB", $1 / 1e6}')"
done
