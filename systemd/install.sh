#!/usr/bin/env bash
# Install stimnetd as a systemd service on an institutional server (run as root).
#   systemd/install.sh [--prefix /opt/stimnet]
# Creates the `stimnet` user, /opt/stimnet/venv, /etc/stimnet (config skeleton, certs dir),
# /var/lib/stimnet, /srv/stimnet (catalog data, read-only to the daemon), and the unit.
# Idempotent: existing config, certificates and state are never overwritten.
set -euo pipefail
prefix=/opt/stimnet
while [[ $# -gt 0 ]]; do
  case $1 in
    --prefix) prefix=$2; shift 2 ;;
    *) echo "install: unknown argument $1" >&2; exit 2 ;;
  esac
done
[[ $(id -u) -eq 0 ]] || { echo "install: run as root" >&2; exit 1; }
src=$(cd "$(dirname "$0")/.." && pwd)

getent group stimnet >/dev/null || groupadd --system stimnet
id stimnet >/dev/null 2>&1 || useradd --system --gid stimnet --home-dir /var/lib/stimnet \
  --shell /usr/sbin/nologin stimnet

install -d -m 0755 "$prefix"
[[ -x $prefix/venv/bin/python ]] || python3 -m venv "$prefix/venv"
"$prefix/venv/bin/pip" install --quiet --upgrade "$src"

install -d -o root -g stimnet -m 0750 /etc/stimnet /etc/stimnet/certs
install -d -o stimnet -g stimnet -m 0700 /var/lib/stimnet
install -d -o root -g stimnet -m 0750 /srv/stimnet
if [[ ! -f /etc/stimnet/stimnetd.toml ]]; then
  install -o root -g stimnet -m 0640 "$src/systemd/stimnetd.toml.example" /etc/stimnet/stimnetd.toml
  echo "install: wrote /etc/stimnet/stimnetd.toml — edit it (node name, certificates, catalogs)"
fi
install -m 0644 "$src/systemd/stimnetd.service" /etc/systemd/system/stimnetd.service
# The unit names the `docker` group (SupplementaryGroups=), and systemd refuses to start a
# unit naming a group that does not exist (status=216/GROUP). Without Docker on the host,
# a drop-in clears the setting: the node runs, its script jobs report "unavailable".
dropin=/etc/systemd/system/stimnetd.service.d
if getent group docker >/dev/null; then
  usermod -aG docker stimnet
  rm -f "$dropin/no-docker.conf"
else
  install -d -m 0755 "$dropin"
  cat >"$dropin/no-docker.conf" <<'DROPIN'
# Written by systemd/install.sh: this host has no `docker` group, and systemd refuses to
# start a unit whose SupplementaryGroups= names a missing group. Script jobs need Docker:
# install it, then run install.sh again (it removes this file).
[Service]
SupplementaryGroups=
DROPIN
  echo "install: no docker group on this host: script jobs are unavailable until Docker is installed (then re-run install.sh)"
fi
sed -i "s#/opt/stimnet/venv#$prefix/venv#g" /etc/systemd/system/stimnetd.service
systemctl daemon-reload
echo "install: done. Put certificates in /etc/stimnet/certs, data in /srv/stimnet, then:"
echo "  stimnetd check-config /etc/stimnet/stimnetd.toml && systemctl enable --now stimnetd"
