#!/usr/bin/env bash
# Creates .venv (if absent) and installs the project with its test tools. Sourced by test.sh and run.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
# torch first, pinned: an open range would pull a CUDA build of several GB on a CPU-only machine.
.venv/bin/python -c 'import torch' 2>/dev/null || .venv/bin/pip install -q 'torch==2.13.0'
.venv/bin/pip install -q -e '.[test]'
