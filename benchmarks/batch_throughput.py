"""The batch job's overhead: nano-vllm's throughput workload (benchmarks/throughput.py) written as JSONL and run
through `python -m deployments.batch_job`, against the offline engine (`LLM.generate`) on the same machine.

Both runs see the same rows (seeded prompts of random token ids, temperature 0.6, EOS ignored, no detokenization)
and the same engine configuration (one rank), each in a process of its own so that each has the GPU to itself.
Throughput is generated tokens / seconds of generation: for the offline engine, `generate()` after a warm-up; for
the job, from its first replica being ready (warmed up) to its last row written (the job's summary), so both
exclude model loading. `end_to_end_s` adds start-up: each whole process (for the job: Ray, actors, model loading).

    python benchmarks/batch_throughput.py [--model DIR | --shape qwen3-0.6b] [--replicas 1]
    python benchmarks/batch_throughput.py --shape tiny --num-seqs 16 --max-input-len 64 --max-output-len 16  # CPU
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

from benchmarks.common import demo_checkpoint, device_name, print_table, write_result
from benchmarks.throughput import workload

ROOT = Path(__file__).resolve().parent.parent


def write_rows(path: Path, prompts: list[list[int]], max_tokens: list[int], detokenize: bool) -> None:
    with open(path, "w") as f:
        for i, (p, m) in enumerate(zip(prompts, max_tokens)):
            params = {"temperature": 0.6, "ignore_eos": True, "max_tokens": m, "detokenize": detokenize}
            f.write(json.dumps({"id": i, "prompt": p, "sampling_params": params}) + "\n")


def engine_flags(args: argparse.Namespace) -> dict[str, object]:
    """The engine configuration both runs share (Config keys)."""
    kw: dict[str, object] = {"max_model_len": args.max_model_len, "max_num_batched_tokens": args.max_num_batched_tokens}
    if args.enforce_eager:
        kw["enforce_eager"] = True
    return kw


def run_offline(args: argparse.Namespace, rows: Path, out: Path) -> None:
    """In a child process: the offline engine over the same rows; writes {output_tokens, seconds} to `out`."""
    import torch

    from nanovllm_ray import LLM, SamplingParams

    data = [json.loads(line) for line in rows.read_text().splitlines()]
    llm = LLM(args.model, **engine_flags(args))
    llm.generate(["Benchmark: "], SamplingParams(), use_tqdm=False)  # warm-up, as the job's replicas do
    params = [SamplingParams(**r["sampling_params"]) for r in data]
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    outs = llm.generate([r["prompt"] for r in data], params, use_tqdm=False)
    seconds = time.perf_counter() - t
    out.write_text(json.dumps({"output_tokens": sum(o.num_generated_tokens for o in outs), "seconds": seconds}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint (default: the demo checkpoint of --shape)")
    ap.add_argument("--shape", default="qwen3-0.6b")
    ap.add_argument("--num-seqs", type=int, default=256)
    ap.add_argument("--max-input-len", type=int, default=1024)
    ap.add_argument("--max-output-len", type=int, default=1024)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--max-num-batched-tokens", type=int, default=16384)
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--replicas", type=int, default=1, help="the job's replicas (the offline engine is one)")
    ap.add_argument("--replica-num-cpus", type=float, default=1.0)
    ap.add_argument("--detokenize", action="store_true", help="detokenize in both runs (throughput.py does not)")
    ap.add_argument("--tag", default="")
    ap.add_argument("--offline-child", nargs=2, metavar=("ROWS", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.offline_child:
        run_offline(args, Path(args.offline_child[0]), Path(args.offline_child[1]))
        return

    args.model = demo_checkpoint(args.shape, args.model)
    prompts, max_tokens = workload(args.num_seqs, args.max_input_len, args.max_output_len)
    expected = sum(max_tokens)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    env.setdefault("RAY_AUTH_MODE", "disabled")  # the job starts a Ray instance of its own on this machine
    results = []
    with tempfile.TemporaryDirectory(prefix="batch-bench-") as tmp:
        rows, offline_out = Path(tmp) / "in.jsonl", Path(tmp) / "offline.json"
        write_rows(rows, prompts, max_tokens, args.detokenize)
        passthrough = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                       if k in ("model", "max_model_len", "max_num_batched_tokens")]
        passthrough += ["--enforce-eager"] if args.enforce_eager else []

        t = time.perf_counter()
        subprocess.run([sys.executable, __file__, *passthrough, "--offline-child", str(rows), str(offline_out)],
                       check=True, env=env, cwd=ROOT)
        offline = json.loads(offline_out.read_text())
        results.append({"mode": "offline LLM.generate", "replicas": 1,
                        "output_tokens": offline["output_tokens"], "seconds": round(offline["seconds"], 3),
                        "tokens_per_s": round(offline["output_tokens"] / offline["seconds"], 1),
                        "end_to_end_s": round(time.perf_counter() - t, 1)})

        summary = Path(tmp) / "summary.json"
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "deployments.batch_job", *passthrough, "--input", str(rows),
                        "--output", str(Path(tmp) / "out.jsonl"), "--summary", str(summary), "--address", "local",
                        "--replicas", str(args.replicas), "--replica-num-cpus", str(args.replica_num_cpus),
                        "--no-progress-bar", "--log-interval-s", "30"], check=True, env=env, cwd=ROOT)
        s = json.loads(summary.read_text())
        results.append({"mode": "batch job", "replicas": args.replicas,
                        "output_tokens": s["completion_tokens"], "seconds": s["generation_s"],
                        "tokens_per_s": s["completion_tokens_per_s"],
                        "end_to_end_s": round(time.perf_counter() - t, 1)})
    for r in results:
        assert r["output_tokens"] == expected, f"{r['mode']}: {r['output_tokens']} tokens, expected {expected}"
        r["vs_offline"] = round(r["tokens_per_s"] / results[0]["tokens_per_s"], 3)
    print_table(results)
    data = {"benchmark": "batch_throughput", "device": device_name(), "model": args.model,
            "config": {k: v for k, v in vars(args).items() if k != "offline_child"}, "results": results,
            "job_overhead": round(1 - results[1]["tokens_per_s"] / results[0]["tokens_per_s"], 3)}
    print(f"job overhead on {device_name()}: {100 * data['job_overhead']:.1f}% of the offline engine's tokens/s "
          f"({args.replicas} replica(s) against one engine)")
    write_result("batch_throughput", data, args.tag)


if __name__ == "__main__":
    main()
