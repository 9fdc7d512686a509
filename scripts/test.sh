#!/usr/bin/env bash
# Install chatmw with its test tools into .venv, then run the whole test suite on SQLite and
# PostgreSQL. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m venv .venv
.venv/bin/pip install --quiet --upgrade pip
.venv/bin/pip install --quiet -e ".[test]"
.venv/bin/python -m pytest "$@"
