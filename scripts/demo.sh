#!/usr/bin/env bash
# Install chatmw into .venv and start the demo: the example FAQ bot wrapped by chatmw on
# SQLite, with the metrics API. Extra arguments go to `chatmw demo`.
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m venv .venv
.venv/bin/pip install --quiet --upgrade pip
.venv/bin/pip install --quiet -e .
exec .venv/bin/chatmw demo "$@"
