"""Shared by the benchmarks: the demo checkpoint, the card's measured bandwidth and FLOP rate, JSON results,
percentiles, and each LLMServer replica's answer to a method (the streaming HTTP client is http_client.py)."""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def demo_checkpoint(shape: str, model: str | None) -> str:
    """The checkpoint to benchmark: `model` if given, else the demo checkpoint of `shape` (made if absent)."""
    if model:
        return model
    from nanovllm_ray.demo_model import ensure_demo_checkpoint

    root = Path(os.environ.get("NANOVLLM_CHECKPOINTS", "checkpoints"))
    return str(ensure_demo_checkpoint(root / f"qwen3-{shape.removeprefix('qwen3-')}", shape))


def load_module(path: str | Path):
    """An older copy of one of the project's modules (e.g. `git show REV:nanovllm_ray/kernels/sampling.py >
    /tmp/old.py`), imported beside this tree's, to time against it."""
    path = Path(path)
    spec = importlib.util.spec_from_file_location(f"against_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def measure_bandwidth(nbytes: int = 2 * 2**30, iters: int = 20) -> float:
    """Device-to-device copy bandwidth in bytes/s (bytes read + bytes written), median of `iters`."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    times = []
    for _ in range(iters + 3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    times = sorted(times[3:])
    return 2 * nbytes / times[len(times) // 2]


def measure_matmul_flops(n: int = 8192, iters: int = 10) -> float:
    a = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * iters / (time.perf_counter() - t)


def model_shape(path: str) -> dict:
    cfg = json.loads((Path(path) / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    h, inter, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    per_layer = h * (heads + 2 * kv) * head_dim + heads * head_dim * h + 3 * h * inter + 2 * h + 2 * head_dim
    embed = cfg["vocab_size"] * h
    params = layers * per_layer + h + embed * (1 if cfg.get("tie_word_embeddings") else 2)
    return {"params": params, "layers": layers, "kv_heads": kv, "head_dim": head_dim,
            "kv_bytes_per_token": 2 * layers * kv * head_dim * 2, "weight_bytes": params * 2,
            "flops_per_token": 2 * (params - embed)}  # the LM head runs on sampled rows only


def add_kernel_flags(ap) -> None:
    """The switches that turn the batch-1 decode fusions off, to measure each one (latency.py, profile_step.py)."""
    ap.add_argument("--no-fused-gemv", action="store_true", help="decode projections as before kernels/gemv.py")
    ap.add_argument("--no-pdl", action="store_true", help="decode kernels without programmatic dependent launch")
    ap.add_argument("--gemv-max-rows", type=int, default=None,
                    help="decode batches of up to this many rows take kernels/gemv.py (1: one row only)")


def apply_kernel_flags(args) -> dict:
    """Apply add_kernel_flags' switches to this process (the engine must run in it); returns LLM(...) kwargs."""
    if args.no_pdl:
        from nanovllm_ray.kernels import pdl

        pdl.enable(False)
    if args.gemv_max_rows is not None:
        from nanovllm_ray.kernels import gemv

        gemv.MAX_ROWS = args.gemv_max_rows
    return {"fused_gemv": not args.no_fused_gemv}


def percentile(xs: list[float], q: float) -> float:
    """The q-quantile of xs (nearest rank); NaN for none."""
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def per_replica(app: str, method: str, *args) -> dict[str, dict]:
    """An LLMServer method's answer from every replica, by replica (each call lands on one: ask until all have
    answered). The method's answer names its replica (`"replica"`)."""
    from ray import serve

    handle = serve.get_deployment_handle("LLMServer", app_name=app)
    n_replicas = sum(serve.status().applications[app].deployments["LLMServer"].replica_states.values()) or 1
    seen: dict[str, dict] = {}
    for _ in range(200):
        res = getattr(handle, method).remote(*args).result(timeout_s=60)
        seen[res["replica"]] = res
        if len(seen) >= n_replicas:
            return seen
    raise RuntimeError(f"only {len(seen)} of {n_replicas} replicas of {app} answered {method}")


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu-{platform.machine()}"


def write_result(name: str, data: dict, tag: str = "") -> Path:
    """Write a benchmark's JSON to results/<name>[-<tag>]-<card>-<time>.json and say where."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    card = device_name().replace(" ", "_").replace("/", "_")
    path = RESULTS / f"{name}{f'-{tag}' if tag else ''}-{card}-{stamp}.json"
    path.write_text(json.dumps(data, indent=2))
    print("wrote", path)
    return path


def save_figure(fig, path: Path) -> None:
    """A benchmark's plot, laid out and written next to its JSON."""
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print("wrote", path)


def print_table(rows: list[dict]) -> None:
    if not rows:
        return
    keys = list(rows[0])
    widths = [max(len(k), *(len(_fmt(r[k])) for r in rows)) for k in keys]
    print("  ".join(k.rjust(w) for k, w in zip(keys, widths)))
    for r in rows:
        print("  ".join(_fmt(r[k]).rjust(w) for k, w in zip(keys, widths)))


def _fmt(v) -> str:
    return f"{v:,.3f}" if isinstance(v, float) else f"{v:,}" if isinstance(v, int) else str(v)


def time_cuda_graph(fn, calls: int = 1, iters: int = 20, before_timing=None) -> float:
    """Microseconds per call of fn: a warm-up call, then `calls` of them captured in one CUDA graph, replayed once
    to warm up and `iters` times timed. before_timing (e.g. a barrier of the ranks) runs just before the timed part."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    if before_timing is not None:
        before_timing()
        torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        graph.replay()
    end.record()
    end.synchronize()
    del graph
    return start.elapsed_time(end) * 1e3 / (iters * calls)
