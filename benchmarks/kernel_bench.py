"""Time the paged attention kernels on the GPU; print a table and write JSON.

    python -m benchmarks.kernel_bench                       # decode, Qwen3-0.6B/1.7B attention shape
    python -m benchmarks.kernel_bench --heads 32 --kv-heads 8 --block-size 256 --prefill
    python -m benchmarks.kernel_bench --sweep               # also try other decode tile configs
    python -m benchmarks.kernel_bench --cudagraph --chunks 0 64 1000000   # the plan's chunks, one-tile, unsplit
    python -m benchmarks.kernel_bench --plan                # the decode plan as a step runs it, 28 layers
    python -m benchmarks.kernel_bench --plan --against old_paged_attention.py   # ... against an older kernel module
    python -m benchmarks.kernel_bench --gemm                # skinny GEMM vs cuBLAS, Qwen3-0.6B decode linears
    python -m benchmarks.kernel_bench --gemm --gemm-model 8b --gemm-m 1 16 64
    python -m benchmarks.kernel_bench --gemm-cublas --gemm-m 8 64 128 256   # cuBLAS ways: W or W^T, cuBLAS or Lt
    python -m benchmarks.kernel_bench --plan --plan-chunks 256 512 768   # ... beside plans of forced chunk lengths

Decode is memory bound: GB/s = K and V bytes read / time (H100 SXM HBM3 peaks near 3,350 GB/s). --chunks times
decode_plan with each forced chunk length (0: the plan's own).
--plan times decode as a step does (a graph of --layers launches, one per layer's cache, so nothing stays in L2), the
engine's decode plan, at --plan-contexts for batches 1-256 and at lengths drawn from --mixed for batches 8-256;
--against FILE times an older copy of kernels/paged_attention.py beside it, called as the engine called it then
(split-KV chosen for --max-seq-len, default 4096, where it takes that argument); --plan-chunks the same kernels over
plans of those forced chunk lengths; --plan-batches keeps only those batch sizes.
Prefill reports causal TFLOP/s (4 * heads * head_dim per visible query-key pair).
--gemm times y = x @ W^T for each M: F.linear (cuBLAS), skinny_linear with gemm_config's choice and a sweep of tile
configs, all replayed from CUDA graphs over enough weight copies to miss L2 (as a model's layers do); GB/s = (W + x +
y bytes) / time. It prints entries in skinny_gemm.TUNED's form from each GEMM alone; the engine's table for a decode
layer's projections comes from benchmarks/gemv_bench.py --skinny, which times them inside the layer (alone, a tile
can win and still make the layer slower).
"""

import argparse
import functools
import inspect
import itertools
import json
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.testing

from benchmarks.common import load_module
from nanovllm_ray.kernels import jit, paged_attention, skinny_gemm

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def make_inputs(seq_lens, num_heads, num_kv_heads, head_dim, block_size, dtype, q_lens=None):
    blocks_per_seq = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(blocks_per_seq)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, device="cuda", dtype=dtype)
    v_cache = torch.randn(shape, device="cuda", dtype=dtype)
    ids = torch.randperm(num_blocks).tolist()  # scattered blocks, like a long-running server's cache
    block_tables = torch.zeros(len(seq_lens), max(blocks_per_seq), dtype=torch.int32)
    for i, n in enumerate(blocks_per_seq):
        block_tables[i, :n] = torch.tensor([ids.pop() for _ in range(n)])
    num_tokens = sum(q_lens) if q_lens else len(seq_lens)
    q = torch.randn(num_tokens, num_heads, head_dim, device="cuda", dtype=dtype)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device="cuda")
    return q, k_cache, v_cache, block_tables.cuda(), lens


def timer(args):
    if args.cudagraph:  # what the engine sees: no launch overhead
        return lambda fn: triton.testing.do_bench_cudagraph(fn, rep=100)
    return lambda fn: triton.testing.do_bench(fn, warmup=25, rep=100)


def bench_decode(args, dtype, decode_config=None):
    rows = []
    original = paged_attention.decode_config
    if decode_config is not None:
        paged_attention.decode_config = lambda *_: dict(decode_config)
    try:
        for context in args.contexts:
            for batch in args.batches:
                seq_lens = [context] * batch
                q, k_cache, v_cache, tables, lens = make_inputs(
                    seq_lens, args.heads, args.kv_heads, args.head_dim, args.block_size, dtype
                )
                out = torch.empty_like(q)
                kv_bytes = 2 * sum(seq_lens) * args.kv_heads * args.head_dim * q.element_size()
                for chunk in dict.fromkeys(args.chunks):
                    host = paged_attention.decode_plan(seq_lens, args.kv_heads, q.device, chunk=chunk or None)
                    fn = functools.partial(
                        paged_attention.paged_decode_attention,
                        *(q, k_cache, v_cache, tables, lens, args.head_dim**-0.5),
                        out=out,
                        plan=torch.from_numpy(host).cuda(),
                    )
                    ms = timer(args)(fn)
                    rows.append(
                        dict(
                            kernel="decode",
                            config=decode_config or "default",
                            batch=batch,
                            context=context,
                            chunk=int(host[0]),
                            chunks=int(host[1]),
                            us=ms * 1e3,
                            gb_s=kv_bytes / (ms * 1e-3) / 1e9,
                        )
                    )
    finally:
        paged_attention.decode_config = original
    return rows


def bench_plan(args, dtype) -> list[dict]:
    """Decode over --layers layers' caches in one CUDA graph, as a step runs it: the engine's plan (made on the host
    once, as a graph's launch does), and --against's module the way the engine called it (splits chosen for
    --max-seq-len where it takes that)."""
    rng = random.Random(0)
    cases = [(f"ctx{c}", [c] * b) for c in args.plan_contexts for b in (1, 2, 4, 8, 16, 64, 128, 256)]
    lo, hi = args.mixed
    mixed_batches = (8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
    cases += [(f"mixed{lo}-{hi}", [rng.randint(lo, hi) for _ in range(b)]) for b in mixed_batches]
    if args.plan_batches:
        cases = [(case, lens) for case, lens in cases if len(lens) in args.plan_batches]
    against = load_module(args.against) if args.against else None
    takes_bound = against is not None and "max_seq_len" in inspect.signature(against.paged_decode_attention).parameters
    rows = []
    for case, seq_lens in cases:
        caches = [make_inputs(seq_lens, args.heads, args.kv_heads, args.head_dim, args.block_size, dtype)
                  for _ in range(args.layers)]
        q, lens = caches[0][0], caches[0][4]
        out = torch.empty_like(q)
        kv_bytes = 2 * sum(seq_lens) * args.kv_heads * args.head_dim * q.element_size() * args.layers
        host = paged_attention.decode_plan(seq_lens, args.kv_heads, q.device)
        plan = torch.from_numpy(host).cuda()
        variants = {"plan": (paged_attention.paged_decode_attention, dict(plan=plan))}
        hosts = {"plan": host}
        if against is not None:
            variants["against"] = (against.paged_decode_attention, dict(max_seq_len=args.max_seq_len) if takes_bound
                                   else {})
        for chunk in args.plan_chunks:  # the same kernels over plans of a forced chunk length
            name = f"chunk{chunk}"
            hosts[name] = paged_attention.decode_plan(seq_lens, args.kv_heads, q.device, chunk=chunk)
            variants[name] = (paged_attention.paged_decode_attention, dict(plan=torch.from_numpy(hosts[name]).cuda()))
        for name, (fn, kwargs) in variants.items():
            calls = [
                functools.partial(fn, *(q, k_cache, v_cache, tables, lens, args.head_dim**-0.5), out=out, **kwargs)
                for _, k_cache, v_cache, tables, _ in caches
            ]
            ms = triton.testing.do_bench_cudagraph(lambda calls=calls: [call() for call in calls], rep=200)
            used = hosts.get(name, host)  # --against: the chunk figures of this tree's plan, as before
            rows.append(dict(kernel="plan", case=case, batch=len(seq_lens), variant=name, chunk=int(used[0]),
                             chunks=int(used[1]), us_per_layer=ms * 1e3 / args.layers,
                             gb_s=kv_bytes / (ms * 1e-3) / 1e9))
        del caches
        torch.cuda.empty_cache()
    return rows


def print_plan(rows: list[dict]) -> None:
    against = any(r["variant"] == "against" for r in rows)
    print(f"{'case':>14} {'batch':>5} {'plan us/layer':>13} {'GB/s':>6}", f"{'against':>9} {'GB/s':>6} {'speed-up':>8}"
          if against else "", " chunk  chunks")
    for case_batch in dict.fromkeys((r["case"], r["batch"]) for r in rows):
        new, old = (next((r for r in rows if (r["case"], r["batch"]) == case_batch and r["variant"] == v), None)
                    for v in ("plan", "against"))
        line = f"{case_batch[0]:>14} {case_batch[1]:5d} {new['us_per_layer']:13.2f} {new['gb_s']:6.0f} "
        if old is not None:
            line += f"{old['us_per_layer']:9.2f} {old['gb_s']:6.0f} {old['us_per_layer'] / new['us_per_layer']:7.2f}x "
        print(line + f" {new['chunk']:5d} {new['chunks']:6d}")
        for r in rows:
            if (r["case"], r["batch"]) == case_batch and r["variant"].startswith("chunk"):
                print(f"{'':>14} {'':>5} {r['us_per_layer']:13.2f} {r['gb_s']:6.0f}  {r['variant']:>9} "
                      f"{r['us_per_layer'] / new['us_per_layer']:6.2f}x of the plan  {r['chunk']:5d} {r['chunks']:6d}")


def bench_prefill(args, dtype, prefill_config=None):
    rows = []
    original = paged_attention.prefill_config
    if prefill_config is not None:
        paged_attention.prefill_config = lambda *_: dict(prefill_config)
    try:
        rows += _bench_prefill(args, dtype, prefill_config or "default")
    finally:
        paged_attention.prefill_config = original
    return rows


def _bench_prefill(args, dtype, config):
    rows = []
    for q_len, prefix in [(512, 0), (2048, 0), (8192, 0), (512, 4096)]:
        seq_len = prefix + q_len
        q, k_cache, v_cache, tables, lens = make_inputs(
            [seq_len], args.heads, args.kv_heads, args.head_dim, args.block_size, dtype, q_lens=[q_len]
        )
        qsl = torch.tensor([0, q_len], dtype=torch.int32, device="cuda")
        fn = functools.partial(
            paged_attention.paged_prefill_attention,
            *(q, k_cache, v_cache, qsl, lens, tables, q_len, args.head_dim**-0.5),
        )
        ms = triton.testing.do_bench(fn, warmup=25, rep=100)
        pairs = q_len * prefix + q_len * (q_len + 1) // 2  # visible (query, key) pairs
        flops = 4 * args.heads * args.head_dim * pairs
        rows.append(
            dict(
                kernel="prefill",
                config=config,
                q_len=q_len,
                prefix=prefix,
                us=ms * 1e3,
                tflop_s=flops / (ms * 1e-3) / 1e12,
            )
        )
    return rows


# ---------------------------------------------------------------------------------------------------------------------
# Skinny GEMM (--gemm)
# ---------------------------------------------------------------------------------------------------------------------

# (N, K) of a decode step's linears; weights are [N, K].
GEMM_SHAPES = {
    "0.6b": {"qkv_proj": (4096, 1024), "o_proj": (1024, 2048), "gate_up_proj": (6144, 1024), "down_proj": (1024, 3072)},
    "8b": {"qkv_proj": (6144, 4096), "o_proj": (4096, 4096), "gate_up_proj": (24576, 4096), "down_proj": (4096, 12288)},
}
GEMM_M = [1, 2, 4, 8, 16, 32, 64, 128, 256]


def gemm_sweep_configs(M: int, N: int, K: int, elem: int, sms: int) -> list[dict]:
    """Tile configs worth timing for one shape: the grid covers ~all SMs with at most one needless doubling of split-K,
    W's tile is >= 8 KB per stage, every split has >= 2 BLOCK_K steps (4 for 4 stages), the stages fit 160 KB."""
    block_ms = [max(16, triton.next_power_of_2(M))] if M <= 64 else [64, 128]
    configs = []
    for block_m, block_n, block_k, split_k, num_warps, num_stages in itertools.product(
        block_ms, (16, 32, 64, 128), (64, 128, 256), (1, 2, 4, 8), (4, 8), (3, 4)
    ):
        tiles = triton.cdiv(N, block_n) * triton.cdiv(M, block_m)
        min_split = 1  # the fewest splits that give ~a program per SM
        while min_split < 8 and 10 * tiles * min_split < 9 * sms:
            min_split *= 2
        steps = K // (split_k * block_k)
        if (
            split_k not in (min_split, 2 * min_split)
            or 10 * tiles * split_k < 9 * sms
            or block_n * block_k * elem < 8192
            or num_stages * (block_m + block_n) * block_k * elem > 160 * 1024
            or steps < 2
            or (num_stages == 4 and steps < 4)
            or (num_warps == 8 and block_m * block_n < 8192)
        ):
            continue
        # SWAP_AB only changes the code where it turns the W slice into a wgmma-sized M side and x's rows are few.
        for swap in (False, True) if block_m <= 32 and block_n >= 64 else (False,):
            configs.append(
                dict(
                    BLOCK_M=block_m,
                    BLOCK_N=block_n,
                    BLOCK_K=block_k,
                    SPLIT_K=split_k,
                    num_warps=num_warps,
                    num_stages=num_stages,
                    SWAP_AB=swap,
                )
            )
    return configs


def _config_key(config: dict) -> tuple:
    return tuple(config[f] for f in skinny_gemm.TUNED_FIELDS)


def _config_str(config: dict) -> str:
    return " ".join(f"{k.removeprefix('BLOCK_').removeprefix('num_')}={int(v)}" for k, v in config.items())


def _precompile(jobs: list[tuple[torch.Tensor, torch.Tensor, dict]]) -> None:
    """Compile every (x, weight, config) variant up front on a thread pool (Triton's async compile)."""
    t = time.perf_counter()
    try:
        with jit.compile_only(ignore_errors=True):
            for x, weight, config in jobs:
                skinny_gemm.skinny_linear(x, weight, config=config)
    except Exception as e:  # then each config compiles on first use
        print(f"parallel compile failed ({type(e).__name__}: {e}); compiling serially")
    print(f"  compiled the kernels of {len(jobs)} configs in {time.perf_counter() - t:.1f} s")


def _time_rotated(timer, linear, x: torch.Tensor, weights: torch.Tensor) -> float:
    """Microseconds per linear(x, weight), replayed over every weight copy in turn."""
    return timer(lambda: [linear(x, w) for w in weights]) * 1e3 / len(weights)


def _weight_copies(N: int, K: int, dtype: torch.dtype) -> torch.Tensor:
    """[copies, N, K] random weights: a model reads each layer's weight once per step, from HBM, so the timings rotate
    through copies that overflow L2 4x."""
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    l2_bytes = getattr(props, "L2_cache_size", 50 * 2**20)
    copies = max(1, triton.cdiv(4 * l2_bytes, N * K * torch.finfo(dtype).bits // 8))
    return torch.randn(copies, N, K, device="cuda").div_(K**0.5).to(dtype)


def _gemm_timer(args):
    return lambda fn: triton.testing.do_bench_cudagraph(fn, rep=args.gemm_rep, return_mode="median")


def bench_gemm(args, dtype) -> list[dict]:
    sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    elem = torch.finfo(dtype).bits // 8
    timer = _gemm_timer(args)
    rows = []
    for name, (N, K) in GEMM_SHAPES[args.gemm_model].items():
        weights = _weight_copies(N, K, dtype)
        print(f"{name}: N={N} K={K}, {len(weights)} weight copies of {N * K * elem / 2**20:.1f} MiB")
        xs = {M: torch.randn(M, K, device="cuda").to(dtype) for M in args.gemm_m}
        candidates = {}
        for M in args.gemm_m:
            sweep = [] if args.gemm_no_sweep else gemm_sweep_configs(M, N, K, elem, sms)
            unique = {_config_key(c): c for c in [skinny_gemm.gemm_config(M, N, K, dtype), *sweep]}
            candidates[M] = list(unique.values())
        _precompile([(xs[M], weights[0], c) for M in args.gemm_m for c in candidates[M]])

        for M in args.gemm_m:
            x = xs[M]
            expected = F.linear(x.float(), weights[0].float())
            moved = (N * K + M * K + M * N) * elem
            time_us = functools.partial(_time_rotated, timer, x=x, weights=weights)
            cublas_us = time_us(F.linear)
            timings = []
            for config in candidates[M]:
                try:
                    out = skinny_gemm.skinny_linear(x, weights[0], config=config)
                    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)
                    us = time_us(functools.partial(skinny_gemm.skinny_linear, config=config))
                except Exception as e:  # out of shared memory or registers, or a wrong result
                    print(f"  M={M} skipped {_config_str(config)}: {type(e).__name__}: {str(e)[:200]}")
                    continue
                timings.append(dict(config=config, us=us))
            if not timings:
                continue
            default_us = timings[0]["us"] if timings[0]["config"] == candidates[M][0] else float("nan")
            best = min(timings, key=lambda t: t["us"])
            rows.append(
                dict(
                    kernel="gemm",
                    shape=name,
                    N=N,
                    K=K,
                    M=M,
                    cublas_us=cublas_us,
                    default_us=default_us,
                    default_config=candidates[M][0],
                    best_us=best["us"],
                    best_config=best["config"],
                    cublas_gb_s=moved / (cublas_us * 1e-6) / 1e9,
                    best_gb_s=moved / (best["us"] * 1e-6) / 1e9,
                    sweep=timings,
                )
            )
        del weights
        torch.cuda.empty_cache()
    return rows


def print_gemm(rows: list[dict], dtype_name: str) -> None:
    for name in dict.fromkeys(r["shape"] for r in rows):
        shape_rows = [r for r in rows if r["shape"] == name]
        print(f"\n{name}  N={shape_rows[0]['N']} K={shape_rows[0]['K']}  {dtype_name}")
        head = f"{'M':>5} {'cuBLAS us':>10} {'default us':>11} {'best us':>8} {'vs cuBLAS':>9} {'best GB/s':>9}"
        print(f"{head}  best config")
        for r in shape_rows:
            print(
                f"{r['M']:5d} {r['cublas_us']:10.2f} {r['default_us']:11.2f} {r['best_us']:8.2f} "
                f"{r['cublas_us'] / r['best_us']:8.2f}x {r['best_gb_s']:9.0f}  {_config_str(r['best_config'])}"
            )
    # In skinny_gemm.TUNED's form, one M bucket per line: each GEMM alone (gemv_bench.py --skinny: in the layer).
    print(f"\n# TUNED entries ({torch.cuda.get_device_name()}, triton {triton.__version__}, {dtype_name}):")
    print(f"#   (N, K): {{M: ({', '.join(skinny_gemm.TUNED_FIELDS)}, skinny_us, cublas_us)}}")
    for (n, k), group in itertools.groupby(rows, key=lambda r: (r["N"], r["K"])):
        print(f"    ({n}, {k}): {{")
        for r in group:
            fields = ", ".join(repr(v) for v in _config_key(r["best_config"]))
            print(f"        {r['M']}: ({fields}, {r['best_us']:.2f}, {r['cublas_us']:.2f}),")
        print("    },")


def bench_gemm_cublas(args, dtype) -> list[dict]:
    """The decode linears through cuBLAS ways: F.linear on W [N, K] (the engine's), torch.mm on a W^T [K, N] copy, and
    torch.addmm adding a residual [M, N] (beta 1), each with torch's cuBLAS and with cuBLASLt as the preferred
    library; the same rotated weight copies and graphs as --gemm."""
    elem = torch.finfo(dtype).bits // 8
    timer = _gemm_timer(args)
    rows = []
    before = torch.backends.cuda.preferred_blas_library()
    try:
        for library in ("cublas", "cublaslt"):
            torch.backends.cuda.preferred_blas_library(library)
            for name, (N, K) in GEMM_SHAPES[args.gemm_model].items():
                weights = _weight_copies(N, K, dtype)
                transposed = weights.transpose(1, 2).contiguous()
                for M in args.gemm_m:
                    x = torch.randn(M, K, device="cuda").to(dtype)
                    residual = torch.randn(M, N, device="cuda").to(dtype)
                    out = torch.empty_like(residual)
                    rows.append(dict(
                        kernel="gemm_cublas", library=library, shape=name, N=N, K=K, M=M,
                        weight_floor_us=N * K * elem / args.bandwidth * 1e6,
                        linear_us=_time_rotated(timer, F.linear, x, weights),
                        mm_wt_us=_time_rotated(timer, functools.partial(torch.mm, out=out), x, transposed),
                        addmm_wt_us=_time_rotated(timer, functools.partial(torch.addmm, residual, out=out), x,
                                                  transposed),
                    ))
                del weights, transposed
                torch.cuda.empty_cache()
    finally:
        torch.backends.cuda.preferred_blas_library(before)
    return rows


def print_gemm_cublas(rows: list[dict]) -> None:
    ways = ("linear", "mm_wt", "addmm_wt")
    print(f"{'library':>9} {'M':>4}  a layer's four linears, us: " + "  ".join(f"{w:>9}" for w in ways)
          + "  weight floor")
    for library, M in dict.fromkeys((r["library"], r["M"]) for r in rows):
        layer = [r for r in rows if (r["library"], r["M"]) == (library, M)]
        sums = [sum(r[f"{w}_us"] for r in layer) for w in ways]
        print(f"{library:>9} {M:4d}  {'':28}" + "  ".join(f"{v:9.2f}" for v in sums)
              + f"  {sum(r['weight_floor_us'] for r in layer):12.2f}")


def write_json(args, rows: list[dict], stem: str) -> None:
    if args.out is None:
        gpu = "-".join(torch.cuda.get_device_name().lower().replace("nvidia", "").split())
        args.out = Path(__file__).parent / "results" / f"{stem}-{gpu}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    meta.update(
        device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__, time=time.time()
    )
    args.out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1, default=str))
    print(f"wrote {args.out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--dtype", choices=DTYPES, default="bf16")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 64, 256])
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 1024, 4096])
    parser.add_argument(
        "--chunks", type=int, nargs="+", default=[0, 10**6], help="decode chunk lengths to time; 0 = the plan's"
    )
    parser.add_argument("--cudagraph", action="store_true", help="time decode replayed from a CUDA graph")
    parser.add_argument("--plan", action="store_true", help="time the decode plan as a step runs it (28 layers)")
    parser.add_argument("--against", type=Path, help="--plan: also time this older copy of kernels/paged_attention.py")
    parser.add_argument("--max-seq-len", type=int, default=4096, help="--against's split bound, where it takes one")
    parser.add_argument("--plan-contexts", type=int, nargs="+", default=[640], help="--plan's uniform contexts")
    parser.add_argument("--mixed", type=int, nargs=2, default=[100, 2048], help="--plan's range of random lengths")
    parser.add_argument("--plan-chunks", type=int, nargs="*", default=[], help="--plan: also time these forced chunks")
    parser.add_argument("--plan-batches", type=int, nargs="*", help="--plan: only these batch sizes")
    parser.add_argument("--layers", type=int, default=28, help="--plan's layers (caches) a step")
    parser.add_argument("--prefill", action="store_true", help="also time prefill")
    parser.add_argument("--sweep", action="store_true", help="also time other decode tile configs")
    parser.add_argument("--gemm", action="store_true", help="time the skinny GEMM against cuBLAS instead")
    parser.add_argument("--gemm-model", choices=GEMM_SHAPES, default="0.6b", help="whose decode linears to time")
    parser.add_argument("--gemm-m", type=int, nargs="+", default=GEMM_M, help="batch rows to time")
    parser.add_argument("--gemm-no-sweep", action="store_true", help="time gemm_config's choice only, no sweep")
    parser.add_argument("--gemm-cublas", action="store_true", help="time cuBLAS ways of the decode linears instead")
    parser.add_argument("--bandwidth", type=float, default=4.22e12, help="--gemm-cublas: bytes/s for the weight floor")
    parser.add_argument("--gemm-rep", type=float, default=5, help="ms of replays per timing (do_bench_cudagraph)")
    parser.add_argument("--out", type=Path, help="JSON path (default: results/kernel_bench[-gemm-<model>]-<gpu>-...)")
    args = parser.parse_args()
    dtype = DTYPES[args.dtype]
    torch.manual_seed(0)

    if args.gemm_cublas:
        rows = bench_gemm_cublas(args, dtype)
        print_gemm_cublas(rows)
        write_json(args, rows, f"kernel_bench-gemm-cublas-{args.gemm_model}")
        return

    if args.gemm:
        t = time.perf_counter()
        rows = bench_gemm(args, dtype)
        print_gemm(rows, args.dtype)
        print(f"\n{time.perf_counter() - t:.0f} s")
        write_json(args, rows, f"kernel_bench-gemm-{args.gemm_model}")
        return

    if args.plan:
        rows = bench_plan(args, dtype)
        print_plan(rows)
        write_json(args, rows, "kernel_bench-plan")
        return

    rows = bench_decode(args, dtype)
    if args.sweep:
        for block_n in (32, 64, 128):
            for num_warps in (2, 4, 8):
                config = dict(BLOCK_N=block_n, num_warps=num_warps, num_stages=3)
                try:
                    rows += bench_decode(args, dtype, config)
                except Exception as e:  # e.g. out of registers / shared memory
                    print(f"skipped {config}: {type(e).__name__}: {e}")
    if args.prefill:
        rows += bench_prefill(args, dtype)
    if args.prefill and args.sweep:
        for block_m, block_n, num_warps, num_stages in [
            (64, 64, 4, 3),
            (128, 64, 8, 2),
            (128, 64, 8, 3),
            (128, 32, 4, 3),
            (64, 32, 4, 3),
            (128, 128, 8, 2),
        ]:
            config = dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages)
            try:
                rows += bench_prefill(args, dtype, config)
            except Exception as e:
                print(f"skipped {config}: {type(e).__name__}: {e}")

    print(
        f"{torch.cuda.get_device_name()}  heads {args.heads}/{args.kv_heads}  head_dim {args.head_dim}  "
        f"block_size {args.block_size}  {args.dtype}"
    )
    print(
        f"{'kernel':8} {'config':>60} {'batch':>6} {'ctx':>6} {'chunk':>7} {'chunks':>6} {'us':>9} {'GB/s':>8}"
    )
    for r in rows:
        if r["kernel"] == "decode":
            print(
                f"decode   {str(r['config']):>60} {r['batch']:6d} {r['context']:6d} {r['chunk']:7d} "
                f"{r['chunks']:6d} {r['us']:9.1f} {r['gb_s']:8.0f}"
            )
    for r in rows:
        if r["kernel"] == "prefill":
            print(
                f"prefill  {str(r['config']):>60} q_len {r['q_len']:5d} prefix {r['prefix']:5d} "
                f"{r['us']:9.1f} us {r['tflop_s']:6.1f} TFLOP/s"
            )

    write_json(args, rows, "kernel_bench")


if __name__ == "__main__":
    main()
