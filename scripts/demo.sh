#!/usr/bin/env bash
# A local three-site federation doing real federated work, from a fresh clone.
# DIR defaults to ./demo-federation; it is created on first run and reused afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
if docker info >/dev/null 2>&1; then
  bash sandbox/build-offline.sh
else
  echo "demo: Docker engine not reachable; the sandboxed script step will report it" >&2
fi
dir=${1:-demo-federation}
if [[ ! -d $dir/sites ]]; then
  .venv/bin/stimctl demo init "$dir" --sites 3
fi
exec .venv/bin/stimctl demo run "$dir"
