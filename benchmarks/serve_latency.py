"""Time to first token and time per output token through the HTTP service (Ray Serve, OpenAI streaming API)
against the same engine driven directly in this process: the difference is what serving costs per request.

    python benchmarks/serve_latency.py                                   # tiny demo model (CPU works)
    python benchmarks/serve_latency.py --shape qwen3-0.6b --batch-sizes 1,8 --prompt-len 512 --output-len 128
    python benchmarks/serve_latency.py --model /path/to/Qwen3-8B --tp 2

Each batch sends `batch` requests at once (random token-id prompts, greedy, ignore_eos) and reports the mean
over requests, median over --repeats. HTTP TTFT runs from sending the request to the first streamed chunk; time
per output token is (last chunk - first chunk) / (completion tokens - 1). The engine alone (LLMEngine.step() in
a loop, detokenizing as the service does) runs first and is shut down before the service starts.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import statistics
import time
from pathlib import Path
from random import Random

from benchmarks.common import (
    demo_checkpoint,
    device_name,
    print_table,
    write_result,
)
from benchmarks.http_client import stream_completion
from benchmarks.latency import run_batch


async def http_one(client, url: str, prompt: list[int], output_len: int) -> tuple[float, float]:
    body = {"prompt": prompt, "max_tokens": output_len, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.monotonic()
    first = last = None
    tokens = 0
    async for now, chunk in stream_completion(client, url, body):
        if chunk["choices"]:
            first = first or now
            last = now
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
    assert tokens == output_len and first is not None, (tokens, output_len)
    return first - start, (last - first) / (tokens - 1)


async def http_batch(client, url: str, batch: int, prompt_len: int, output_len: int,
                     rng: Random) -> tuple[float, float]:
    prompts = [[rng.randrange(0, 150000) for _ in range(prompt_len)] for _ in range(batch)]
    res = await asyncio.gather(*(http_one(client, url, p, output_len) for p in prompts))
    return statistics.mean(r[0] for r in res), statistics.mean(r[1] for r in res)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="Hugging Face Qwen3 directory (default: the --shape demo)")
    ap.add_argument("--shape", default="tiny", help="demo checkpoint shape when --model is not given")
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tp", type=int, default=1, help="tensor_parallel_size (ranks as Ray actors when > 1)")
    ap.add_argument("--dispatch", default="auto", choices=["auto", "compiled", "remote"])
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.8)
    ap.add_argument("--port", type=int, default=8123)
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import httpx
    import ray
    import torch
    from ray import serve

    from deployments.app import build_app
    from nanovllm_ray import Config, LLMEngine

    path = str(Path(demo_checkpoint(args.shape, args.model)).resolve())
    batches = [int(b) for b in args.batch_sizes.split(",")]
    engine_kwargs = dict(tensor_parallel_size=args.tp, max_model_len=args.max_model_len,
                         gpu_memory_utilization=args.gpu_memory_utilization, dispatch=args.dispatch,
                         max_num_seqs=max(64, max(batches)))
    if not torch.cuda.is_available():
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))  # leave a core for Ray on small machines
    ray.init(include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    rows: dict[int, dict] = {b: {"batch": b} for b in batches}

    # -- the engine alone, in this process (ranks as Ray actors when tp > 1)
    engine = LLMEngine(Config.from_kwargs(path, **engine_kwargs))
    rng = Random(0)
    run_batch(engine, 2, args.prompt_len, 8, rng, detokenize=True)  # warm-up
    for b in batches:
        res = [run_batch(engine, b, args.prompt_len, args.output_len, rng, detokenize=True)
               for _ in range(args.repeats)]
        rows[b]["engine_ttft_ms"] = statistics.median(r[0] for r in res) * 1e3
        rows[b]["engine_tpot_ms"] = statistics.median(r[1] for r in res) * 1e3
    engine.shutdown()
    del engine
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

    # -- the same engine behind the HTTP service
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    app_args = dict(model=path, served_model_name="bench", max_ongoing_requests=1024, max_queued_requests=-1,
                    replica_num_cpus=0, **engine_kwargs)
    t = time.perf_counter()
    serve.run(build_app(app_args), name="bench", route_prefix="/")
    print(f"service up in {time.perf_counter() - t:.1f} s")
    url = f"http://127.0.0.1:{args.port}/v1/completions"

    async def measure() -> None:
        limits = httpx.Limits(max_connections=max(batches) + 8)
        async with httpx.AsyncClient(timeout=600, limits=limits) as client:
            await http_batch(client, url, 2, args.prompt_len, 8, rng)  # warm-up
            for b in batches:
                res = [await http_batch(client, url, b, args.prompt_len, args.output_len, rng)
                       for _ in range(args.repeats)]
                rows[b]["http_ttft_ms"] = statistics.median(r[0] for r in res) * 1e3
                rows[b]["http_tpot_ms"] = statistics.median(r[1] for r in res) * 1e3

    asyncio.run(measure())
    serve.shutdown()
    ray.shutdown()

    table = []
    for b in batches:
        r = rows[b]
        table.append({"batch": b, "engine_ttft_ms": r["engine_ttft_ms"], "http_ttft_ms": r["http_ttft_ms"],
                      "ttft_overhead_ms": r["http_ttft_ms"] - r["engine_ttft_ms"],
                      "engine_tpot_ms": r["engine_tpot_ms"], "http_tpot_ms": r["http_tpot_ms"],
                      "tpot_overhead_ms": r["http_tpot_ms"] - r["engine_tpot_ms"]})
    print(f"\n{Path(path).name}, tp={args.tp}, prompt {args.prompt_len}, output {args.output_len}, "
          f"on {device_name()}")
    print_table(table)
    data = {"benchmark": "serve_latency", "device": device_name(), "model": path, "config": vars(args),
            "rows": table}
    write_result("serve_latency", data, args.tag)


if __name__ == "__main__":
    main()
