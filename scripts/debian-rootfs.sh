# Sourced by the offline image builders (sandbox/build-offline.sh,
# systemd/testimage/build-offline.sh): one recipe for the Debian base both images start from.
#
# debian_rootfs: debootstrap "$suite" with "$packages" from "$mirror" into a new directory
# under "$build" (its path in the global `rootfs`; removed when the script exits), then
# upgrade it from "$suite-updates" and "$security_mirror". Uses the caller's log and die.

debian_rootfs() {
  [[ $(id -u) == 0 ]] || die "building the rootfs needs root (debootstrap, chroot); run: sudo $0"
  if ! command -v debootstrap >/dev/null; then
    log "installing debootstrap"
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends debootstrap >&2 \
      || { apt-get update >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends debootstrap >&2; }
  fi
  rootfs=$(mktemp -d "$build/rootfs.XXXXXX")
  # A failed debootstrap leaves a half-made tree (with bind mounts of /proc on some
  # versions); always clear it so the next run starts clean.
  trap 'umount -R "$rootfs/proc" "$rootfs/sys" 2>/dev/null || true; rm -rf --one-file-system "$rootfs"' EXIT
  log "debootstrap $suite into $rootfs (takes minutes; cached afterwards)"
  mkdir -p "$build/debs"
  debootstrap --variant=minbase --include="$packages" --cache-dir="$build/debs" \
    "$suite" "$rootfs" "$mirror" >&2

  # debootstrap installs from the release pocket only; take bookworm-security and
  # -updates too, so an image ships neither libc/openssl/python with known holes nor a
  # systemd older than a patched server runs.
  cat >"$rootfs/etc/apt/sources.list" <<SOURCES
deb $mirror $suite main
deb $mirror $suite-updates main
deb $security_mirror $suite-security main
SOURCES
  chroot "$rootfs" env DEBIAN_FRONTEND=noninteractive apt-get -q update >&2
  chroot "$rootfs" env DEBIAN_FRONTEND=noninteractive apt-get -q -y upgrade >&2
  chroot "$rootfs" apt-get clean
}
