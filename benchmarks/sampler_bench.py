"""The sampler (kernels/sampling.py, temperature 0.6, qwen3's 151,936-token vocabulary) at 1-256 rows, this tree's
against an older copy of the module, each timed as 20 calls replayed from a CUDA graph, twice in turn (us a call).

    git show REV:nanovllm_ray/kernels/sampling.py > /tmp/sampling_old.py
    python benchmarks/sampler_bench.py /tmp/sampling_old.py
"""
import sys

import torch
import triton

from benchmarks.common import load_module
from nanovllm_ray.kernels import sampling as new

old = load_module(sys.argv[1])
for rows in (1, 16, 64, 128, 192, 256):
    logits = torch.randn(rows, 151936, device="cuda").bfloat16()
    temps = torch.full((rows,), 0.6, device="cuda")
    out = torch.empty(rows, dtype=torch.int64, device="cuda")
    res = {}
    for name, mod in (("old", old), ("new", new), ("old2", old), ("new2", new)):
        mod.sample_tokens(logits, temps, out=out)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(20):
                mod.sample_tokens(logits, temps, out=out)
        res[name] = triton.testing.do_bench(g.replay, warmup=50, rep=300) / 20 * 1e3
    print(f"rows {rows}: " + "  ".join(f"{k} {v:.1f} us" for k, v in res.items()), flush=True)
