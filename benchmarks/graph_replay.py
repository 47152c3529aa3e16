"""Is a decode step host-bound? The engine's step wall time (40 steps at each batch size, 512-token prompts, async
scheduling) beside the same step's decode graph replayed back to back (the device's time alone); their difference is
the host's share. profile_step.py's "(idle)" row cannot say: under torch.profiler a graph's launch itself slows.
Replaying overwrites the graphs' token buffer, so the requests are aborted after it.

    python benchmarks/graph_replay.py 1,2,8,16,64,128
"""
import sys
import time
from random import Random

import torch

from benchmarks.common import demo_checkpoint
from nanovllm_ray import LLM, SamplingParams


def seconds_per_call(fn, reps: int = 40) -> float:
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps


llm = LLM(demo_checkpoint("qwen3-0.6b", None), max_model_len=4096)
engine, rng = llm.engine, Random(0)
runner = engine.executor.runner
for bs in [int(b) for b in sys.argv[1].split(",")]:
    sp = SamplingParams(temperature=0.6, max_tokens=200, ignore_eos=True, detokenize=False)
    for i in range(bs):
        engine.add_request(f"p{bs}-{i}", [rng.randrange(0, 10000) for _ in range(512)], sp)
    for _ in range(12):
        engine.step()
    step = seconds_per_call(engine.step)
    graph = runner.graphs.graphs[runner.graphs.padded(bs)]
    graph.replay()  # once before the clock
    rep = seconds_per_call(graph.replay)
    print(f"batch {bs}: engine step {step * 1e3:.3f} ms, graph replayed back to back {rep * 1e3:.3f} ms, "
          f"host-bound share {(step - rep) * 1e3:.3f} ms", flush=True)
    for rid in list(engine.requests):
        engine.abort_request(rid)
    while engine.has_unfinished_requests():
        engine.step()
