#!/usr/bin/env bash
# Regenerates docs/benchmarks.md: installs wrk when missing, then runs every benchmark.
# Takes about 40 minutes on 2 cores, plus about 20 minutes the first time to generate the
# query benchmark's stores under bench/.data/. Not part of the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v wrk >/dev/null || (apt-get update && apt-get install -y wrk)
pg_isready -h 127.0.0.1 -p 5432 -q || {
  echo "PostgreSQL is not running on 127.0.0.1:5432; start it first (see .ci/run)" >&2
  exit 1
}
exec .venv/bin/python -m bench.run_all "$@"
