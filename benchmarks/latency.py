"""Time to first token and time per output token at batch 1, 8 and 64 (prompt 512, output 128), each beside
its floor on this card.

Floors: a decode step must read the weights once and the batch's KV cache (bytes / measured copy bandwidth);
the first token needs the prefill's FLOPs at the measured bf16 matmul rate or the weights read once, whichever
is longer.

    python benchmarks/latency.py [--model DIR] [--batch-sizes 1,8,64] [--enforce-eager]
"""

from __future__ import annotations

import argparse
import time
from random import Random

from benchmarks.common import (
    add_kernel_flags,
    apply_kernel_flags,
    demo_checkpoint,
    device_name,
    measure_bandwidth,
    measure_matmul_flops,
    model_shape,
    print_table,
    write_result,
)


def run_batch(engine, batch: int, prompt_len: int, output_len: int, rng: Random, detokenize: bool = False
              ) -> tuple[float, float]:
    """Mean TTFT and mean time per output token (after the first) over one batch."""
    from nanovllm_ray import SamplingParams

    sp = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True, detokenize=detokenize)
    start = time.perf_counter()
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    for i in range(batch):
        engine.add_request(f"lat-{batch}-{i}-{rng.random()}", [rng.randrange(0, 10000) for _ in range(prompt_len)],
                           sp)
    while engine.has_unfinished_requests():
        outs = engine.step()
        now = time.perf_counter()
        for o in outs:
            first.setdefault(o.request_id, now)
            if o.finished:
                last[o.request_id] = now
    ttft = sum(t - start for t in first.values()) / len(first)
    tpot = sum((last[r] - first[r]) / (output_len - 1) for r in first) / len(first)
    return ttft, tpot


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--shape", default="qwen3-0.6b")
    ap.add_argument("--batch-sizes", default="1,8,64")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--attention-backend", default="auto")
    ap.add_argument("--max-num-batched-tokens", type=int, default=32768)
    ap.add_argument("--tag", default="")
    add_kernel_flags(ap)
    args = ap.parse_args()

    import torch

    from nanovllm_ray import LLM

    path = demo_checkpoint(args.shape, args.model)
    kernel_kwargs = apply_kernel_flags(args)  # the engine runs in this process on one GPU
    cuda = torch.cuda.is_available()
    bandwidth = measure_bandwidth() if cuda else float("nan")
    flops = measure_matmul_flops() if cuda else float("nan")
    shape = model_shape(path)
    llm = LLM(path, max_model_len=4096, enforce_eager=args.enforce_eager, attention_backend=args.attention_backend,
              max_num_batched_tokens=args.max_num_batched_tokens, **kernel_kwargs)
    engine, rng = llm.engine, Random(0)
    run_batch(engine, 2, args.prompt_len, 8, rng)  # warm-up
    rows = []
    for bs in [int(b) for b in args.batch_sizes.split(",")]:
        ttft, tpot = run_batch(engine, bs, args.prompt_len, args.output_len, rng)
        mean_ctx = args.prompt_len + args.output_len / 2
        tpot_floor = (shape["weight_bytes"] + bs * mean_ctx * shape["kv_bytes_per_token"]) / bandwidth
        ttft_floor = max(bs * args.prompt_len * shape["flops_per_token"] / flops, shape["weight_bytes"] / bandwidth)
        rows.append({"batch": bs, "ttft_ms": ttft * 1e3, "ttft_floor_ms": ttft_floor * 1e3,
                     "tpot_ms": tpot * 1e3, "tpot_floor_ms": tpot_floor * 1e3,
                     "tpot_over_floor": tpot / tpot_floor if cuda else float("nan")})
    print_table(rows)
    print(f"bandwidth {bandwidth / 1e12:.2f} TB/s, bf16 matmul {flops / 1e12:.0f} TFLOP/s on {device_name()}")
    data = {"benchmark": "latency", "device": device_name(), "bandwidth_bytes_per_s": bandwidth,
            "matmul_flops": flops, "model": path, "shape": shape, "config": vars(args), "rows": rows}
    write_result("latency", data, args.tag)


if __name__ == "__main__":
    main()
