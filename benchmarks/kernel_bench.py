"""Time the paged attention kernels on the GPU; print a table and write JSON.

    python -m benchmarks.kernel_bench                       # decode, Qwen3-0.6B/1.7B attention shape
    python -m benchmarks.kernel_bench --heads 32 --kv-heads 8 --block-size 256 --prefill
    python -m benchmarks.kernel_bench --sweep               # also try other decode tile configs

Decode is memory bound: GB/s = K and V bytes read / time (H100 SXM HBM3 peaks near 3,350 GB/s).
Prefill reports causal TFLOP/s (4 * heads * head_dim per visible query-key pair).
"""

import argparse
import functools
import json
import time
from pathlib import Path

import torch
import triton
import triton.testing

from nanovllm_ray.kernels import paged_attention

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
                for splits in args.splits:
                    fn = functools.partial(
                        paged_attention.paged_decode_attention,
                        *(q, k_cache, v_cache, tables, lens, args.head_dim**-0.5),
                        out=out,
                        num_splits=splits or None,
                        max_seq_len=context,
                    )
                    ms = timer(args)(fn)
                    chosen = paged_attention.choose_num_splits(batch, args.kv_heads, context, q.device)
                    rows.append(
                        dict(
                            kernel="decode",
                            config=decode_config or "default",
                            batch=batch,
                            context=context,
                            num_splits=splits or chosen,
                            us=ms * 1e3,
                            gb_s=kv_bytes / (ms * 1e-3) / 1e9,
                        )
                    )
    finally:
        paged_attention.decode_config = original
    return rows


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--dtype", choices=DTYPES, default="bf16")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64, 256])
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 1024])
    parser.add_argument(
        "--splits", type=int, nargs="+", default=[0, 1], help="decode split-KV counts to time; 0 = automatic"
    )
    parser.add_argument("--cudagraph", action="store_true", help="time decode replayed from a CUDA graph")
    parser.add_argument("--prefill", action="store_true", help="also time prefill")
    parser.add_argument("--sweep", action="store_true", help="also time other decode tile configs")
    parser.add_argument("--out", type=Path, help="JSON path (default: results/kernel_bench-<gpu>-<time>.json)")
    args = parser.parse_args()
    dtype = DTYPES[args.dtype]
    torch.manual_seed(0)

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
    print(f"{'kernel':8} {'config':>60} {'batch':>6} {'ctx':>6} {'splits':>6} {'us':>9} {'GB/s':>8}")
    for r in rows:
        if r["kernel"] == "decode":
            print(
                f"decode   {str(r['config']):>60} {r['batch']:6d} {r['context']:6d} {r['num_splits']:6d} "
                f"{r['us']:9.1f} {r['gb_s']:8.0f}"
            )
    for r in rows:
        if r["kernel"] == "prefill":
            print(
                f"prefill  {str(r['config']):>60} q_len {r['q_len']:5d} prefix {r['prefix']:5d} "
                f"{r['us']:9.1f} us {r['tflop_s']:6.1f} TFLOP/s"
            )

    if args.out is None:
        gpu = "-".join(torch.cuda.get_device_name().lower().replace("nvidia", "").split())
        args.out = Path(__file__).parent / "results" / f"kernel_bench-{gpu}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    meta.update(
        device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__, time=time.time()
    )
    args.out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1, default=str))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
