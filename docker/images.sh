#!/usr/bin/env bash
# Build both images from the Dockerfile with buildah (no Docker daemon), hold them to the size
# budget, then run them as a cluster would (docker/run_images.py): the operator image as the Helm
# chart deploys it, against the test suite's fake API server, and the CPU trainer image as the
# Job the operator created, on one tiny-world job.
#
#   apt-get install buildah runc debootstrap
#   bash docker/images.sh            # as root, from anywhere
#
# Skips (exit 0, one "SKIPPED:" line) where buildah or runc is missing or unprivileged (not root,
# or it cannot create containers).
# Exits non-zero at the first failure. Set IMAGES_WORK_DIR to keep logs and outputs somewhere.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OPERATOR_IMAGE=localhost/personalization-operator:ci
TRAINER_IMAGE=localhost/personalization-trainer:ci-cpu
PYTHON_BASE=python:3.11.7-slim-bookworm  # the Dockerfile's default PYTHON_IMAGE
# Size budget, the whole image including its base (docs/deploy.md). Stage 3 writes the measured
# sizes to benchmarks/results/image_sizes.{json,md} (IMAGE_SIZES_OUT: another folder).
OPERATOR_BUDGET_MB=${OPERATOR_BUDGET_MB:-400}
TRAINER_BUDGET_MB=${TRAINER_BUDGET_MB:-1800}

say() { echo "[images] $*"; }
skip() { say "SKIPPED: $*"; exit 0; }
fail() { say "FAILED: $*"; exit 1; }
timed() {  # timed NAME LOG command...: run, print the seconds taken, show the log tail on failure
  local name=$1 log=$2 start=$SECONDS; shift 2
  "$@" >"$log" 2>&1 || { tail -20 "$log" | sed 's/^/    /'; fail "$name (log: $log)"; }
  say "$name: $((SECONDS - start)) s"
}

# ---- 0. Can images be built here? ------------------------------------------------------------
[ "$(id -u)" = 0 ] || skip "not root: running the images needs mount and network namespaces"
command -v buildah >/dev/null || skip "buildah is not installed (apt-get install buildah debootstrap)"
command -v runc >/dev/null || skip "runc is not installed (apt-get install runc): nothing can run the images"
WORK=${IMAGES_WORK_DIR:-$(mktemp -d)}
mkdir -p "$WORK"
probe=$(buildah from scratch 2>"$WORK/probe.log") && buildah mount "$probe" >/dev/null 2>>"$WORK/probe.log" \
  || { buildah rm "$probe" >/dev/null 2>&1 || true
       skip "buildah cannot create containers here (it needs root or user namespaces): $(tail -1 "$WORK/probe.log")"; }
buildah rm "$probe" >/dev/null

# ---- 1. The Python base: pulled, or a stand-in bootstrapped from Debian packages -------------
# The stand-in is the same Debian release with Debian's Python 3.11; it is kept between runs
# like a pulled base image would be (tagged with a hash of this recipe, so a change rebuilds it).
standin_recipe() {
  # Like Debian's slim images: no docs, man pages or translations.
  cat <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/lintian/*
EOF
  echo "python3 python3-pip python3-venv python-is-python3 ca-certificates"
}
build_standin() {
  local rootfs="$WORK/standin-rootfs" ctr mnt
  rm -rf "$rootfs"
  debootstrap --variant=minbase bookworm "$rootfs"
  standin_recipe | head -n -1 > "$rootfs/etc/dpkg/dpkg.cfg.d/slim"
  cp /etc/resolv.conf "$rootfs/etc/resolv.conf"
  chroot "$rootfs" sh -c "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
      --no-install-recommends $(standin_recipe | tail -1)"
  # The official image's pip installs as root without complaint; so must this one's.
  rm -f "$rootfs"/usr/lib/python3.*/EXTERNALLY-MANAGED
  rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb \
    "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/locale/* "$rootfs"/var/log/*
  : > "$rootfs/etc/resolv.conf"
  ctr=$(buildah from scratch)
  mnt=$(buildah mount "$ctr")
  cp -a "$rootfs/." "$mnt/"
  buildah umount "$ctr" >/dev/null
  buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --env LANG=C.UTF-8 \
    --cmd python3 "$ctr"
  buildah commit -q --rm "$ctr" "$BASE"
  rm -rf "$rootfs"
}
if buildah pull -q "docker.io/library/$PYTHON_BASE" >/dev/null 2>&1; then
  BASE=docker.io/library/$PYTHON_BASE
  say "base image: $BASE (pulled)"
else
  BASE=localhost/pj-standin-python:bookworm-$(standin_recipe | sha256sum | cut -c1-12)
  if buildah inspect --type image "$BASE" >/dev/null 2>&1; then
    say "base image: $BASE (stand-in, kept from an earlier run: $PYTHON_BASE cannot be pulled)"
  else
    command -v debootstrap >/dev/null || skip "$PYTHON_BASE cannot be pulled and debootstrap is not installed"
    timed "stand-in base $BASE bootstrapped ($PYTHON_BASE cannot be pulled)" "$WORK/standin.log" build_standin
  fi
fi

# ---- 2. Both images, from the Dockerfile ---------------------------------------------------
# pip inside the build uses this machine's package index settings (CA bundle, local wheel folder
# with the CPU torch), mounted for the build only. What stays in the images is their empty mount
# points (/etc/pip.conf, /opt/wheels): buildah 1.28 leaves them, a docker build would not.
build_opts=(--isolation chroot --layers=false --build-arg "PYTHON_IMAGE=$BASE" --build-arg "TRAINER_BASE_IMAGE=$BASE")
{ echo "[global]"
  [ -f /etc/ssl/certs/ca-certificates.crt ] && echo "cert = /etc/ssl/certs/ca-certificates.crt"
  [ -d /opt/wheels ] && echo "find-links = /opt/wheels"; } > "$WORK/pip.conf"
build_opts+=(-v "$WORK/pip.conf:/etc/pip.conf:ro")
[ -f /etc/ssl/certs/ca-certificates.crt ] && build_opts+=(-v /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro)
[ -d /opt/wheels ] && build_opts+=(-v /opt/wheels:/opt/wheels:ro)
build() {  # build TARGET IMAGE [extra buildah options]; the image it replaces is removed
  local target=$1 image=$2 previous; shift 2
  previous=$(buildah images -q "$image" 2>/dev/null || true)
  (cd "$ROOT" && buildah bud "${build_opts[@]}" "$@" --target "$target" -t "$image" .)
  if [ -n "$previous" ] && [ "$previous" != "$(buildah images -q "$image")" ]; then
    buildah rmi "$previous" || true  # still in use by a container: left for the next run
  fi
}
timed "operator image built" "$WORK/operator-build.log" build operator "$OPERATOR_IMAGE"
timed "CPU trainer image built" "$WORK/trainer-build.log" \
  build trainer "$TRAINER_IMAGE" --build-arg "TORCH_INDEX_URL=${TORCH_INDEX_URL:-https://pypi.org/simple}"

# ---- 3. Sizes against the budget -----------------------------------------------------------
size_mb() {  # buildah's human-readable size ("151 MB", "1.76 GB": decimal units) in MB
  buildah images --format '{{.Size}}' "$1" | awk '{ u = ($2 == "GB") ? 1000 : ($2 == "MB") ? 1 : ($2 == "kB") ? 0.001 : 1e-6
                                                   printf "%d", $1 * u }'
}
site_mb() {  # site_mb MOUNT PATH...: MB these installed-package paths take in a mounted image
  local mnt=$1 path found=(); shift
  for path in "$@"; do
    for candidate in "$mnt"/{usr/local/lib,usr/lib,opt/conda/lib}/python3*/*-packages/$path; do
      [ -e "$candidate" ] && found+=("$candidate")
    done
  done
  if [ "${#found[@]}" -gt 0 ]; then du -sc --apparent-size --block-size=1000000 "${found[@]}" | tail -1 | cut -f1; else echo 0; fi
}
parts_of() {  # parts_of NAME IMAGE WHAT=PATHS...: "--part NAME WHAT MB" per entry (PATHS comma-separated)
  local name=$1 image=$2 ctr mnt entry paths; shift 2
  ctr=$(buildah from -q "$image") && mnt=$(buildah mount "$ctr") || return 0
  for entry in "$@"; do
    IFS=, read -r -a paths <<<"${entry#*=}"
    printf -- '--part\n%s\n%s\n%s\n' "$name" "${entry%%=*}" "$(site_mb "$mnt" "${paths[@]}")"
  done
  buildah umount "$ctr" >/dev/null; buildah rm "$ctr" >/dev/null
}
base_mb=$(size_mb "$BASE")
sizes_out=${IMAGE_SIZES_OUT:-$ROOT/benchmarks/results}
sizes=(--base "$BASE" "$base_mb" --out "$sizes_out")
over=0
for entry in "operator $OPERATOR_IMAGE $OPERATOR_BUDGET_MB" "trainer $TRAINER_IMAGE $TRAINER_BUDGET_MB"; do
  read -r name image budget <<<"$entry"
  mb=$(size_mb "$image")
  say "size of the $name image: $mb MB ($((mb - base_mb)) MB on the $base_mb MB base; budget $budget MB)"
  sizes+=(--image "$name" "$mb" "$budget")
  [ "$mb" -le "$budget" ] || { say "the $name image is over its budget of $budget MB"; over=1; }
done
# Where the size goes: the operator's Kubernetes client; torch, and the folders its wheel ships
# that nothing imports (tests, C++ headers, executables).
mapfile -t parts < <(parts_of operator "$OPERATOR_IMAGE" kubernetes=kubernetes
                     parts_of trainer "$TRAINER_IMAGE" torch=torch "torch test,include,bin=torch/test,torch/include,torch/bin")
python3 "$ROOT/docker/image_sizes.py" "${sizes[@]}" "${parts[@]}" || fail "writing the image sizes"
say "sizes written: $sizes_out/image_sizes.{json,md}"
[ "$over" = 0 ] || fail "image size budget"

# ---- 4. Run them as the cluster would ------------------------------------------------------
# In a network namespace of their own (loopback only): the fake API server, the operator's ports
# and the trainer's metrics port never meet anything else on this machine.
bash "$ROOT/tools/install-venv.sh"  # the harness runs the test suite's fake API server on the host
start=$SECONDS
unshare --net sh -c 'ip link set lo up && exec "$@"' sh \
  "$ROOT/.venv/bin/python" "$ROOT/docker/run_images.py" \
  --operator-image "$OPERATOR_IMAGE" --trainer-image "$TRAINER_IMAGE" --work "$WORK/run" \
  || fail "running the images (logs: $WORK/run)"
say "images run: $((SECONDS - start)) s"
