#!/usr/bin/env bash
# A local three-site federation doing real federated work, from a fresh clone.
# DIR defaults to ./demo-federation; it is created on first run and reused afterwards (its
# sites run dp = "required": a run charges the researcher ε 11 per site of a budget of 25,
# so a third run in the same DIR is refused for budget: use a new DIR then).
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
