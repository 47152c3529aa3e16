"""A decode layer's four projections at batch 1: the fused GEMV (kernels/gemv.py) against the ops it replaces.

Each variant runs the projections of `--layers` layers (own weights, more bytes than L2 holds) back to back in one
CUDA graph, as a decode step does, and reports microseconds per layer beside the floor (a layer's weight bytes at
the measured copy bandwidth):

- unfused: the Triton add + RMSNorm (kernels/elementwise.py), cuBLAS or the skinny GEMM (layers/linear.py's
  choice), the Triton SiLU-and-mul: the engine's path for batches the fused GEMV does not take;
- gemv: the fused kernel, plain launches;
- gemv+pdl: the fused kernel as programmatic dependents (Hopper+), each prefetching its weights into L2 while the
  kernel before it finishes.

With --sweep it also times each projection alone (`--layers` launches of it over distinct weights in one graph,
as programmatic dependents) over tile configs, beside layers/linear.py's cuBLAS or skinny GEMM, and prints the best.

    python -m benchmarks.gemv_bench [--shape 0.6b|8b] [--layers 28] [--sweep]
"""

from __future__ import annotations

import argparse
import functools
import itertools

import torch

from benchmarks.common import device_name, measure_bandwidth, print_table, time_cuda_graph, write_result

# hidden, q heads x head_dim, kv heads x head_dim, intermediate; "8b-tp2": one rank's slices at tensor parallel 2
SHAPES = {"0.6b": (1024, 2048, 1024, 3072), "8b": (4096, 4096, 1024, 12288), "8b-tp2": (4096, 2048, 512, 6144)}
SWEEP = [dict(BLOCK_N=n, BLOCK_K=k, num_warps=w, num_stages=1, PREFETCH=p)
         for n, k, w, p in itertools.product((4, 8, 16), (256, 512, 1024), (2, 4), (True, False))]


def make_layers(hidden: int, q: int, kv: int, inter: int, layers: int, dtype: torch.dtype) -> list[dict]:
    def w(n, k):
        return (torch.randn(n, k, device="cuda") / k**0.5).to(dtype)

    return [dict(qkv=w(q + 2 * kv, hidden), o=w(hidden, q), gate_up=w(2 * inter, hidden), down=w(hidden, inter),
                 n1=torch.ones(hidden, device="cuda", dtype=dtype), n2=torch.ones(hidden, device="cuda", dtype=dtype))
            for _ in range(layers)]


def unfused_layer(x, residual, p, ops, linear):
    h, residual = ops.add_rms_norm(x, residual, p["n1"], 1e-6)
    qkv = linear(h, p["qkv"])
    o = linear(qkv[:, : p["o"].shape[1]].contiguous(), p["o"])  # stands in for attention's output
    h, residual = ops.add_rms_norm(o, residual, p["n2"], 1e-6)
    return linear(ops.silu_and_mul(linear(h, p["gate_up"])), p["down"]), residual


def gemv_layer(x, residual, p, gemv, cfg):
    qkv, residual = gemv.gemv(x, p["qkv"], residual=residual, norm_weight=p["n1"], config_override=cfg)
    o, _ = gemv.gemv(qkv[:, : p["o"].shape[1]], p["o"], config_override=cfg)
    h, residual = gemv.gemv(o, p["gate_up"], residual=residual, norm_weight=p["n2"], silu_mul=True,
                            config_override=cfg)
    return gemv.gemv(h, p["down"], config_override=cfg)[0], residual


def projection_calls(p: dict, hidden: int, dtype: torch.dtype) -> dict:
    """Per projection: (x, weight, gemv kwargs) as the layer calls it."""
    x = lambda k: torch.randn(1, k, device="cuda", dtype=dtype)  # noqa: E731
    residual = x(hidden)
    return {"qkv_proj": (x(hidden), "qkv", dict(residual=residual, norm_weight=p["n1"])),
            "o_proj": (x(p["o"].shape[1]), "o", {}),
            "gate_up_proj": (x(hidden), "gate_up", dict(residual=residual, norm_weight=p["n2"], silu_mul=True)),
            "down_proj": (x(p["down"].shape[1]), "down", {})}


def sweep(layers: list[dict], hidden: int, dtype: torch.dtype, gemv, linear, bandwidth: float) -> list[dict]:
    rows = []
    for name, (x, key, kwargs) in projection_calls(layers[0], hidden, dtype).items():
        weights = [p[key] for p in layers]
        floor_us = weights[0].numel() * weights[0].element_size() / bandwidth * 1e6
        base = per_call_us(linear, x, weights)
        results = []
        for cfg in SWEEP:
            try:
                us = per_call_us(functools.partial(gemv.gemv, config_override=cfg, **kwargs), x, weights)
            except Exception as e:  # a config that does not compile (registers, shared memory)
                print(f"  {name} {cfg}: {type(e).__name__}")
                continue
            results.append((us, cfg))
        results.sort(key=lambda r: r[0])
        silu = kwargs.get("silu_mul", False)
        default = gemv.config(weights[0].shape[0] // (2 if silu else 1), weights[0].shape[1], silu)
        default_us = next((us for us, cfg in results if cfg == default), float("nan"))
        best_us, best = results[0]
        rows.append({"projection": name, "linear_us": base, "gemv_default_us": default_us,
                     "gemv_best_us": best_us, "floor_us": floor_us,
                     "best": " ".join(f"{k}={v}" for k, v in best.items())})
    return rows


def per_call_us(fn, x: torch.Tensor, weights: list[torch.Tensor]) -> float:
    """Microseconds per fn(x, w), launched over every weight in turn from one CUDA graph."""
    return time_cuda_graph(lambda: [fn(x, w) for w in weights]) / len(weights)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=SHAPES, default="0.6b")
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--sweep", action="store_true", help="also time other tile configs (gemv+pdl)")
    ap.add_argument("--tag", default="")
    args = ap.parse_args()

    from nanovllm_ray.kernels import gemv, pdl, skinny_gemm
    from nanovllm_ray.layers import linear as linear_mod
    from nanovllm_ray.layers import ops

    ops.enable_triton_ops(True, fused_gemv=False)  # the unfused path: element-wise kernels, cuBLAS or skinny GEMM
    assert ops.skinny_gemm is skinny_gemm
    hidden, q, kv, inter = SHAPES[args.shape]
    dtype = torch.bfloat16
    layers = make_layers(hidden, q, kv, inter, args.layers, dtype)
    # The kernel on every projection, whatever size the engine's cap (gemv.MAX_WEIGHT_BYTES) leaves to cuBLAS.
    gemv.MAX_WEIGHT_BYTES = max(t.numel() * t.element_size() for t in layers[0].values()) + 1
    layer_bytes = sum(t.numel() * t.element_size() for k, t in layers[0].items() if not k.startswith("n"))
    bandwidth = measure_bandwidth()
    floor_us = layer_bytes / bandwidth * 1e6
    x = torch.randn(1, hidden, device="cuda", dtype=dtype)
    residual = torch.randn(1, hidden, device="cuda", dtype=dtype)

    def step(layer_fn):
        h, r = x, residual
        for p in layers:
            h, r = layer_fn(h, r, p)
        return h

    variants = {"unfused": (lambda h, r, p: unfused_layer(h, r, p, ops, linear_mod.linear), False),
                "gemv": (lambda h, r, p: gemv_layer(h, r, p, gemv, None), False),
                "gemv+pdl": (lambda h, r, p: gemv_layer(h, r, p, gemv, None), True)}
    rows = []
    for name, (fn, on) in variants.items():
        pdl.enable(on)  # read at each launch, so at capture
        us = time_cuda_graph(functools.partial(step, fn)) / args.layers
        rows.append({"variant": name, "us_per_layer": us, "floor_us": floor_us, "of_floor": floor_us / us})
    pdl.enable(True)
    print_table(rows)
    sweep_rows = []
    if args.sweep:
        sweep_rows = sweep(layers, hidden, dtype, gemv, linear_mod.linear, bandwidth)
        print_table(sweep_rows)
    print(f"{args.shape}: {layer_bytes / 2**20:.1f} MiB of weights a layer, bandwidth {bandwidth / 1e12:.2f} TB/s, "
          f"{device_name()}")
    write_result("gemv_bench", {"benchmark": "gemv_bench", "device": device_name(), "config": vars(args),
                                "bandwidth_bytes_per_s": bandwidth, "layer_bytes": layer_bytes, "rows": rows,
                                "sweep": sweep_rows},
                 args.tag)


if __name__ == "__main__":
    main()
