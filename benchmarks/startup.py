"""Start-up: how long `LLM(...)` takes until it is ready, and where the time goes, on a first start (empty compile
caches, as on a fresh machine) and a second (the caches the first one wrote).

    python benchmarks/startup.py                         # qwen3-0.6b demo weights
    python benchmarks/startup.py --shape tiny --device cpu
    python benchmarks/startup.py --profile               # the last start under cProfile: its costliest calls

Each start is a fresh Python process: its time runs from the process's start (imports included) to `LLM(...)`
returning. The stages are the engine's own (nanovllm_ray/startup.py: model built, weights loaded, KV cache sized,
warmed up, CUDA graphs captured). The compile caches (nanovllm_ray/caches.py: Triton, Inductor, and Python's
bytecode where the packages' own directories are read-only) go to one directory of this run (NANOVLLM_CACHE_DIR):
empty for the first start, reused by the second.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import RESULTS, demo_checkpoint, device_name, print_table, write_result
from nanovllm_ray import caches

CHILD = """
import json, sys, time
t0 = float(sys.argv[1])
prof = None
if sys.argv[4]:
    import cProfile
    prof = cProfile.Profile()
    prof.enable()
from nanovllm_ray import LLM
t_import = time.time()
llm = LLM(sys.argv[2], **json.loads(sys.argv[3]))
t_ready = time.time()
if prof is not None:
    import io, pstats
    prof.disable()
    with open(sys.argv[4], "w") as f:
        for key, n in (("cumulative", 80), ("tottime", 40)):
            pstats.Stats(prof, stream=f).sort_stats(key).print_stats(n)
runner = getattr(llm.engine.executor, "runner", None)
print("STARTUP " + json.dumps({"imports_s": t_import - t0, "llm_s": llm.startup_s, "total_s": t_ready - t0,
                               "stages": runner.clock.stages if runner is not None else {}}))
"""


CACHE_VARS = ("TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR", "PYTHONPYCACHEPREFIX")  # the run's own cache instead


def one_start(path: str, kwargs: dict, cache: Path, profile: str = "") -> dict:
    env = {k: v for k, v in os.environ.items() if k not in CACHE_VARS}
    env[caches.ENV] = str(cache)
    out = subprocess.run([sys.executable, "-c", CHILD, repr(time.time()), path, json.dumps(kwargs), profile],
                         env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(next(line for line in out.splitlines() if line.startswith("STARTUP "))[8:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--shape", default="qwen3-0.6b")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--starts", type=int, default=2, help="starts in a row (the first with empty caches)")
    ap.add_argument("--profile", action="store_true", help="run the last start under cProfile (slower) and write "
                                                             "its costliest calls to results/")
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    path = str(Path(demo_checkpoint(args.shape, args.model)).resolve())
    kwargs = {"device": args.device}
    cache = Path(tempfile.mkdtemp(prefix="nanovllm-startup-"))
    rows = []
    profile = RESULTS / f"startup-profile-{device_name().replace(' ', '_')}-{time.strftime('%Y%m%d-%H%M%S')}.txt"
    for i in range(args.starts):
        last = i == args.starts - 1
        r = one_start(path, kwargs, cache, str(profile) if args.profile and last else "")
        rows.append({"start": i + 1, "caches": "empty" if i == 0 else "warm", "total_s": round(r["total_s"], 2),
                     "imports_s": round(r["imports_s"], 2), "llm_s": round(r["llm_s"], 2),
                     **{k: round(v, 2) for k, v in r["stages"].items()}})
        print(f"start {i + 1}: ready after {r['total_s']:.1f} s (imports {r['imports_s']:.1f} s)", flush=True)
    if args.profile:
        print(f"profile of start {args.starts} (times under cProfile): {profile}")
    print(f"\n{Path(path).name} on {device_name()}")
    print_table(rows)
    write_result("startup", {"benchmark": "startup", "device": device_name(), "model": path, "rows": rows}, args.tag)


if __name__ == "__main__":
    main()
