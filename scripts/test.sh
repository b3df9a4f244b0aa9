#!/usr/bin/env bash
# The whole test suite from a fresh clone: venv + packages, the sandbox image and the
# systemd test image (offline builders; no registry needed), then pytest. Extra arguments
# go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
# promtool (Debian's `prometheus` package) checks the metrics exposition; the test fails
# without it under CI=true.
if ! command -v promtool >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 \
    && [[ $(id -u) -eq 0 ]]; then
  echo "test: installing Debian's prometheus package for promtool" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq --no-install-recommends prometheus >/dev/null 2>&1 \
    || { apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus >/dev/null; } \
    || echo "test: could not install prometheus (promtool); the metrics test fails under CI=true" >&2
fi
# A real PostgreSQL server for the PostgreSQL store's tests (tests/store_pg start a
# throw-away cluster with initdb/pg_ctl); they fail under CI=true without one.
if ! compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null && command -v apt-get >/dev/null 2>&1 \
    && [[ $(id -u) -eq 0 ]]; then
  echo "test: installing Debian's postgresql package for the PostgreSQL store tests" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq --no-install-recommends postgresql >/dev/null 2>&1 \
    || { apt-get update -qq && apt-get install -y -qq --no-install-recommends postgresql >/dev/null; } \
    || echo "test: could not install postgresql; the PostgreSQL store tests fail under CI=true" >&2
fi
if docker info >/dev/null 2>&1; then
  bash sandbox/build-offline.sh
  bash systemd/testimage/build-offline.sh
elif [[ "${CI:-}" == "true" ]]; then
  echo "test: the Docker engine is not reachable and CI=true: sandbox and systemd boot tests cannot run" >&2
  exit 1
else
  echo "test: Docker engine not reachable; sandbox and systemd boot tests will be skipped (they fail under CI=true)" >&2
fi
exec .venv/bin/python -m pytest "$@"
