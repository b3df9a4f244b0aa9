#!/usr/bin/env bash
# Builds the job sandbox image without a container registry: a Debian rootfs made by
# debootstrap, plus the in-container runtime, imported with `docker import`.
#
#   sandbox/build-offline.sh            # idempotent; prints the image tag on stdout
#
# Sites with a registry can use sandbox/Dockerfile instead; both read sandbox/VERSION.
# The debootstrap rootfs (the slow part: minutes) is cached as a tarball under
# sandbox/build/ keyed by VERSION and the package list, so changing only the runtime
# re-imports in seconds. Needs root (debootstrap) and a reachable Debian mirror.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
version=$(tr -d '[:space:]' <"$here/VERSION")
repo=${STIMNET_SANDBOX_REPO:-stimnet-sandbox}
tag="$repo:$version"
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
security_mirror=${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
suite=bookworm
packages=python3,python3-numpy,python3-pandas,python3-nibabel,python3-scipy
build=${STIMNET_SANDBOX_BUILD_DIR:-$here/build}
# Bump when the rootfs recipe below changes, so cached rootfs tarballs are rebuilt.
recipe=3

log() { echo "build-offline: $*" >&2; }
die() { log "$*"; exit 1; }
# shellcheck source=../scripts/debian-rootfs.sh
source "$here/../scripts/debian-rootfs.sh"

docker info >/dev/null 2>&1 || die "the Docker engine is not reachable (is dockerd running? may this user use it?)"

# The image's identity is VERSION plus digests of the runtime and of the rootfs recipe,
# each a label, so an edited runtime or recipe is never served from a stale image.
runtime_digest=$(
  cd "$here/runtime" &&
    find . -type f -name '*.py' -print0 | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16
)
base_key=$(printf '%s|%s|%s|%s' "$version" "$suite" "$packages" "$recipe" | sha256sum | cut -c1-12)
base_tar="$build/rootfs-$version-$base_key.tar"
identity="$version $runtime_digest $base_key"
image_identity() {
  local format='{{ index .Config.Labels "org.stimnet.sandbox.version" }}'
  format+=' {{ index .Config.Labels "org.stimnet.sandbox.runtime" }}'
  format+=' {{ index .Config.Labels "org.stimnet.sandbox.rootfs" }}'
  docker image inspect "$tag" --format "$format" 2>/dev/null || true
}

if [[ "$(image_identity)" == "$identity" ]]; then
  echo "$tag"
  exit 0
fi

mkdir -p "$build"
# CI may start several builds at once (test.sh, then the test fixture): the first one
# builds, the others wait here and then take the fast path.
exec 9>"$build/.lock"
flock 9
if [[ "$(image_identity)" == "$identity" ]]; then
  echo "$tag"
  exit 0
fi

if [[ ! -s "$base_tar" ]]; then
  debian_rootfs

  # Jobs never install anything, and every byte here is paid by each CI run: drop the
  # package caches and docs; drop the test suites shipped inside numpy/pandas/scipy.
  rm -rf "$rootfs"/var/cache/apt/* "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/log/* \
    "$rootfs"/usr/share/doc "$rootfs"/usr/share/man "$rootfs"/usr/share/info \
    "$rootfs"/usr/share/locale "$rootfs"/usr/share/lintian "$rootfs"/var/cache/debconf/*-old
  find "$rootfs"/usr/lib/python3/dist-packages/{numpy,pandas,scipy} -depth -type d -name tests \
    -exec rm -rf {} +
  # python3-scipy depends on pythran, which drags in gcc, binutils and the boost headers
  # (~400 MB). Nothing in a job compiles, and a toolchain only helps an attacker.
  rm -rf "$rootfs"/usr/include "$rootfs"/usr/lib/gcc "$rootfs"/usr/libexec/gcc \
    "$rootfs"/usr/lib/x86_64-linux-gnu/*.a \
    "$rootfs"/usr/lib/x86_64-linux-gnu/lib{asan,tsan,lsan,ubsan,hwasan,gprofng}.so* \
    "$rootfs"/usr/bin/x86_64-linux-gnu-* \
    "$rootfs"/usr/bin/{gcc,g++,cc,c++,cpp,c89-gcc,c99-gcc,as,ld,ld.bfd,ld.gold,gold,lto-dump}* 2>/dev/null || true
  # no-new-privileges already neutralises setuid binaries; removing the bits means a
  # misconfigured runner still cannot use them.
  find "$rootfs" -xdev -type f -perm /6000 -exec chmod ug-s {} +
  # The device nodes debootstrap made are replaced by Docker's own /dev at run time.
  rm -rf "${rootfs:?}"/dev/* "${rootfs:?}"/proc/* "${rootfs:?}"/sys/*

  tar --numeric-owner -C "$rootfs" -cf "$base_tar.partial" .
  mv "$base_tar.partial" "$base_tar"
  find "$build" -maxdepth 1 -name 'rootfs-*.tar' ! -name "$(basename "$base_tar")" -delete
  find "$build/debs" -name '*.deb' -mtime +30 -delete
  rm -rf --one-file-system "$rootfs"
  trap - EXIT
  log "cached rootfs $base_tar ($(du -h "$base_tar" | cut -f1))"
fi

# Append the runtime to a copy of the cached base so the base stays pristine.
stage=$(mktemp -d "$build/stage.XXXXXX")
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/opt/stimnet"
cp -R "$here/runtime/." "$stage/opt/stimnet/"
find "$stage" -name '__pycache__' -prune -exec rm -rf {} +
chmod -R a+rX,go-w "$stage/opt"
cp "$base_tar" "$stage/image.tar"
tar --numeric-owner --owner=0 --group=0 -C "$stage" -rf "$stage/image.tar" ./opt/stimnet

log "importing $tag"
previous=$(docker image inspect "$tag" --format '{{.Id}}' 2>/dev/null || true)
docker import \
  --change "LABEL org.stimnet.sandbox.version=$version" \
  --change "LABEL org.stimnet.sandbox.runtime=$runtime_digest" \
  --change "LABEL org.stimnet.sandbox.rootfs=$base_key" \
  --change 'USER 65534:65534' \
  --change 'WORKDIR /job' \
  --change 'ENV LANG=C.UTF-8 PYTHONDONTWRITEBYTECODE=1 HOME=/tmp' \
  --change 'ENTRYPOINT ["python3", "-I", "-B", "/opt/stimnet/entrypoint.py"]' \
  "$stage/image.tar" "$tag" >&2
# The old image is now untagged; drop it unless a container still uses it.
if [[ -n "$previous" && "$previous" != "$(docker image inspect "$tag" --format '{{.Id}}')" ]]; then
  docker rmi "$previous" >/dev/null 2>&1 || true
fi
echo "$tag"
