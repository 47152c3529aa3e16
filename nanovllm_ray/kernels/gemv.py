"""y = x @ W^T for the 1-4 rows of a small decode step, with the layer's neighbours folded in.

A batch-1 decode step of a small model is ~40 us a layer of kernels that each sit at a few-microsecond latency
floor (profile_step.py, H200: QKV 5.4 us, o_proj 9.8 us, gate/up 5.4 us, down 4.4 + 1.7 us split-K combine, two
RMSNorms 1.4 us each, SiLU-and-mul 1.1 us), against ~7.4 us a layer of weight bytes at HBM bandwidth. Here a layer's
four projections are four launches of one kernel and nothing else runs between them:

- NORM: x is RMSNorm(a + residual) * norm_weight, computed in the prologue. Every program reads the input row
  whole (it sits in L2) for the sum of squares; program 0 writes a + residual as the new residual. That removes
  the two add + RMSNorm kernels a layer.
- SILU_MUL: W holds gate rows [0, N) and up rows [N, 2N) (gate_up_proj); a program computes both slices of its
  columns and writes silu(gate) * up, so the gate/up output never goes to memory.
- No split-K: one program a BLOCK_N slice of W's rows over all of K (fp32 FMAs, so slices as thin as 4 rows and
  256 programs even for N = 1024), so no combine kernel.
- PDL (Hopper and later, programmatic dependent launch): the kernel is launched as a dependent of the kernel before
  it and starts while that one runs; before it waits for that kernel's end (gdc_wait) it loads its first W tile
  (config gives most projections their whole slice in that one tile) or asks for the slice to be brought into L2
  (one bulk prefetch per thread), so the weight read from HBM overlaps the previous kernel. Once past its wait, a
  program lets the next kernel launch (gdc_launch_dependents): so at most one kernel ahead loads (triggered at the
  start, a chain of them filled the SMs and L2 with prefetches: 50 us a layer instead of 31). Each PDL kernel waits
  before it reads x or writes anything, so the results follow the stream's order.

Rounding follows the unfused ops (ops.add_rms_norm, ops.silu_and_mul): the residual sum is rounded to the model dtype,
so are the normalised value before the weight multiplies it, the product, the gate and up values and silu(gate).

2-4 rows (_gemv_rows_kernel): the one-row kernel's tiles where they hold a program's whole W slice (every qwen3-0.6b
projection), the slice loaded before the wait as there, then used from registers for one row after another, each
with the one-row kernel's norm, product and roundings. Timed in the step (latency.py, qwen3-0.6b, H200, 2026-12-01):
batch-2 TPOT 1.086 -> 0.843-0.846 ms, batch 4 1.214 -> 1.180-1.197, against the kernel before (K tiles of 256 with a
[slice, rows, K tile] FMA accumulator, or tl.dot over 16-32 row slices). A row costs about 1.5 us a projection after
the wait (its reductions and the layout change of x, one row after another): 8 rows took 1.91 ms against 1.20 for
the skinny GEMM with the separate norm and SiLU kernels, and all rows at once as a [slice, rows, K] product 1.96-2.39
ms, so 5 rows and up take layers/linear.py's GEMMs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nanovllm_ray.kernels import jit, pdl

DTYPES = (torch.bfloat16, torch.float16)
# Weights of this size and above stay on cuBLAS, which streams them near bandwidth: with every qwen3-8b projection
# (32-192 MiB; 16-96 MiB a rank at tp=2) on the kernel, batch-1 TPOT went from 4.88 to 5.97 ms at tp=1 and 3.42 to
# 3.67 ms at tp=2 (2 x H200, 2026-11-30). qwen3-0.6b's are 4-12 MiB. At tp=2 (gemv_bench --shape 8b-tp2 --sweep,
# H200), with LARGE_CONFIG: QKV (24 MiB) 9.9 us against cuBLAS's 11.0, o_proj (16 MiB) 5.4 against 7.1; down (48
# MiB) 14.4 against 16.3 and gate/up 29.2 against 27.1 stay on cuBLAS, as does every tp=1 projection.
MAX_WEIGHT_BYTES = 32 * 2**20
LARGE_WEIGHT_BYTES = 16 * 2**20  # and above: LARGE_CONFIG
MAX_ROWS = 4  # rows a call takes at most (more: cuBLAS / the skinny GEMM)
MAX_ROWS_WEIGHT_BYTES = 16 * 2**20  # weights of this size and above take cuBLAS at more than one row
LARGE_CONFIG = dict(BLOCK_N=4, BLOCK_K=1024, num_warps=4, num_stages=1, PREFETCH=False)  # the sweep's best for each
MAX_ONE_TILE_K = 4096  # config: a W slice of up to this many columns in one tile (8 warps: 114-128 registers)


@triton.jit
def _bulk_prefetch(ptrs, size):
    """cp.async.bulk.prefetch.L2 of size bytes (a multiple of 16; 0: none) at each of ptrs (int8, 16-byte aligned)."""
    tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.ne.s32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }",
        "=r,l,r", [ptrs, size], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _prefetch_l2(base, nbytes, NUM_THREADS: tl.constexpr):
    """Bring nbytes (a multiple of 16) from base (16-byte aligned) into L2: one bulk prefetch per thread."""
    chunk = tl.cdiv(nbytes, NUM_THREADS * 16) * 16
    offs = tl.arange(0, NUM_THREADS).to(tl.int64) * chunk
    size = tl.minimum(tl.maximum(nbytes - offs, 0), chunk).to(tl.int32)
    _bulk_prefetch(base.to(tl.pointer_type(tl.int8)) + offs, size)


@triton.jit
def prefetch_rows(w_ptr, n0, N, stride, k_lo, k_hi, BLOCK_N: tl.constexpr, ELEM_BYTES: tl.constexpr):
    """Columns [k_lo, k_hi) of W's rows [n0, n0 + BLOCK_N) below N into L2, a bulk prefetch a row: row starts and
    lengths in bytes must be multiples of 16 (kernels/skinny_gemm.py's W slice, a K split's part of it)."""
    rows = n0 + tl.arange(0, BLOCK_N)
    size = tl.where(rows < N, (k_hi - k_lo) * ELEM_BYTES, 0).to(tl.int32)
    _bulk_prefetch(w_ptr.to(tl.pointer_type(tl.int8)) + (rows.to(tl.int64) * stride + k_lo) * ELEM_BYTES, size)


@triton.jit
def _prefetch_slice(w_ptr, n0, N, K, BLOCK_N: tl.constexpr, SILU_MUL: tl.constexpr, NUM_THREADS: tl.constexpr,
                    ELEM_BYTES: tl.constexpr):
    """This program's W slice, rows [n0, n0 + BLOCK_N) (and the up rows N + n0... with SILU_MUL), into L2."""
    nbytes = tl.minimum(BLOCK_N, N - n0).to(tl.int64) * K * ELEM_BYTES
    _prefetch_l2(w_ptr + n0.to(tl.int64) * K, nbytes, NUM_THREADS)
    if SILU_MUL:
        _prefetch_l2(w_ptr + (N + n0).to(tl.int64) * K, nbytes, NUM_THREADS)


@triton.jit
def _silu_mul(gate, up, dtype: tl.constexpr):
    """silu(gate) * up from fp32 sums, rounded as ops.silu_and_mul rounds: the gate and up values, silu(gate)."""
    g = gate.to(dtype).to(tl.float32)
    s = (g / (1.0 + tl.exp(-g))).to(dtype).to(tl.float32)
    return s * up.to(dtype).to(tl.float32)


@triton.jit
def _input(x_ptr, res_ptr, nw_ptr, offs, k, kmask, mask, rstd, NORM: tl.constexpr, ADD: tl.constexpr):
    """x at offsets offs (columns k), normalised when NORM (rstd: the row's, or a column of the rows'); also returns
    a + residual (ADD), the new residual. One row: offs = k, mask = kmask; rows: offs [rows, cols], k [1, cols]."""
    dtype = x_ptr.dtype.element_ty
    h = tl.load(x_ptr + offs, mask=mask, other=0.0)
    if ADD:
        h = (h.to(tl.float32) + tl.load(res_ptr + offs, mask=mask, other=0.0).to(tl.float32)).to(dtype)
    x = h
    if NORM:
        x = _normed(h, rstd, tl.load(nw_ptr + k, mask=kmask, other=0.0), dtype)
    return x, h


@triton.jit
def _normed(h, rstd, nw, dtype: tl.constexpr):
    """RMSNorm of the row h (model dtype) from its 1 / rms and the norm weight, rounded as ops.rms_norm rounds."""
    return ((h.to(tl.float32) * rstd).to(dtype).to(tl.float32) * nw.to(tl.float32)).to(dtype)


@triton.jit
def _gemv_kernel(
    x_ptr,  # [K] (NORM with ADD: the partial sums a to add to the residual)
    res_ptr,  # [K] residual (ADD)
    nw_ptr,  # [K] RMSNorm weight (NORM)
    res_out_ptr,  # [K] a + residual, written by program 0 (ADD)
    w_ptr,  # [N, K], or [2N, K] gate | up rows (SILU_MUL); unit stride on K, rows contiguous
    out_ptr,  # [N]
    N,
    K,
    eps,
    NORM: tl.constexpr,
    ADD: tl.constexpr,
    SILU_MUL: tl.constexpr,
    PDL: tl.constexpr,  # launched as a programmatic dependent (sm90+): kernels/pdl.py
    PREFETCH: tl.constexpr,  # with PDL: bring the whole W slice into L2 before the wait
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    NUM_THREADS: tl.constexpr,
    ELEM_BYTES: tl.constexpr,
):
    pid = tl.program_id(0)
    dtype = w_ptr.dtype.element_ty
    n0 = pid * BLOCK_N
    rn = n0 + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    # W rows past N (a partial last slice) read a valid row instead; they are never stored.
    w_rows = w_ptr + (rn % N).to(tl.int64)[:, None] * K  # [BLOCK_N, 1]
    u_rows = w_ptr + (rn % N + N).to(tl.int64)[:, None] * K  # SILU_MUL: the up rows
    if PDL and PREFETCH:
        _prefetch_slice(w_ptr, n0, N, K, BLOCK_N, SILU_MUL, NUM_THREADS, ELEM_BYTES)
    # The first W tile is read before the wait: weights do not depend on the kernels before this one.
    kmask = rk < K
    w = tl.load(w_rows + rk[None, :], mask=kmask[None, :], other=0.0)
    u = w
    if SILU_MUL:
        u = tl.load(u_rows + rk[None, :], mask=kmask[None, :], other=0.0)
    if PDL:
        pdl.wait()  # then the next kernel may start, to prefetch; it waits for this one's end before it reads

    rstd = 0.0
    if NORM:  # the sum of squares of the whole row first
        ss = tl.zeros([BLOCK_K], dtype=tl.float32)
        for k in range(0, K, BLOCK_K):
            _, h = _input(x_ptr, res_ptr, nw_ptr, k + rk, k + rk, (k + rk) < K, (k + rk) < K, rstd, False, ADD)
            h = h.to(tl.float32)
            ss += h * h
        rstd = tl.rsqrt(tl.sum(ss, axis=0) / K + eps)

    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        kmask = (k + rk) < K
        x, h = _input(x_ptr, res_ptr, nw_ptr, k + rk, k + rk, kmask, kmask, rstd, NORM, ADD)
        if ADD:
            tl.store(res_out_ptr + k + rk, h, mask=kmask & (pid == 0))
        x = x.to(tl.float32)[None, :]
        acc += tl.sum(w.to(tl.float32) * x, axis=1)
        if SILU_MUL:
            acc_up += tl.sum(u.to(tl.float32) * x, axis=1)
        # the next W tile (past K: all masked, no traffic)
        kmask = (k + BLOCK_K + rk) < K
        w = tl.load(w_rows + (k + BLOCK_K + rk)[None, :], mask=kmask[None, :], other=0.0)
        if SILU_MUL:
            u = tl.load(u_rows + (k + BLOCK_K + rk)[None, :], mask=kmask[None, :], other=0.0)

    if SILU_MUL:
        acc = _silu_mul(acc, acc_up, dtype)
    tl.store(out_ptr + rn, acc.to(out_ptr.dtype.element_ty), mask=rn < N)


@triton.jit
def _gemv_rows_kernel(
    x_ptr,  # [M, K] contiguous (NORM with ADD: the partial sums a to add to the residual)
    res_ptr,  # [M, K] residual (ADD)
    nw_ptr,  # [K] RMSNorm weight (NORM)
    res_out_ptr,  # [M, K] a + residual, written by program 0 (ADD)
    w_ptr,  # [N, K], or [2N, K] gate | up rows (SILU_MUL); rows contiguous
    out_ptr,  # [M, N]
    M,
    N,
    K,
    eps,
    NORM: tl.constexpr,
    ADD: tl.constexpr,
    SILU_MUL: tl.constexpr,
    PDL: tl.constexpr,
    ROWS: tl.constexpr,  # M rounded up to a power of two: the rows loop is unrolled
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,  # >= K: the program's whole W slice is one tile
):
    """_gemv_kernel for a few rows (2-4 in the engine) with its tiles, when they hold the whole W slice: loaded before
    the programmatic wait, then used from registers for each row in turn; per row the same norm, product, reductions
    and roundings as _gemv_kernel's one tile, so every row's result equals that kernel's on the row alone."""
    pid = tl.program_id(0)
    dtype = w_ptr.dtype.element_ty
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    kmask = rk < K
    w = tl.load(w_ptr + (rn % N).to(tl.int64)[:, None] * K + rk[None, :], mask=kmask[None, :], other=0.0)
    u = w
    if SILU_MUL:
        u = tl.load(w_ptr + (rn % N + N).to(tl.int64)[:, None] * K + rk[None, :], mask=kmask[None, :], other=0.0)
    if PDL:
        pdl.wait()
    nw = tl.load(nw_ptr + rk, mask=kmask, other=0.0) if NORM else None
    for m in tl.static_range(ROWS):
        mask = kmask & (m < M)
        x, h = _input(x_ptr + m * K, res_ptr + m * K, nw_ptr, rk, rk, kmask, mask, 0.0, False, ADD)  # norm: below
        if ADD:
            tl.store(res_out_ptr + m * K + rk, h, mask=mask & (pid == 0))
        if NORM:
            hf = h.to(tl.float32)
            rstd = tl.rsqrt(tl.sum(hf * hf, axis=0) / K + eps)
            x = _normed(h, rstd, nw, dtype)
        xf = x.to(tl.float32)[None, :]
        acc = tl.sum(w.to(tl.float32) * xf, axis=1)
        if SILU_MUL:
            acc = _silu_mul(acc, tl.sum(u.to(tl.float32) * xf, axis=1), dtype)
        tl.store(out_ptr + m * N + rn, acc.to(out_ptr.dtype.element_ty), mask=(rn < N) & (m < M))


def config(N: int, K: int, silu_mul: bool = False) -> dict:
    """Tile sizes: thin W slices (4-8 rows: 256-768 programs for N = 1024-3072), each program's whole slice in one
    tile up to K = MAX_ONE_TILE_K, so that all of it is loaded before the programmatic wait and a program makes one
    pass after it. Timed in the decode step (latency.py, qwen3-0.6b batch 1, H200, 2026-12-01): o_proj, gate/up and
    down as one 8-warp tile each took TPOT from 0.753 to 0.723 ms, against the tiles benchmarks/gemv_bench.py --sweep
    found fastest for each projection alone (K tiles of 256-1024 with an L2 prefetch: 0.753). Each of the three alone
    in one tile, or any two, measured 0.746-0.883 ms: the tiles interact through the programs that wait on the SMs.
    The QKV projection keeps the sweep's tile (8 rows, its K of 1024 in one tile, 2 warps)."""
    if N * K * 2 >= LARGE_WEIGHT_BYTES and K >= 1024 and not silu_mul:
        return dict(LARGE_CONFIG)
    block_k = triton.next_power_of_2(K)
    if block_k <= MAX_ONE_TILE_K and (silu_mul or K > 1024):  # gate/up: 8-row slices, 0.722 -> 0.718 ms
        return dict(BLOCK_N=8 if silu_mul else 4, BLOCK_K=block_k, num_warps=8, num_stages=1, PREFETCH=False)
    if silu_mul:  # two W tiles at once
        return dict(BLOCK_N=4, BLOCK_K=min(256, block_k), num_warps=2, num_stages=1, PREFETCH=True)
    block_k = min(1024, block_k)
    return dict(BLOCK_N=8 if N >= 3072 else 4, BLOCK_K=block_k, num_warps=2 if K <= 1024 else 4, num_stages=1,
                PREFETCH=K > block_k)


def rows_config(N: int, K: int, silu_mul: bool = False) -> dict | None:
    """Tiles of _gemv_rows_kernel (2 to MAX_ROWS rows): config's, where it holds each program's whole W slice in one
    tile; else None (cuBLAS or the skinny GEMM take the shape)."""
    cfg = config(N, K, silu_mul)
    return cfg if cfg["BLOCK_K"] >= K else None


def supports(M: int, rows: int, K: int, dtype: torch.dtype) -> bool:
    """Shapes the kernels take: x 1 to MAX_ROWS rows of bf16/fp16, W [rows, K] with 16-byte aligned rows (the bulk
    prefetch) and under MAX_WEIGHT_BYTES (MAX_ROWS_WEIGHT_BYTES for more than one row), where they measured faster
    than cuBLAS."""
    if dtype not in DTYPES or K % 8 or rows * K * 2 < 1:
        return False
    if M == 1:
        return rows * K * 2 < MAX_WEIGHT_BYTES
    return 2 <= M <= MAX_ROWS and rows * K * 2 < MAX_ROWS_WEIGHT_BYTES and rows_config(rows, K) is not None


def gemv(
    x: torch.Tensor,  # [M, K], unit stride on K (contiguous for M > 1)
    weight: torch.Tensor,  # [N, K] contiguous, or [2N, K] with silu_mul
    *,
    residual: torch.Tensor | None = None,  # [M, K]: normalise x + residual (needs norm_weight)
    norm_weight: torch.Tensor | None = None,  # [K]: RMSNorm of the input, before the product
    eps: float = 1e-6,
    silu_mul: bool = False,
    config_override: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Returns (y, new residual). y: [M, N] x W^T, or silu(x Wg^T) * (x Wu^T) with silu_mul, where x is
    RMSNorm(x + residual) * norm_weight when norm_weight is given. The new residual is x + residual (a new tensor)
    when residual is given, else None."""
    assert x.dim() == 2 and weight.dim() == 2 and weight.is_contiguous() and x.stride(1) == 1
    M, K = x.shape
    N = weight.shape[0] // 2 if silu_mul else weight.shape[0]
    assert weight.shape[1] == K and x.dtype == weight.dtype, (x.shape, weight.shape)
    assert config_override is not None or supports(M, weight.shape[0], K, x.dtype), (x.shape, weight.shape)
    assert M == 1 or x.is_contiguous(), x.stride()
    assert residual is None or (norm_weight is not None and residual.shape == x.shape and residual.is_contiguous())
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    res_out = torch.empty_like(residual) if residual is not None else None
    use_pdl = pdl.use(x)  # and the L2 bulk prefetch: both sm90+
    args = (x, residual if residual is not None else x, norm_weight if norm_weight is not None else x,
            res_out if res_out is not None else out, weight, out)
    flags = dict(NORM=norm_weight is not None, ADD=residual is not None, SILU_MUL=silu_mul, PDL=use_pdl,
                 launch_pdl=use_pdl)
    if M == 1:
        cfg = config(N, K, silu_mul) | (config_override or {})
        jit.launch(_gemv_kernel, (triton.cdiv(N, cfg["BLOCK_N"]),))(
            *args, N, K, eps, **flags, PREFETCH=cfg["PREFETCH"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
            NUM_THREADS=32 * cfg["num_warps"], ELEM_BYTES=x.element_size(), num_warps=cfg["num_warps"],
            num_stages=cfg["num_stages"])
    else:
        cfg = (rows_config(N, K, silu_mul) or {}) | (config_override or {})
        assert cfg["BLOCK_K"] >= K, cfg
        jit.launch(_gemv_rows_kernel, (triton.cdiv(N, cfg["BLOCK_N"]),))(
            *args, M, N, K, eps, **flags, ROWS=triton.next_power_of_2(M), BLOCK_N=cfg["BLOCK_N"],
            BLOCK_K=cfg["BLOCK_K"], num_warps=cfg["num_warps"], num_stages=1)
    return out, res_out
