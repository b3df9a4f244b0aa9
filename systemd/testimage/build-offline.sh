#!/usr/bin/env bash
# Builds the image that boots systemd/stimnetd.service under a real systemd (PID 1 in a
# container), without a container registry: a Debian rootfs with systemd and python3 made
# by debootstrap, imported with `docker import`. tests/federation/test_systemd.py runs it.
#
#   systemd/testimage/build-offline.sh        # idempotent; prints the image tag on stdout
#
# The image holds no StimNet code: the test installs the checkout with systemd/install.sh
# inside the container, from a wheelhouse built on the host (the container has no index).
# The rootfs (the slow part: minutes) is cached as a tarball under systemd/testimage/build/
# keyed by the suite, the package list and the recipe number. Needs root (debootstrap) and
# a reachable Debian mirror for the first build only.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=${STIMNET_SYSTEMD_IMAGE_REPO:-stimnet-systemd-test}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
security_mirror=${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
suite=bookworm
# systemd-sysv: /sbin/init. python3-venv: install.sh makes the venv with `python3 -m venv`.
# passwd: groupadd/useradd for install.sh. procps: /bin/kill for the unit's ExecReload.
# dbus: systemctl's and logind's bus, as on a server.
packages=systemd,systemd-sysv,dbus,python3,python3-venv,passwd,procps
build=${STIMNET_SYSTEMD_IMAGE_BUILD_DIR:-$here/build}
# Bump when the rootfs recipe below changes, so cached rootfs tarballs are rebuilt.
recipe=1

log() { echo "build-offline: $*" >&2; }
die() { log "$*"; exit 1; }
# shellcheck source=../../scripts/debian-rootfs.sh
source "$here/../../scripts/debian-rootfs.sh"

docker info >/dev/null 2>&1 || die "the Docker engine is not reachable (is dockerd running? may this user use it?)"

key=$(printf '%s|%s|%s' "$suite" "$packages" "$recipe" | sha256sum | cut -c1-12)
tag="$repo:$key"
base_tar="$build/rootfs-$key.tar"
image_key() {
  docker image inspect "$tag" --format '{{ index .Config.Labels "org.stimnet.systemd-test.rootfs" }}' \
    2>/dev/null || true
}

if [[ "$(image_key)" == "$key" ]]; then
  echo "$tag"
  exit 0
fi

mkdir -p "$build"
# test.sh and the test fixture may both start a build: the first builds, the others wait
# here and then take the fast path.
exec 9>"$build/.lock"
flock 9
if [[ "$(image_key)" == "$key" ]]; then
  echo "$tag"
  exit 0
fi

if [[ ! -s "$base_tar" ]]; then
  debian_rootfs

  # Units that need hardware, a console or a writable kernel interface a container does
  # not have: they only fail and slow the boot down.
  for unit in getty@tty1.service console-getty.service systemd-udevd.service \
      systemd-udev-trigger.service systemd-firstboot.service systemd-modules-load.service \
      sys-kernel-config.mount sys-kernel-debug.mount sys-kernel-tracing.mount \
      systemd-remount-fs.service systemd-timesyncd.service apt-daily.timer \
      apt-daily-upgrade.timer e2scrub_all.timer fstrim.timer; do
    ln -sf /dev/null "$rootfs/etc/systemd/system/$unit"
  done
  chroot "$rootfs" systemctl set-default multi-user.target >&2
  # systemd makes a machine id at first boot when the file is empty.
  : >"$rootfs/etc/machine-id"
  rm -rf "$rootfs"/var/cache/apt/* "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/log/*.log \
    "$rootfs"/usr/share/doc "$rootfs"/usr/share/man "$rootfs"/usr/share/info \
    "$rootfs"/usr/share/locale "$rootfs"/var/cache/debconf/*-old
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

log "importing $tag"
# systemd reads `container` to know it is in one; SIGRTMIN+3 is its "halt" request, so
# `docker stop` shuts it down cleanly (docker import does not take STOPSIGNAL: the test
# passes --stop-signal to docker run).
docker import \
  --change "LABEL org.stimnet.systemd-test.rootfs=$key" \
  --change 'ENV container=docker LANG=C.UTF-8' \
  --change 'CMD ["/sbin/init"]' \
  "$base_tar" "$tag" >&2
echo "$tag"
