"""Strong scaling of tensor parallelism: the nano-vllm workload's throughput and the batch-1 time per output token at
1, 2, 4 and 8 GPUs, the efficiency tput(N) / (N x tput(1)), and a decode step's all-reduce time beside its step time.

    python benchmarks/tp_scaling.py                                  # qwen3-8b demo weights, --tp 1,2,4,8
    python benchmarks/tp_scaling.py --tp 4,8 --baseline benchmarks/results/tp_scaling-...json   # tp=1 from a run
    python benchmarks/tp_scaling.py --shape tiny --device cpu --tp 1,2 --num-seqs 8 --max-input-len 64 \\
        --max-output-len 16                                          # smoke run on the CPU (gloo)

Each N gets a fresh LLM(model, tensor_parallel_size=N): one rank runs in this process, more
run as Ray actors, one GPU each in one placement group, driven by a compiled Ray graph and joined by NCCL (gloo on
the CPU); the LLM is shut down and its GPUs seen free again before the next N. N above the visible GPUs is skipped.

Throughput is benchmarks/throughput.py's workload and floor (the floor over N cards' bandwidth); TPOT is
benchmarks/latency.py's batch of one. The all-reduce time of a step is 2 x num_layers + 1 back-to-back all-reduces
(o_proj and down_proj of each layer, the embedding) of [batch, hidden] activations in the model's dtype, replayed in
one CUDA graph on the ranks: the step's communication without its compute or the LM head's gather to rank 0. It is
shown beside the batch-1 TPOT and beside an engine decode step at --decode-batch. Also per N: the workload's wall time
by kind of step (throughput.py's table) and graph_ms, the device's time for a decode graph at --decode-batch whose
rows hold one token of context (the step without its KV reads: weights, all-reduces, LM head, sampler).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from random import Random

from benchmarks.common import (
    demo_checkpoint,
    device_name,
    measure_bandwidth,
    model_shape,
    print_table,
    write_result,
)
from benchmarks.executor_dispatch import decode_step_ms
from benchmarks.latency import run_batch
from benchmarks.throughput import floor_seconds, summarize_trace, trace_steps, workload


def run_tp(path: str, tp: int, args: argparse.Namespace, prompts: list[list[int]], max_tokens: list[int],
           bandwidth: float | None) -> dict:
    """One LLM with `tp` ranks: workload throughput, batch-1 TPOT, decode step and all-reduce times."""
    import torch

    from nanovllm_ray import LLM, SamplingParams

    cuda = args.device != "cpu" and torch.cuda.is_available()
    llm = LLM(path, tensor_parallel_size=tp, device=args.device, dtype=args.dtype, max_model_len=args.max_model_len,
              max_num_batched_tokens=args.max_num_batched_tokens, enforce_eager=args.enforce_eager,
              attention_backend=args.attention_backend, gpu_memory_utilization=args.gpu_memory_utilization,
              prefill_graph_tokens=args.prefill_graph_tokens, fused_all_reduce_norm=not args.no_fused_all_reduce_norm)
    try:
        engine, executor = llm.engine, llm.engine.executor
        params = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=m, detokenize=False) for m in max_tokens]
        llm.generate(["Benchmark: "], SamplingParams(), use_tqdm=False)  # warm-up
        if cuda:
            torch.cuda.synchronize()
        trace = trace_steps(engine.scheduler)
        t = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - t
        # each kind of step against its floor over tp cards' bandwidth (the workload's floor below, step by step)
        phases = summarize_trace(trace, time.perf_counter(), model_shape(path), bandwidth * tp if bandwidth else None)
        print_table(phases)
        generated = sum(o.num_generated_tokens for o in outs)
        assert generated == sum(max_tokens)
        print(f"tp={tp}: workload {generated / seconds:,.0f} tok/s", flush=True)

        rng = Random(0)
        run_batch(engine, 2, args.prompt_len, 8, rng)  # warm-up
        _, tpot = run_batch(engine, 1, args.prompt_len, args.output_len, rng)
        batch = min(args.decode_batch or len(prompts), llm.config.max_num_seqs)
        step_ms = decode_step_ms(engine, batch, args.steps, rng)
        print(f"tp={tp}: TPOT {tpot * 1e3:.3f} ms, decode step at batch {batch} {step_ms:.3f} ms", flush=True)

        # The device's time for a whole batch-1 decode step (the graph replayed back to back, one token of
        # context): TPOT minus this is the host's share (scheduling, dispatch to the ranks, the result's return).
        graph_b1, kernels = executor.measure_decode_graph(1, profile=args.profile) if cuda else (0.0, "")
        if kernels:
            print(f"\n--- tp={tp}: top kernels of 5 batch-1 decode graph replays (rank 0) ---\n{kernels}")
        # The same at the decode batch: its rows have one token of context, so this is the step without the KV reads.
        graph_batch, kernels_batch = executor.measure_decode_graph(batch, profile=args.profile) if cuda else (0.0, "")
        if kernels_batch:
            print(f"\n--- tp={tp}: top kernels of 5 batch-{batch} decode graph replays (rank 0) ---\n{kernels_batch}")
        layers = llm.config.hf_config["num_hidden_layers"]
        allreduce = {1: 0.0, batch: 0.0}  # one rank: no communication
        if tp > 1:
            allreduce = {b: executor.measure_allreduce(b, 2 * layers + 1) * 1e3 for b in (1, batch)}
        stats = engine.stats()
        path_taken = None
        if tp > 1:
            import ray

            path_taken = ray.get(executor.workers[0].__ray_call__.remote(lambda w: w.all_reduce_path))
        row = {"tp": tp, "all_reduce_path": path_taken, "output_tokens": generated, "seconds": round(seconds, 3),
               "tokens_per_s": round(generated / seconds, 1),
               "tpot_b1_ms": round(tpot * 1e3, 3), "graph_b1_ms": round(graph_b1 * 1e3, 3),
               "allreduce_b1_ms": round(allreduce[1], 3),
               "decode_batch": batch, "step_ms": round(step_ms, 3), "graph_ms": round(graph_batch * 1e3, 3),
               "allreduce_ms": round(allreduce[batch], 3),
               "num_kv_blocks": engine.block_manager.num_blocks, "preemptions": stats.num_preemptions,
               "async_scheduling": engine.async_scheduling, "executor": type(executor).__name__,
               "phases": phases, **({"kernels_b1": kernels, f"kernels_b{batch}": kernels_batch} if kernels else {})}
        if bandwidth:
            floor = floor_seconds(prompts, max_tokens, model_shape(path), bandwidth * tp)
            row |= {"floor_s": round(floor, 3), "fraction_of_floor": round(floor / seconds, 3)}
        return row
    finally:
        llm.engine.shutdown()


def gpu_memory_used_mib() -> list[int] | None:
    """Memory in use on each GPU, from nvidia-smi (no CUDA context in this process); None without nvidia-smi."""
    if shutil.which("nvidia-smi") is None:
        return None
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, check=True).stdout
    return [int(x) for x in out.split()]


def wait_gpus_free(baseline: list[int] | None, slack_mib: int = 2048, timeout_s: float = 60.0) -> None:
    """Killed rank actors release their GPUs a moment after ray.kill: wait until every GPU is back to its memory use
    before the first LLM (plus this process's CUDA context), so the next N's KV profile sees the whole card."""
    if baseline is None:
        return
    deadline = time.monotonic() + timeout_s
    while True:
        used = gpu_memory_used_mib()
        if all(u <= b + slack_mib for u, b in zip(used, baseline)):
            return
        if time.monotonic() > deadline:
            print(f"warning: GPU memory still in use after {timeout_s:.0f} s: {used} MiB (before: {baseline} MiB)")
            return
        time.sleep(1.0)


def baseline_row(path: str | None) -> dict | None:
    """The tp=1 row of an earlier tp_scaling result, for runs split across commands."""
    if not path:
        return None
    data = json.loads(Path(path).read_text())
    row = next((r for r in data["rows"] if r["tp"] == 1), None)
    if row is None:
        raise SystemExit(f"{path} has no tp=1 row")
    if data["device"] != device_name():
        print(f"warning: baseline measured on {data['device']}, this run on {device_name()}")
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tp", default="1,2,4,8", help="tensor-parallel sizes")
    ap.add_argument("--model", default=None, help="checkpoint (default: the --shape demo checkpoint)")
    ap.add_argument("--shape", default="qwen3-8b")
    ap.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--num-seqs", type=int, default=256)
    ap.add_argument("--max-input-len", type=int, default=1024)
    ap.add_argument("--max-output-len", type=int, default=1024)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--max-num-batched-tokens", type=int, default=16384)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--prefill-graph-tokens", type=int, default=2048)
    ap.add_argument("--no-fused-all-reduce-norm", action="store_true",
                    help="fused_all_reduce_norm=False: the all-reduce, then the add + RMSNorm")
    ap.add_argument("--attention-backend", default="auto")
    ap.add_argument("--prompt-len", type=int, default=512, help="batch-1 TPOT prompt")
    ap.add_argument("--output-len", type=int, default=128, help="batch-1 TPOT output")
    ap.add_argument("--decode-batch", type=int, default=None, help="decode step batch (default: --num-seqs)")
    ap.add_argument("--steps", type=int, default=30, help="decode steps timed")
    ap.add_argument("--baseline", default=None, help="tp_scaling JSON whose tp=1 row is the baseline")
    ap.add_argument("--ray-num-cpus", type=int, default=None, help="CPUs of the local Ray instance (default: all)")
    ap.add_argument("--profile", action="store_true",
                    help="print and keep rank 0's top kernels of a batch-1 step and of one at --decode-batch")
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a local instance of our own
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast stays off (the ranks set it too)

    import ray
    import torch

    cuda = args.device != "cpu" and torch.cuda.is_available()
    gpus = torch.cuda.device_count() if cuda else 0
    if not cuda:
        torch.set_num_threads(1)  # the one thread each Ray rank gets
    path = demo_checkpoint(args.shape, args.model)
    prompts, max_tokens = workload(args.num_seqs, args.max_input_len, args.max_output_len)
    if (args.num_seqs, args.max_input_len, args.max_output_len) == (256, 1024, 1024):
        assert sum(max_tokens) == 133_966 and sum(map(len, prompts)) == 142_827, "not nano-vllm's workload"
    baseline_used = gpu_memory_used_mib() if cuda else None
    bandwidth = measure_bandwidth() if cuda else None
    base = baseline_row(args.baseline)
    ray.init(address="local", num_cpus=args.ray_num_cpus, include_dashboard=False, logging_level="WARNING",
             log_to_driver=False)
    rows = []
    try:
        for tp in [int(t) for t in args.tp.split(",")]:
            if cuda and tp > gpus:
                print(f"skipping tp={tp}: {gpus} GPUs visible")
                continue
            t = time.perf_counter()
            rows.append(run_tp(path, tp, args, prompts, max_tokens, bandwidth))
            gc.collect()  # an in-process runner and its CUDA graphs hold each other
            if cuda:
                torch.cuda.empty_cache()
            wait_gpus_free(baseline_used)
            print(f"tp={tp}: {rows[-1]['tokens_per_s']:,.0f} tok/s, TPOT {rows[-1]['tpot_b1_ms']:.2f} ms "
                  f"({time.perf_counter() - t:.0f} s with start-up)", flush=True)
    finally:
        ray.shutdown()

    base = next((r for r in rows if r["tp"] == 1), base)
    for r in rows:
        r["efficiency"] = round(r["tokens_per_s"] / (r["tp"] * base["tokens_per_s"]), 3) if base else None
        r["tpot_speedup"] = round(base["tpot_b1_ms"] / r["tpot_b1_ms"], 3) if base else None
    shown = ["tp", "tokens_per_s", "efficiency", "fraction_of_floor", "tpot_b1_ms", "tpot_speedup", "graph_b1_ms",
             "allreduce_b1_ms", "decode_batch", "step_ms", "graph_ms", "allreduce_ms", "preemptions"]
    print(f"\n{Path(path).name} on {f'{gpus} x ' if gpus else ''}{device_name()}"
          + (f", {bandwidth / 1e12:.2f} TB/s a card" if bandwidth else ""))
    print_table([{k: "-" if r.get(k) is None else r[k] for k in shown} for r in rows])
    data = {"benchmark": "tp_scaling", "device": device_name(), "num_gpus": gpus, "bandwidth_bytes_per_s": bandwidth,
            "model": path, "shape": model_shape(path), "config": vars(args), "baseline_tp1": base, "rows": rows}
    write_result("tp_scaling", data, args.tag)


if __name__ == "__main__":
    main()
