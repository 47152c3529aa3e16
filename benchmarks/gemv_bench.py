"""A decode layer's four projections at small batches: the fused GEMV (kernels/gemv.py) against the ops it replaces.

Each variant runs the projections of `--layers` layers (own weights, more bytes than L2 holds) back to back in one
CUDA graph, as a decode step does, and reports microseconds per layer beside the floor (a layer's weight bytes at
the measured copy bandwidth):

- unfused: the Triton add + RMSNorm (kernels/elementwise.py), cuBLAS or the skinny GEMM (layers/linear.py's
  choice), the Triton SiLU-and-mul: the engine's path for batches the fused GEMV does not take;
- gemv: the engine's choice: the fused kernel where gemv.supports the projection at the batch's rows (every
  projection at 1 row; at 2-8 rows those whose slices fit one tile), else the unfused ops; plain launches;
- gemv+pdl: the same as programmatic dependents (Hopper+), each prefetching its weights into L2 while the kernel
  before it finishes.

--rows times the layer at several batch sizes (1 takes the one-row kernel, 2-8 the rows kernel). With --sweep
M,... it also times each projection alone at M rows (`--layers` launches of it over distinct weights in one graph,
as programmatic dependents) over tile configs, beside layers/linear.py's cuBLAS or skinny GEMM, and prints the best.
--skinny M,... (5 rows and up) sweeps kernels/skinny_gemm.py's tiles for each projection inside the unfused layer:
one projection takes each tile config (or cuBLAS) while the others keep the engine's choice (skinny_gemm.TUNED), and
the layer's time over `--layers` layers picks its best. Each projection's time alone (`--layers` launches of it, as
programmatic dependents) is printed beside it but does not choose: a chain of one kernel overlaps each launch's weight
prefetch with the launch before, which the layer's short norm and SiLU kernels do not, so the alone time favoured
tiles that made the layer slower. Then the layer with every projection's best is timed beside the engine's choice and
all-cuBLAS, and entries for skinny_gemm.TUNED are printed (None: cuBLAS). The layer leaves out attention and its
kernels, and did mislead once: gate/up on cuBLAS at 8 and 16 rows made it faster (23.6 against 23.9 us) and
latency.py's steps slower (batch 16: 1.355 against 1.342 ms), so confirm a pick with latency.py before pasting it.

    python -m benchmarks.gemv_bench [--shape 0.6b|8b|8b-tp2] [--layers 28] [--rows 1,2,4,8,16] [--sweep 1,8]
                                    [--skinny 8,16,32,64,128,256]
"""

from __future__ import annotations

import argparse
import functools
import itertools
import time

import torch
import triton

from benchmarks.common import device_name, measure_bandwidth, print_table, time_cuda_graph, write_result

# hidden, q heads x head_dim, kv heads x head_dim, intermediate; "8b-tp2": one rank's slices at tensor parallel 2
SHAPES = {"0.6b": (1024, 2048, 1024, 3072), "8b": (4096, 4096, 1024, 12288), "8b-tp2": (4096, 2048, 512, 6144)}
PROJECTIONS = (("qkv_proj", "qkv"), ("o_proj", "o"), ("gate_up_proj", "gate_up"), ("down_proj", "down"))
SWEEP = [dict(BLOCK_N=n, BLOCK_K=k, num_warps=w, num_stages=1, PREFETCH=p)
         for n, k, w, p in itertools.product((4, 8, 16), (256, 512, 1024), (2, 4), (True, False))]


def rows_sweep(K: int) -> list[dict]:
    """2-8 rows (_gemv_rows_kernel): W slices of 2-16 rows, each whole in one tile, over 2-8 warps."""
    return [dict(BLOCK_N=n, BLOCK_K=triton.next_power_of_2(K), num_warps=w, num_stages=1)
            for n, w in itertools.product((2, 4, 8, 16), (2, 4, 8))]


def make_layers(hidden: int, q: int, kv: int, inter: int, layers: int, dtype: torch.dtype) -> list[dict]:
    def w(n, k):
        return (torch.randn(n, k, device="cuda") / k**0.5).to(dtype)

    return [dict(qkv=w(q + 2 * kv, hidden), o=w(hidden, q), gate_up=w(2 * inter, hidden), down=w(hidden, inter),
                 n1=torch.ones(hidden, device="cuda", dtype=dtype), n2=torch.ones(hidden, device="cuda", dtype=dtype))
            for _ in range(layers)]


# Attention's output, which o_proj reads: a step's input, not the QKV projection's (attention is not timed here).
def unfused_layer(x, residual, attn, p, ops, linear):
    h, residual = ops.add_rms_norm(x, residual, p["n1"], 1e-6)
    linear(h, p["qkv"])
    o = linear(attn, p["o"])
    h, residual = ops.add_rms_norm(o, residual, p["n2"], 1e-6)
    return linear(ops.silu_and_mul(linear(h, p["gate_up"])), p["down"]), residual


def gemv_layer(x, residual, attn, p, gemv, ops, linear):
    """The engine's choice (layers/linear.py): the fused kernel where gemv.supports the projection at x's rows,
    else the unfused ops."""
    def proj(x, w, residual=None, norm_weight=None, silu_mul=False):
        if gemv.supports(x.shape[0], w.shape[0], w.shape[1], x.dtype):
            return gemv.gemv(x, w, residual=residual, norm_weight=norm_weight, silu_mul=silu_mul)
        if norm_weight is not None:
            x, residual = ops.add_rms_norm(x, residual, norm_weight, 1e-6)
        y = linear(x, w)
        return (ops.silu_and_mul(y) if silu_mul else y), residual

    proj(x, p["qkv"], residual, p["n1"])
    o, _ = proj(attn, p["o"])
    h, residual = proj(o, p["gate_up"], residual, p["n2"], silu_mul=True)
    return proj(h, p["down"])[0], residual


def projection_calls(p: dict, hidden: int, dtype: torch.dtype, M: int = 1) -> dict:
    """Per projection: (x, weight, gemv kwargs) as the layer calls it, for M rows."""
    x = lambda k: torch.randn(M, k, device="cuda", dtype=dtype)  # noqa: E731
    residual = x(hidden)
    return {"qkv_proj": (x(hidden), "qkv", dict(residual=residual, norm_weight=p["n1"])),
            "o_proj": (x(p["o"].shape[1]), "o", {}),
            "gate_up_proj": (x(hidden), "gate_up", dict(residual=residual, norm_weight=p["n2"], silu_mul=True)),
            "down_proj": (x(p["down"].shape[1]), "down", {})}


def sweep(layers: list[dict], hidden: int, dtype: torch.dtype, gemv, linear, bandwidth: float, M: int = 1
          ) -> list[dict]:
    rows = []
    for name, (x, key, kwargs) in projection_calls(layers[0], hidden, dtype, M).items():
        weights = [p[key] for p in layers]
        floor_us = weights[0].numel() * weights[0].element_size() / bandwidth * 1e6
        base = per_call_us(linear, x, weights)
        results = []
        silu = kwargs.get("silu_mul", False)
        configs = SWEEP if M == 1 else rows_sweep(x.shape[1])
        for cfg in configs:
            try:
                us = per_call_us(functools.partial(gemv.gemv, config_override=cfg, **kwargs), x, weights)
            except Exception as e:  # a config that does not compile (registers, shared memory)
                print(f"  {name} {cfg}: {type(e).__name__}")
                continue
            results.append((us, cfg))
        results.sort(key=lambda r: r[0])
        w_rows, K = weights[0].shape
        default = (gemv.config if M == 1 else gemv.rows_config)(w_rows // (2 if silu else 1), K, silu)
        default_us = next((us for us, cfg in results if cfg == default), float("nan"))
        best_us, best = results[0]
        rows.append({"rows": M, "projection": name, "linear_us": base, "gemv_default_us": default_us,
                     "gemv_best_us": best_us, "floor_us": floor_us,
                     "best": " ".join(f"{k}={v}" for k, v in best.items())})
    return rows


def skinny_configs(M: int) -> list[dict]:
    """Tiles of kernels/skinny_gemm.py for M rows: W slices of 32-128 rows, with x's rows as tl.dot's M side or
    (SWAP_AB) the W slice, K split 1, 2 or 4 ways; 128-row x tiles (8 warps) from 128 rows."""
    block_m = min(64, max(16, triton.next_power_of_2(M)))
    shapes = [(block_m, n, k, st, 4) for n, k, st in ((32, 128, 4), (64, 128, 3), (64, 64, 4), (128, 64, 3))]
    if M >= 128:
        shapes += [(128, 64, 64, 3, 8), (128, 128, 64, 3, 8)]
    return [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=sk, num_warps=nw, num_stages=st, SWAP_AB=swap)
            for bm, bn, bk, st, nw in shapes for swap in ((False, True) if bn >= 64 and bm < 128 else (False,))
            for sk in (1, 2, 4)]


def skinny_sweep(layers: list[dict], hidden: int, dtype: torch.dtype, bandwidth: float, M: int, ops, inputs: list,
                 engine: dict) -> tuple[list[dict], dict]:
    """Each projection at M rows inside the unfused layer (inputs: layer_inputs), over skinny_configs and cuBLAS, the
    others as engine (engine_choice) has them. Returns the table rows and, per projection, (best config or None for
    cuBLAS, the layer's us with it, the layer's us with cuBLAS for that projection, the projection's us alone with it
    and with cuBLAS)."""
    from nanovllm_ray.kernels import jit, skinny_gemm

    calls = projection_calls(layers[0], hidden, dtype, M)
    t = time.perf_counter()
    with jit.compile_only(ignore_errors=True):
        for x, key, _ in calls.values():
            for cfg in skinny_configs(M):
                skinny_gemm.skinny_linear(x, layers[0][key], config=cfg)
    print(f"  M={M}: compiled {4 * len(skinny_configs(M))} skinny configs in {time.perf_counter() - t:.1f} s")
    rows, best = [], {}
    for name, (x, key, _) in calls.items():
        weights = [p[key] for p in layers]

        def in_layer(cfg, name=name):
            return time_layers(layers, functools.partial(skinny_layer, best={**engine, name: cfg}, ops=ops), *inputs)

        cublas_us = in_layer(None)
        results = []
        for cfg in skinny_configs(M):
            try:
                results.append((in_layer(cfg), cfg))
            except Exception as e:  # a config that does not compile (registers, shared memory)
                print(f"  {name} M={M} {cfg}: {type(e).__name__}")
        results.sort(key=lambda r: r[0])
        best_us, cfg = results[0]
        alone = per_call_us(functools.partial(skinny_gemm.skinny_linear, config=cfg), x, weights)
        alone_cublas = per_call_us(torch.nn.functional.linear, x, weights)
        best[name] = (cfg if best_us < cublas_us else None, best_us, cublas_us, alone, alone_cublas)
        rows.append({"rows": M, "projection": name, "layer_cublas_us": cublas_us, "layer_skinny_us": best_us,
                     "alone_cublas_us": alone_cublas, "alone_skinny_us": alone,
                     "floor_us": weights[0].numel() * weights[0].element_size() / bandwidth * 1e6,
                     "best": " ".join(f"{k}={int(v)}" for k, v in cfg.items()),
                     "top3": [(round(us, 2), c) for us, c in results[:3]]})
    return rows, best


def engine_choice(p: dict, M: int, dtype: torch.dtype) -> dict:
    """Per projection, the skinny GEMM's config where the engine takes it at M rows (skinny_gemm.TUNED), else None."""
    from nanovllm_ray.kernels import skinny_gemm

    return {name: skinny_gemm.gemm_config(M, *p[key].shape, dtype)
            if skinny_gemm.use_skinny(M, *p[key].shape, dtype) else None for name, key in PROJECTIONS}


def layer_inputs(M: int, hidden: int, q: int, dtype: torch.dtype) -> list[torch.Tensor]:
    """The layer's x, residual and attention output (o_proj's input) at M rows."""
    return [torch.randn(M, k, device="cuda", dtype=dtype) for k in (hidden, hidden, q)]


def skinny_layer(x, residual, attn, p, best, ops):
    """The unfused layer with the skinny GEMM for the projections best names a config for, cuBLAS for the others."""
    from nanovllm_ray.kernels import skinny_gemm

    def linear(x, w):
        name = next(n for n, key in PROJECTIONS if p[key] is w)
        if best.get(name) is not None:
            return skinny_gemm.skinny_linear(x, w, config=best[name])
        return torch.nn.functional.linear(x, w)

    return unfused_layer(x, residual, attn, p, ops, linear)


def time_layers(layers: list[dict], layer_fn, x, residual, attn) -> float:
    """Microseconds per layer of layer_fn run over every layer in turn, as a step does, from one CUDA graph."""
    def step():
        h, r = x, residual
        for p in layers:
            h, r = layer_fn(h, r, attn, p)
        return h

    return time_cuda_graph(step) / len(layers)


def layer_row(M: int, variant: str, us: float, floor_us: float) -> dict:
    return {"rows": M, "variant": variant, "us_per_layer": us, "floor_us": floor_us, "of_floor": floor_us / us}


def per_call_us(fn, x: torch.Tensor, weights: list[torch.Tensor]) -> float:
    """Microseconds per fn(x, w), launched over every weight in turn from one CUDA graph."""
    return time_cuda_graph(lambda: [fn(x, w) for w in weights]) / len(weights)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=SHAPES, default="0.6b")
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--rows", default="1", help="batch rows to time the layer at, comma-separated")
    ap.add_argument("--sweep", default="", help="also time other tile configs (gemv+pdl) at these rows, "
                    "comma-separated (1: _gemv_kernel's, 2-8: _gemv_rows_kernel's)")
    ap.add_argument("--skinny", default="", help="sweep the skinny GEMM's tiles at these rows (5 and up), "
                    "comma-separated, and time the layer with each projection's best beside the unfused one")
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
    cap = max(t.numel() * t.element_size() for t in layers[0].values()) + 1
    gemv.MAX_WEIGHT_BYTES = gemv.MAX_ROWS_WEIGHT_BYTES = cap  # still only one-tile slices at 2-8 rows
    layer_bytes = sum(t.numel() * t.element_size() for k, t in layers[0].items() if not k.startswith("n"))
    bandwidth = measure_bandwidth()
    floor_us = layer_bytes / bandwidth * 1e6
    rows = []
    for M in (int(m) for m in args.rows.split(",")):
        inputs = layer_inputs(M, hidden, q, dtype)
        variants = {"unfused": (functools.partial(unfused_layer, ops=ops, linear=linear_mod.linear), False),
                    "gemv": (functools.partial(gemv_layer, gemv=gemv, ops=ops, linear=linear_mod.linear), False),
                    "gemv+pdl": (functools.partial(gemv_layer, gemv=gemv, ops=ops, linear=linear_mod.linear), True)}
        for name, (fn, on) in variants.items():
            pdl.enable(on)  # read at each launch, so at capture
            rows.append(layer_row(M, name, time_layers(layers, fn, *inputs), floor_us))
        pdl.enable(True)
    print_table(rows)
    sweep_rows = []
    for M in (int(m) for m in args.sweep.split(",") if m):
        sweep_rows += sweep(layers, hidden, dtype, gemv, linear_mod.linear, bandwidth, M)
    if sweep_rows:
        print_table(sweep_rows)
    skinny_rows, skinny_best = [], {}
    for M in (int(m) for m in args.skinny.split(",") if m):
        inputs = layer_inputs(M, hidden, q, dtype)
        engine = engine_choice(layers[0], M, dtype)
        part, best = skinny_sweep(layers, hidden, dtype, bandwidth, M, ops, inputs, engine)
        skinny_rows += part
        skinny_best[M] = best
        chosen = {name: b[0] for name, b in best.items()}
        # cuBLAS twice: the run's noise
        for name, use in (("cublas", {}), ("skinny-engine", engine), ("skinny-best", chosen), ("cublas", {})):
            us = time_layers(layers, functools.partial(skinny_layer, best=use, ops=ops), *inputs)
            rows.append(layer_row(M, name, us, floor_us))
    if skinny_rows:
        print_table([{k: v for k, v in r.items() if k != "top3"} for r in skinny_rows])
        print_table([r for r in rows if r["variant"].startswith(("cublas", "skinny"))])
        print("TUNED entries (N, K) -> {M: (..., skinny_us, cublas_us) or None}, alone; picked in the layer "
              "(confirm with latency.py before pasting):")
        for name, key in PROJECTIONS:
            print(f"    {tuple(layers[0][key].shape)}: {{")
            for M, best in skinny_best.items():
                cfg, us, base, alone, alone_cublas = best[name]
                if cfg is None:
                    print(f"        {M}: None,  # cuBLAS: the layer {base:.2f} us, with the best tiles {us:.2f}")
                    continue
                fields = ", ".join(repr(cfg[f]) for f in skinny_gemm.TUNED_FIELDS)
                print(f"        {M}: ({fields}, {alone:.2f}, {alone_cublas:.2f}),  # the layer {us:.2f} us, "
                      f"{base:.2f} with cuBLAS")
            print("    },")
    print(f"{args.shape}: {layer_bytes / 2**20:.1f} MiB of weights a layer, bandwidth {bandwidth / 1e12:.2f} TB/s, "
          f"{device_name()}")
    write_result("gemv_bench", {"benchmark": "gemv_bench", "device": device_name(), "config": vars(args),
                                "bandwidth_bytes_per_s": bandwidth, "layer_bytes": layer_bytes, "rows": rows,
                                "sweep": sweep_rows, "skinny_sweep": skinny_rows,
                                "skinny_best": {str(m): b for m, b in skinny_best.items()}},
                 args.tag)


if __name__ == "__main__":
    main()
