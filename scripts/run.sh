#!/usr/bin/env bash
# Installs the project (if needed), makes the tiny demo checkpoint (if absent) and generates from it offline.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python -m nanovllm_ray.generate "$@"
