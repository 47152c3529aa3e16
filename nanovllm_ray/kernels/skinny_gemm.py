"""y = x @ W^T for decode-sized batches: a GEMM that streams the weight at HBM bandwidth when M is small.

With M <= a few hundred rows the linears of a decode step are bound by reading W once ([N, K], bf16), yet cuBLAS
picks tiles that leave much of an H100 idle for these shapes (1.2-1.4 TB/s of 3.0). Here each program owns a BLOCK_N
slice of W's rows and one BLOCK_M tile of x's rows and walks K in BLOCK_K steps with tl.dot (fp32 accumulation).
The grid is (M tiles) x (K splits) x (N slices), M tiles fastest, so the programs that share a W slice run side by
side and the slice comes from HBM once, then from L2. When N / BLOCK_N gives too few programs for the SMs (N = 1024 on
132 SMs), split-K cuts K into SPLIT_K ranges:

    split-K combine: every split writes its fp32 partial sums to a workspace [SPLIT_K, M, N] (torch.empty from the
    caching allocator, fine under CUDA-graph capture) and a small second kernel adds them in split order, adds the
    bias and casts. Deterministic, unlike fp32 atomics, and no cheaper: atomics would need a zeroed buffer (a memset)
    and a cast kernel for a bf16 output all the same.

On Hopper both kernels launch as programmatic dependents (kernels/pdl.py): a GEMM program asks for its W slice (its
split's columns of it) to be brought into L2 before it waits for the kernel before it, so the weight read overlaps
that kernel, as the decode GEMV does (kernels/gemv.py). That is what makes it faster than cuBLAS at 5-32 rows on an
H200; at 33-64 rows only o_proj's shape (N = 1024, K split 4 ways) is faster, and from 65 rows none.

Tile sizes come from `gemm_config`: measured entries of TUNED (benchmarks/gemv_bench.py --skinny and
benchmarks/kernel_bench.py --gemm print them ready to paste) and a heuristic for shapes not in it. `use_skinny` says
where the kernel is worth calling instead of cuBLAS.
Everything is CUDA-graph friendly: no host syncs; grid and workspace depend on shapes only.
"""

import functools

import torch
import triton
import triton.language as tl

from nanovllm_ray.kernels import jit, pdl
from nanovllm_ray.kernels.gemv import prefetch_rows

# Measured on an H200 with `python -m benchmarks.gemv_bench --skinny 8,16,32,64,128,256` (each projection launched
# over 28 layers' weights from one CUDA graph, as programmatic dependents, against cuBLAS), for qwen3-0.6b's
# projections, keeping the kernel only at the batch sizes where a layer of them (the norm and SiLU-and-mul kernels
# between) was faster with it. (N, K) -> {M bucket: (BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages,
# SWAP_AB, skinny_us, cublas_us) or None}, the us of the projection alone. An M uses the entry of the smallest bucket
# >= M; None, a slower entry or an M past the largest bucket take cuBLAS. 1-4 rows are the GEMV's (kernels/gemv.py),
# or cuBLAS where it does not take them. At 33-64 rows only o_proj takes the kernel: one projection at a time inside
# the layer, the others on cuBLAS (gemv_bench.py --skinny, gemv_bench-layerpick-NVIDIA_H200-20261201-104713.json),
# it alone made the layer faster there and up to 128 rows, and latency.py confirmed it at 48 and 64 rows (0.4-0.6%)
# but not at 96 (even) or 128 (0.6% slower) (README, "Tiles picked inside the layer").
TUNED: dict[tuple[int, int], dict[int, tuple | None]] = {
    (4096, 1024): {
        4: None,
        8: (16, 64, 128, 1, 4, 3, True, 4.26, 5.24),
        16: (16, 64, 128, 1, 4, 3, True, 4.29, 5.3),
        32: (32, 64, 128, 1, 4, 3, True, 4.47, 5.32),
    },
    (1024, 2048): {
        4: None,
        8: (16, 64, 64, 4, 4, 4, True, 4.28, 5.89),
        16: (16, 64, 128, 4, 4, 3, True, 4.34, 5.92),
        32: (32, 64, 64, 4, 4, 4, True, 4.53, 5.92),
        48: (64, 64, 64, 4, 4, 4, True, 4.89, 5.97),
        64: (64, 64, 64, 4, 4, 4, False, 4.98, 5.87),
    },
    (6144, 1024): {
        4: None,
        8: (16, 64, 128, 1, 4, 3, True, 5.48, 6.08),
        16: (16, 64, 128, 1, 4, 3, True, 5.54, 6.16),
        32: (32, 64, 128, 1, 4, 3, True, 5.77, 6.25),
    },
    (1024, 3072): {
        4: None,
        8: (16, 64, 128, 4, 4, 3, True, 5.2, 6.71),
        16: (16, 64, 128, 4, 4, 3, True, 5.28, 6.94),
        32: (32, 64, 128, 4, 4, 3, True, 5.49, 7.0),
    },
}
TUNED_FIELDS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "SPLIT_K", "num_warps", "num_stages", "SWAP_AB")
CONFIG_KEYS = frozenset(TUNED_FIELDS)
# Shapes not in TUNED: use the kernel up to this many rows (bf16/fp16).
DEFAULT_MAX_M = 0  # unmeasured shapes stay on cuBLAS
MAX_BLOCK_M = 64  # heuristic cap; larger M loops over M tiles (as extra programs)


# ---------------------------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------------------------


# M and split_k are not specialised on (== 1, multiple of 16): one compiled kernel serves every batch size of a bucket.
@triton.jit(do_not_specialize=["M", "split_k"])
def _skinny_gemm_kernel(
    x_ptr,  # [M, K], unit stride on K
    w_ptr,  # [N, K], unit stride on K
    bias_ptr,  # [N]; unused unless HAS_BIAS
    out_ptr,  # [M, N] contiguous; written unless SPLIT
    part_ptr,  # [split_k, M, N] fp32 partial sums; written if SPLIT
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    split_k,  # runtime, so that every split count shares one compiled kernel
    k_per_split,  # K range of one split, a multiple of BLOCK_K
    HAS_BIAS: tl.constexpr,
    SPLIT: tl.constexpr,
    EVEN_K: tl.constexpr,  # K % BLOCK_K == 0: no K masks
    # Compute (W x^T)^T instead of x W^T: the W slice becomes tl.dot's M side (>= 64 lets Hopper use wgmma, whose
    # M must be a multiple of 64) and the few x rows its N side. Same bytes read; which is faster is measured.
    SWAP_AB: tl.constexpr,
    PDL: tl.constexpr,  # launched as a programmatic dependent: the W slice goes to L2 before the wait
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    ELEM_BYTES: tl.constexpr,
):
    pid = tl.program_id(0)
    num_m_tiles = tl.cdiv(M, BLOCK_M)
    pid_m = pid % num_m_tiles
    pid_k = (pid // num_m_tiles) % split_k
    pid_n = pid // (num_m_tiles * split_k)

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    # x rows past M (BLOCK_M is at least 16 for tl.dot) are masked: they cost no memory traffic and give zeros. W rows
    # past N (a partial last slice) read a valid row instead, so that W's loads carry no mask; they are never stored.
    m_mask = rm < M
    x_rows = rm.to(tl.int64) * stride_xm  # [BLOCK_M]
    w_rows = (rn % N).to(tl.int64) * stride_wn  # [BLOCK_N]
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    if PDL:
        if pid_m == 0:  # the slice is the same for every M tile: one program asks for it
            prefetch_rows(w_ptr, pid_n * BLOCK_N, N, stride_wn, k_lo, k_hi, BLOCK_N, ELEM_BYTES)
        pdl.wait()  # and the next kernel may launch (letting it launch after the stores instead was slower)
    x_ptrs = x_ptr + x_rows[:, None] + (k_lo + rk)[None, :]  # [BLOCK_M, BLOCK_K]
    w_ptrs = w_ptr + w_rows[:, None] + (k_lo + rk)[None, :]  # [BLOCK_N, BLOCK_K]

    if SWAP_AB:
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(k_lo, k_hi, BLOCK_K):
        if EVEN_K:
            x = tl.load(x_ptrs, mask=m_mask[:, None], other=0.0)
            w = tl.load(w_ptrs)
        else:
            k_mask = (k + rk) < K
            x = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_mask[None, :], other=0.0)
        if SWAP_AB:
            acc = tl.dot(w, tl.trans(x), acc, input_precision=DOT_PRECISION)  # [BLOCK_N, BLOCK_M]
        else:
            acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N]
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if SWAP_AB:
        acc = tl.trans(acc)  # [BLOCK_M, BLOCK_N]

    mask = m_mask[:, None] & (rn < N)[None, :]
    offs = rm.to(tl.int64)[:, None] * N + rn[None, :]  # [BLOCK_M, BLOCK_N] into a contiguous [M, N]
    if SPLIT:
        tl.store(part_ptr + pid_k.to(tl.int64) * M * N + offs, acc, mask=mask)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _split_k_reduce_kernel(
    part_ptr,  # [split_k, M, N] fp32
    bias_ptr,  # [N]; unused unless HAS_BIAS
    out_ptr,  # [M, N] contiguous
    MN,  # M * N
    N,
    split_k,
    HAS_BIAS: tl.constexpr,
    PDL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    if PDL:
        pdl.wait()
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    part_ptrs = part_ptr + offs
    for _ in range(split_k):  # fixed order: bitwise reproducible
        acc += tl.load(part_ptrs, mask=mask, other=0.0)
        part_ptrs += MN
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------------------------------


@functools.cache
def _sm_count(device_index: int | None) -> int:
    if device_index is None:
        return 132  # no GPU (the interpreter): pretend to be an H100 so choices match
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_sms() -> int:
    return _sm_count(torch.cuda.current_device() if torch.cuda.is_available() else None)


def _tuned_entry(M: int, N: int, K: int) -> tuple | None:
    buckets = TUNED.get((N, K))
    if not buckets:
        return None
    fits = [b for b in buckets if b >= M]
    return buckets[min(fits)] if fits else None


def heuristic_config(M: int, N: int, K: int, dtype: torch.dtype = torch.bfloat16, sms: int | None = None) -> dict:
    """Tile sizes for a shape TUNED lacks: enough programs to cover every SM, each streaming whole BLOCK_K rows."""
    sms = sms or num_sms()
    block_m = min(max(16, triton.next_power_of_2(M)), MAX_BLOCK_M)
    m_tiles = triton.cdiv(M, block_m)
    if dtype == torch.float32:
        block_k = 64  # "ieee" fp32 dots are FMA loops: keep the tiles small
    else:
        block_k = 256 if block_m <= 16 else 128  # x's tile shares shared memory with W's
    block_k = min(block_k, max(16, triton.next_power_of_2(K)))
    # Narrower W slices first (down to 16 rows), then split K, until the programs cover ~all SMs (128 programs on
    # 132 SMs is close enough); every split keeps at least two BLOCK_K steps so that its loads still overlap.
    few = lambda programs: 10 * programs < 9 * sms
    block_n = 64
    while block_n > 16 and few(triton.cdiv(N, block_n) * m_tiles):
        block_n //= 2
    split_k = 1
    while few(triton.cdiv(N, block_n) * m_tiles * split_k) and K // (2 * split_k) >= 2 * block_k:
        split_k *= 2
    # As many stages in flight as fit 128 KB of shared memory (x's and W's tiles), 2 to 4.
    stage_bytes = (block_m + block_n) * block_k * (4 if dtype == torch.float32 else 2)
    num_stages = max(2, min(4, 128 * 1024 // stage_bytes))
    return dict(
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        SPLIT_K=split_k,
        num_warps=4,
        num_stages=num_stages,
        SWAP_AB=False,
    )


def gemm_config(M: int, N: int, K: int, dtype: torch.dtype = torch.bfloat16) -> dict:
    """Tile sizes and launch options of _skinny_gemm_kernel: TUNED where measured, else heuristic_config."""
    entry = _tuned_entry(M, N, K) if dtype in (torch.bfloat16, torch.float16) else None
    if entry is None:
        return heuristic_config(M, N, K, dtype)
    return dict(zip(TUNED_FIELDS, entry[: len(TUNED_FIELDS)], strict=True))


def use_skinny(M: int, N: int, K: int, dtype: torch.dtype) -> bool:
    """Whether skinny_linear beats cuBLAS here: as measured for shapes in TUNED, else bf16/fp16 up to DEFAULT_MAX_M."""
    if dtype not in (torch.bfloat16, torch.float16) or M < 1:
        return False
    if (N, K) in TUNED:
        entry = _tuned_entry(M, N, K)
        return entry is not None and entry[-2] < entry[-1]
    return M <= DEFAULT_MAX_M


# ---------------------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------------------


def skinny_linear(
    x: torch.Tensor,  # [M, K], unit stride on K
    weight: torch.Tensor,  # [N, K], unit stride on K
    bias: torch.Tensor | None = None,  # [N]
    *,
    config: dict | None = None,  # overrides gemm_config's keys (BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, num_warps, ...)
) -> torch.Tensor:
    """F.linear(x, weight, bias) with fp32 accumulation; returns a new contiguous [M, N] tensor of x.dtype."""
    assert x.dim() == 2 and weight.dim() == 2, (x.shape, weight.shape)
    M, K = x.shape
    N = weight.shape[0]
    assert weight.shape[1] == K and K > 0, (x.shape, weight.shape)
    assert x.dtype == weight.dtype, (x.dtype, weight.dtype)
    assert x.stride(1) == 1 and weight.stride(1) == 1, "K must be the innermost, unit-stride dimension"
    if bias is not None:
        assert bias.shape == (N,) and bias.stride(0) == 1, (bias.shape, N)
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return out

    cfg = gemm_config(M, N, K, x.dtype)
    if config:
        unknown = set(config) - CONFIG_KEYS
        assert not unknown, f"unknown config keys {sorted(unknown)}; expected some of {sorted(CONFIG_KEYS)}"
        cfg.update(config)
    block_m, block_n, block_k = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    for name in ("BLOCK_M", "BLOCK_N", "BLOCK_K"):
        assert cfg[name] >= 16 and cfg[name] & (cfg[name] - 1) == 0, f"{name} must be a power of two >= 16: {cfg}"
    # Splits cover whole BLOCK_K steps; drop the ones that would be left empty.
    k_per_split = triton.cdiv(triton.cdiv(K, max(cfg["SPLIT_K"], 1)), block_k) * block_k
    split_k = triton.cdiv(K, k_per_split)
    # Programmatic dependent launch, with the W slice's L2 prefetch: 16-byte aligned rows (sm90+, half precision).
    use_pdl = pdl.use(x) and K % 8 == 0 and weight.stride(0) % 8 == 0 and x.element_size() == 2

    part = out if split_k == 1 else torch.empty((split_k, M, N), dtype=torch.float32, device=x.device)
    has_bias = bias is not None
    grid = (triton.cdiv(M, block_m) * split_k * triton.cdiv(N, block_n),)

    jit.launch(_skinny_gemm_kernel, grid)(
        x,
        weight,
        bias if has_bias else out,
        out,
        part,
        M,
        N,
        K,
        x.stride(0),
        weight.stride(0),
        split_k,
        k_per_split,
        HAS_BIAS=has_bias,
        SPLIT=split_k > 1,
        EVEN_K=K % block_k == 0,
        SWAP_AB=bool(cfg["SWAP_AB"]),
        PDL=use_pdl,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",  # bf16/fp16 ignore it
        ELEM_BYTES=x.element_size(),
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
        launch_pdl=use_pdl,
    )
    if split_k > 1:
        block = 1024
        jit.launch(_split_k_reduce_kernel, (triton.cdiv(M * N, block),))(
            part,
            bias if has_bias else out,
            out,
            M * N,
            N,
            split_k,
            HAS_BIAS=has_bias,
            PDL=use_pdl,
            BLOCK=block,
            num_warps=4,
            launch_pdl=use_pdl,
        )
    return out
