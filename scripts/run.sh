#!/usr/bin/env bash
# Installs the project (if needed) and starts the OpenAI-compatible service: `serve run serve_config.yaml`
# (the tiny demo checkpoint, made on first start; CPU when there is no GPU). Ctrl-C stops it.
#   bash scripts/run.sh                              # serve_config.yaml on http://127.0.0.1:8000/v1
#   bash scripts/run.sh serve_config_gpu_tp.yaml     # another config
# The offline CLI is still there: .venv/bin/python -m nanovllm_ray.generate --prompt "Hello"
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-false}"
# `serve run` through deployments.launch: a NANOVLLM_API_KEY exported here is enforced even on a running cluster.
exec .venv/bin/python -m deployments.launch "${1:-serve_config.yaml}" "${@:2}"
