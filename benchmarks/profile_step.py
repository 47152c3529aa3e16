"""Where a decode step's time goes: the driver's phases, and the device's top kernels (torch.profiler).

    python benchmarks/profile_step.py [--model DIR] [--batch-sizes 1,64,256] [--context 1024]

For each batch size it fills the engine with that many requests (prompt --context tokens), lets them reach the
decode phase, then times --steps engine steps: wall time per step, and inside it the scheduler + step building,
the launch, the wait for the device, and applying the tokens. A torch.profiler pass over a few steps prints the
kernels with the most device time, and the time each kernel adds to the step (time_added): with programmatic
dependent launch the decode kernels overlap, so their durations overstate what each costs (at batch 1 they summed to
1.25 ms a step of 0.72). Its "(idle)" row is mostly the profiler's own: under it a decode graph's launch waits 80-140
us after the step's input copy, which unprofiled it does not (benchmarks/graph_replay.py: the host's share of a step).
Prints tables and writes JSON.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from random import Random

from benchmarks.common import (
    add_kernel_flags,
    apply_kernel_flags,
    demo_checkpoint,
    device_name,
    print_table,
    write_result,
)


def time_added(events: list[tuple[float, float, str]]) -> tuple[dict[str, float], float]:
    """(time each kernel name adds to the end of the device's work, idle time) from (start, end, name) events: in start
    order a kernel adds what it runs past the latest end before it; gaps where nothing runs are idle. The two sum to
    the span from the first start to the last end."""
    added: dict[str, float] = defaultdict(float)
    idle, last = 0.0, None
    for start, end, name in sorted(events):
        last = start if last is None else last
        idle += max(0.0, start - last)
        added[name] += max(0.0, end - max(start, last))
        last = max(last, end)
    return dict(added), idle


def time_added_rows(prof, reps: int, rows: int = 12) -> list[dict]:
    """time_added of a torch.profiler record of `reps` calls (its CUDA events), per call, costliest first."""
    from torch.autograd import DeviceType

    events = [(e.time_range.start, e.time_range.end, e.name) for e in prof.events() if e.device_type == DeviceType.CUDA]
    added, idle = time_added(events)
    counts: dict[str, int] = defaultdict(int)
    for _, _, name in events:
        counts[name] += 1
    top = sorted(added.items(), key=lambda kv: -kv[1])[:rows]
    return ([{"kernel": name[:60], "per_step": counts[name] / reps, "added_us": us / reps} for name, us in top]
            + [{"kernel": "(idle)", "per_step": 0.0, "added_us": idle / reps}])


def instrument(engine) -> dict[str, float]:
    """Wrap the engine's phases with timers (accumulated seconds per phase)."""
    acc: dict[str, float] = defaultdict(float)

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                acc[name] += time.perf_counter() - t
        return wrapper

    engine.scheduler.schedule = timed("schedule", engine.scheduler.schedule)
    engine._build_step = timed("build_step", engine._build_step)
    engine.executor.execute_async = timed("launch", engine.executor.execute_async)
    engine.executor.execute = timed("execute_sync", engine.executor.execute)
    engine._apply = timed("apply (incl. wait)", engine._apply)
    return acc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--shape", default="qwen3-0.6b")
    ap.add_argument("--batch-sizes", default="1,64,256")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--sync", action="store_true", help="async_scheduling off")
    ap.add_argument("--temperature", type=float, default=0.6)
    add_kernel_flags(ap)
    args = ap.parse_args()

    import torch

    from nanovllm_ray import LLM, SamplingParams
    from nanovllm_ray.executor.model_runner import cuda_kernel_table, profile_cuda

    kernel_kwargs = apply_kernel_flags(args)  # the engine runs in this process on one GPU
    llm = LLM(demo_checkpoint(args.shape, args.model), max_model_len=4096, async_scheduling=not args.sync,
              **kernel_kwargs)
    engine, rng, cuda = llm.engine, Random(0), torch.cuda.is_available()
    acc = instrument(engine)
    rows, kernels = [], {}
    for bs in [int(b) for b in args.batch_sizes.split(",")]:
        sp = SamplingParams(temperature=args.temperature, max_tokens=args.steps * 3 + 20, ignore_eos=True,
                            detokenize=False)
        for i in range(bs):
            engine.add_request(f"p{bs}-{i}", [rng.randrange(0, 10000) for _ in range(args.context)], sp)
        first = True
        while any(s.num_computed_tokens < s.num_prompt_tokens for s in engine.requests.values()):
            if first and cuda:  # the first prefill step: where does a time to first token go?
                acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
                torch.cuda.synchronize()
                t = time.perf_counter()
                with torch.profiler.profile(activities=acts) as prof:
                    engine.step()
                    torch.cuda.synchronize()
                print(f"\n--- batch {bs}: first prefill step {1e3 * (time.perf_counter() - t):.1f} ms (profiled) ---\n"
                      + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
                first = False
            else:
                engine.step()  # prefill
        for _ in range(5):
            engine.step()
        acc.clear()
        t = time.perf_counter()
        for _ in range(args.steps):
            engine.step()
        wall = (time.perf_counter() - t) / args.steps
        row = {"batch": bs, "step_ms": wall * 1e3}
        row.update({f"{k}_ms": v / args.steps * 1e3 for k, v in acc.items()})
        rows.append(row)
        if cuda:
            prof = profile_cuda(engine.step, reps=5)  # one record for both tables
            table = cuda_kernel_table(prof, rows=12)
            print(f"\n--- batch {bs}: top kernels over 5 steps ---\n{table}")
            added = time_added_rows(prof, reps=5)
            print(f"\n--- batch {bs}: time each kernel adds to a step (us) ---")
            print_table(added)
            kernels[bs] = {"table": table, "time_added": added}
        for rid in list(engine.requests):
            engine.abort_request(rid)
        while engine.has_unfinished_requests():
            engine.step()
    keys = sorted({k for r in rows for k in r}, key=lambda k: (k != "batch", k != "step_ms", k))
    print_table([{k: r.get(k, 0.0) for k in keys} for r in rows])
    write_result("profile_step", {"benchmark": "profile_step", "device": device_name(), "config": vars(args),
                                  "rows": rows, "kernels": kernels})


if __name__ == "__main__":
    main()
