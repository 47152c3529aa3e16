"""Where a request's first token spends its time across the serving processes, for benchmarks.

Off unless NANOVLLM_STAGE_LOG names a directory when the process starts; then `stamp(stage, request_id)` appends
"stage<TAB>request id<TAB>time.monotonic()" to a file of this process's own there. time.monotonic() is one clock for
every process of a machine, so benchmarks/serve_throughput.py lines the stages of one request up across the client,
the ingress, the LLMServer and the engine core. Callers stamp a request's stages once each (never per token) and
test ENABLED first, so that nothing is paid when it is off.
"""

from __future__ import annotations

import os
import time

ENV = "NANOVLLM_STAGE_LOG"
ENABLED = bool(os.environ.get(ENV))
_file = None


def stamp(stage: str, request_id: str, t: float | None = None) -> None:
    """Record that `request_id` reached `stage` now (or at time.monotonic() `t`)."""
    global _file
    if _file is None:
        _file = open(os.path.join(os.environ[ENV], f"{os.getpid()}.tsv"), "a", buffering=1)
    _file.write(f"{stage}\t{request_id}\t{time.monotonic() if t is None else t:.6f}\n")


def read(directory: str) -> dict[str, dict[str, float]]:
    """stage -> request id -> time, from every process's file (a stage stamped twice keeps its first time)."""
    out: dict[str, dict[str, float]] = {}
    for name in os.listdir(directory):
        with open(os.path.join(directory, name)) as f:
            for line in f:
                stage, rid, t = line.rstrip("\n").split("\t")
                out.setdefault(stage, {}).setdefault(rid, float(t))
    return out
