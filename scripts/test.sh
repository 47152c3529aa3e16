#!/usr/bin/env bash
# The project's test command: installs what it needs from nothing, lints, then runs the tests.
# GPU tests (marker `gpu`) are skipped where there is no CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/ruff check .
set +e
.venv/bin/python -m pytest -q "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests"
  exit 0
fi
exit "$rc"
