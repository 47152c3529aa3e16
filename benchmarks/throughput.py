"""Offline throughput on the nano-vllm workload, against the card's memory-bandwidth floor.

Workload (nano-vllm's bench.py): random.seed(0); 256 sequences; each prompt randint(100, 1024) token ids drawn
from randint(0, 10000); then each max_tokens randint(100, 1024); temperature 0.6, EOS ignored. Throughput =
sum of max_tokens / wall time.

Floor: each decode step reads the weights once and every running sequence's whole KV cache, so the workload
must move sum_i(M_i * P_i + M_i (M_i - 1) / 2) * kv_bytes_per_token + max_i(M_i) * weight_bytes at least; divided
by the copy bandwidth measured on this card in this run. The table of phases puts each kind of decode step (by batch
size) against the same floor for its own steps, and says how long a step spends above it.

    python benchmarks/throughput.py [--model DIR] [--enforce-eager] [--scheduling-policy mixed|prefill_first]
"""

from __future__ import annotations

import argparse
import time
from random import randint, seed

from benchmarks.common import (
    demo_checkpoint,
    device_name,
    measure_bandwidth,
    model_shape,
    print_table,
    write_result,
)


def workload(num_seqs: int, max_input: int, max_output: int) -> tuple[list[list[int]], list[int]]:
    seed(0)
    prompts = [[randint(0, 10000) for _ in range(randint(min(100, max_input), max_input))] for _ in range(num_seqs)]
    max_tokens = [randint(min(100, max_output), max_output) for _ in range(num_seqs)]
    return prompts, max_tokens


def unseen(prompts: list[list[int]], k: int) -> list[list[int]]:
    """The prompts with their first token replaced by 10,000 + k (k >= 1), an id the workload never draws. A
    block's hash covers every token before it, so none of their blocks is in the prefix cache from a run with
    another k or with the prompts as drawn (a warm-up, a lower concurrency). Lengths, and so the floor, stay."""
    assert k >= 1, k
    return [[10_000 + k] + p[1:] for p in prompts]


def floor_seconds(prompts: list[list[int]], max_tokens: list[int], shape: dict, bandwidth: float) -> float:
    kv_tokens = sum(m * len(p) + m * (m - 1) // 2 for p, m in zip(prompts, max_tokens))
    return (kv_tokens * shape["kv_bytes_per_token"] + max(max_tokens) * shape["weight_bytes"]) / bandwidth


def trace_steps(scheduler) -> list[tuple[float, int, int, int]]:
    """Record (start time, sequences, tokens, KV tokens read) of every scheduled step; KV tokens: the sequences'
    whole contexts as the scheduler sees them (with async scheduling a sequence may not yet hold the token the step
    before it sampled: one token short)."""
    trace: list[tuple[float, int, int, int]] = []
    schedule = scheduler.schedule

    def traced():
        batch = schedule()
        if batch.seqs:
            trace.append((time.perf_counter(), len(batch.seqs), batch.num_tokens, sum(map(len, batch.seqs))))
        return batch

    scheduler.schedule = traced
    return trace


def summarize_trace(trace: list[tuple[float, int, int, int]], end: float, shape: dict | None = None,
                    bandwidth: float | None = None) -> list[dict]:
    """Wall time by kind of step: steps with prefill tokens, and decode-only steps by batch size. A step's time
    runs from its scheduling to the next's (with async scheduling the device work overlaps: this is the pace).
    With the model's shape and the bandwidth, each kind of decode step also gets its floor (the weights and its
    sequences' KV read once a step, as floor_seconds counts them; NaN without a bandwidth), the fraction of it
    reached and the time a step spends above it."""
    buckets: dict[str, list[tuple[float, int]]] = {}
    for (t, seqs, tokens, kv_tokens), nxt in zip(trace, [x[0] for x in trace[1:]] + [end]):
        if tokens > seqs:
            key = "prefill"
        else:
            low = next(b for b in (256, 128, 64, 16, 1) if seqs >= b)
            key = f"decode {low}+"
        buckets.setdefault(key, []).append((nxt - t, kv_tokens))
    rows = []
    for key, steps in sorted(buckets.items()):
        secs = sum(s for s, _ in steps)
        row = {"steps": key, "count": len(steps), "seconds": round(secs, 3),
               "mean_ms": round(1e3 * secs / len(steps), 3), "max_ms": round(1e3 * max(s for s, _ in steps), 3)}
        if shape is not None:
            floor = float("nan")
            if key != "prefill" and bandwidth:  # the workload's floor counts decode steps only
                kv = sum(k for _, k in steps)
                floor = (kv * shape["kv_bytes_per_token"] + len(steps) * shape["weight_bytes"]) / bandwidth
            row |= {"floor_s": round(floor, 3), "of_floor": round(floor / secs, 3),
                    "over_floor_ms": round(1e3 * (secs - floor) / len(steps), 3)}
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint (default: the qwen3-0.6b demo checkpoint)")
    ap.add_argument("--shape", default="qwen3-0.6b")
    ap.add_argument("--num-seqs", type=int, default=256)
    ap.add_argument("--max-input-len", type=int, default=1024)
    ap.add_argument("--max-output-len", type=int, default=1024)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--scheduling-policy", default="prefill_first", choices=["prefill_first", "mixed"],
                    help="the engine's default is prefill_first")
    ap.add_argument("--attention-backend", default="auto")
    ap.add_argument("--max-num-batched-tokens", type=int, default=16384)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--tensor-parallel-size", type=int, default=1)
    ap.add_argument("--cprofile", type=int, default=0, metavar="N",
                    help="profile the run with cProfile and print its N costliest functions (cumulative)")
    ap.add_argument("--tag", default="")
    args = ap.parse_args()

    import torch

    from nanovllm_ray import LLM, SamplingParams

    path = demo_checkpoint(args.shape, args.model)
    bandwidth = measure_bandwidth() if torch.cuda.is_available() else float("nan")
    prompts, max_tokens = workload(args.num_seqs, args.max_input_len, args.max_output_len)
    if (args.num_seqs, args.max_input_len, args.max_output_len) == (256, 1024, 1024):
        assert sum(max_tokens) == 133_966 and sum(map(len, prompts)) == 142_827, "not nano-vllm's workload"
    llm = LLM(path, max_model_len=args.max_model_len, enforce_eager=args.enforce_eager,
              scheduling_policy=args.scheduling_policy, attention_backend=args.attention_backend,
              max_num_batched_tokens=args.max_num_batched_tokens, block_size=args.block_size,
              tensor_parallel_size=args.tensor_parallel_size)
    params = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=m, detokenize=False) for m in max_tokens]
    # Warm-up (nano-vllm's bench uses one short prompt): also prompts of the lengths of the workload's first eight, so
    # that kernels first met on a batch of long prompts are compiled before the clock starts; not the prompts
    # themselves, whose blocks would then be in the prefix cache for the timed run.
    warm = unseen(prompts[:8], 1)
    llm.generate(["Benchmark: "] + warm, [SamplingParams()] + [
        SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=4, detokenize=False)] * len(warm), use_tqdm=False)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    hits_before = llm.engine.stats().prefix_cache_hits
    trace = trace_steps(llm.engine.scheduler)
    profiler = None
    if args.cprofile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    t = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - t
    if profiler is not None:
        import pstats

        profiler.disable()
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(args.cprofile)
    shape = model_shape(path)
    phases = summarize_trace(trace, time.perf_counter(), shape, bandwidth)
    generated = sum(o.num_generated_tokens for o in outs)
    assert generated == sum(max_tokens)
    floor = floor_seconds(prompts, max_tokens, shape, bandwidth)
    row = {"output_tokens": generated, "seconds": round(seconds, 3), "tokens_per_s": round(generated / seconds, 1),
           "floor_s": round(floor, 3), "floor_tokens_per_s": round(generated / floor, 1),
           "fraction_of_floor": round(floor / seconds, 3)}
    print_table([row])
    print_table(phases)
    stats = llm.engine.stats()
    hits = stats.prefix_cache_hits - hits_before  # prompt tokens the timed run found cached (0 unless preempted)
    data = {"benchmark": "throughput", "device": device_name(), "bandwidth_bytes_per_s": bandwidth,
            "model": path, "shape": shape, "num_kv_blocks": llm.engine.block_manager.num_blocks,
            "preemptions": stats.num_preemptions, "prefix_cache_hit_tokens": hits, "config": vars(args),
            "phases": phases, **row}
    print(f"bandwidth {bandwidth / 1e12:.2f} TB/s on {device_name()}; preemptions {stats.num_preemptions}; "
          f"prompt tokens found in the prefix cache {hits}; KV blocks {llm.engine.block_manager.num_blocks}")
    write_result("throughput", data, args.tag)


if __name__ == "__main__":
    main()
