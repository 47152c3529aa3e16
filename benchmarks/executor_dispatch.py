"""What it costs the driver to send a step to its ranks: a no-op step round trip, and a real decode step, for
ranks in this process, Ray actors driven by a compiled graph, and Ray actors driven by plain remote calls.

    python benchmarks/executor_dispatch.py                      # tiny demo model, tp 1 and 2 (CPU: gloo)
    python benchmarks/executor_dispatch.py --shape qwen3-0.6b --tp 1

A no-op step sends None to every rank and waits for every answer: the executor's own overhead. A decode step
is LLMEngine.step() over `batch` running requests (scheduling, the model, sampling, detokenizing).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from random import Random

from benchmarks.common import demo_checkpoint, device_name, print_table, write_result


def decode_step_ms(engine, batch: int, steps: int, rng: Random) -> float:
    """Mean wall time of an engine step while `batch` requests decode."""
    from nanovllm_ray import SamplingParams

    sp = SamplingParams(temperature=0.0, max_tokens=steps + 8, ignore_eos=True)
    ids = [f"d-{rng.random()}-{i}" for i in range(batch)]
    for rid in ids:
        engine.add_request(rid, [rng.randrange(0, 150000) for _ in range(32)], sp)
    started: set[str] = set()
    while len(started) < batch:  # prefills
        started |= {o.request_id for o in engine.step()}
    for _ in range(3):
        engine.step()
    t = time.perf_counter()
    for _ in range(steps):
        engine.step()
    dt = (time.perf_counter() - t) / steps
    for rid in ids:
        engine.abort_request(rid)
    return dt * 1e3


def noop_us(execute, n: int = 300) -> float:
    for _ in range(20):
        execute(None)
    t = time.perf_counter()
    for _ in range(n):
        execute(None)
    return (time.perf_counter() - t) / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--shape", default="tiny")
    ap.add_argument("--tp", default="1,2", help="tensor-parallel sizes to try")
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")

    import ray
    import torch

    from nanovllm_ray import Config, LLMEngine
    from nanovllm_ray.executor.base import InProcessExecutor
    from nanovllm_ray.executor.ray_executor import RayExecutor

    path = demo_checkpoint(args.shape, args.model)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    tps = [int(t) for t in args.tp.split(",")]
    gpus = torch.cuda.device_count()
    if not torch.cuda.is_available():
        torch.set_num_threads(1)  # the same one thread per rank as the Ray workers get
    ray.init(include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    rng = Random(0)
    rows = []
    for tp in tps:
        if gpus and tp > gpus:
            print(f"skipping tp={tp}: {gpus} GPUs")
            continue
        config = Config.from_kwargs(path, tensor_parallel_size=tp, max_model_len=2048, max_num_seqs=64,
                                    gpu_memory_utilization=0.5)
        modes = (["in-process"] if tp == 1 else []) + ["ray-compiled", "ray-remote"]
        for mode in modes:
            if mode == "in-process":
                executor = InProcessExecutor(config)
                # The whole dispatch is a method call: time it around a no-op of the same shape.
                noop = noop_us(lambda step, ex=executor: None if step is None else ex.execute(step))
            else:
                executor = RayExecutor(config.replace(dispatch=mode.removeprefix("ray-")))
                noop = executor.measure_dispatch(300) * 1e6
            engine = LLMEngine(config, executor=executor)
            row = {"tp": tp, "mode": mode, "noop_step_us": noop}
            for b in batches:
                row[f"decode_b{b}_ms"] = decode_step_ms(engine, b, args.steps, rng)
            rows.append(row)
            engine.shutdown()
            del engine, executor
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    ray.shutdown()
    print(f"\n{Path(path).name} on {device_name()}")
    print_table(rows)
    data = {"benchmark": "executor_dispatch", "device": device_name(), "model": path, "config": vars(args),
            "rows": rows}
    write_result("executor_dispatch", data, args.tag)


if __name__ == "__main__":
    main()
