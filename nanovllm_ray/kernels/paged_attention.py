"""Attention over the paged KV cache: decode (one query token per sequence) and prefill (chunked, cached prefix).

Both kernels read K/V straight from the cache through the block table (no gather copy), pack the query heads of a
GQA group into one program so every K/V tile is loaded once per kv head, and run an fp32 online softmax (base 2).

Layout (fixed, shared with the engine):
    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim], contiguous; slot = block_id * block_size + off
    block_tables:     [num_seqs, max_blocks_per_seq] int32, padded with -1 or 0 (never read past seq_len)
    seq_lens:         [num_seqs] int32, context length including this step's tokens
    query_start_loc:  [num_seqs + 1] int32, cumulative query lengths (prefill only)
The query of a sequence is the last q_len tokens of its context, so the causal mask is bottom-right aligned.

Decode splits long contexts across programs (split-KV, flash-decoding) when there are too few sequences to fill the
GPU. Each split writes a partial output and its log-sum-exp; a second, reduce kernel merges them (the default), or,
with `fused_reduce=True`, the last split of a (sequence, kv head) to finish, known from an atomic arrival counter,
merges them in the same launch. Splits past a sequence's end return at once in either case.

Everything is CUDA-graph friendly: no host syncs, scratch buffers are sized from shapes and python ints only, and the
arrival counters are allocated once per device and left at zero by every launch.
"""

import functools

import torch
import triton
import triton.language as tl

from nanovllm_ray.kernels import pdl

LOG2E = 1.4426950408889634
# Split-KV choice and tiles, by (sequence, kv head) pairs; measured on an H200, qwen3-0.6b attention, bf16, 28 layers'
# caches in one CUDA graph (benchmarks/kernel_bench.py --plan, kernel_bench-plan-h200-20261130-161857.json; 640 tokens
# at batch 1-256, 100-2,048 at random from batch 16):
# - up to SMALL_PROGRAMS pairs (batch 1-8 of 8 kv heads): MAX_SPLITS splits of one 64-token tile, loaded ahead of
#   the programmatic wait, and num_stages 1 (a one-tile program has no loop to pipeline; 3 stages cost occupancy):
#   batch 1 / 8 6.14 / 12.36 -> 5.30 / 11.25 us a layer against 16 / 9 splits and 3 stages.
# - below 1.5 pairs a SM: splits for about 4 programs a SM, one 64-token tile at least (tuned on H100).
# - from 1.5 pairs a SM: no split; from more than 4 a SM (one wave of 64-token programs, 128 registers: 4 a SM),
#   128-token tiles (168 registers: 3 a SM), which double what a lone long sequence has in flight at the end of a
#   step of mixed lengths: batch 128 / 256 at random lengths 162.6 / 291.5 -> 151.7 / 282.0 us a layer, at even
#   lengths 83.0 / 162.5 -> 83.6 / 163.9. At batch 64 and even lengths they lost (42.7 -> 49.0: two waves, not one).
# At most 16 splits: the decode graphs choose for max_model_len, so batch 1 took 32, most of them empty at a 512-640
# token context (H200, latency.py: batch-1 TPOT 0.852 -> 0.798 ms). Empty splits are not free: each holds a program
# slot for its sequence-length load (why splits of 512 tokens at least for batch 16-96 were dropped: README).
MAX_SPLITS = 16  # split-KV partitions per (sequence, kv head) at most
MIN_SPLIT_LEN = 64  # tokens per split at least
SMALL_PROGRAMS = 64
# fp32 partials the fused split-KV merge loads at once (up to 4 heads x splits x head_dim): this keeps the decode
# kernel at the registers it needs without the merge (ptxas for sm_90: 8192, or 8 heads, took 160-166 instead of 128).
MERGE_TILE = 4096


# ---------------------------------------------------------------------------------------------------------------------
# Shared device helpers
# ---------------------------------------------------------------------------------------------------------------------


@triton.jit
def _load_kv_tile(
    k_cache_ptr,
    v_cache_ptr,
    bt_row_ptr,  # this sequence's row of the block table
    cols,  # [BLOCK_N] absolute key positions
    col_mask,  # [BLOCK_N] positions that exist (False -> never dereference the block table entry)
    head_off,  # kv_head * stride_ch
    stride_co,  # elements per slot: num_kv_heads * head_dim
    block_shift,  # log2(block_size); a runtime value, so block sizes share one compiled kernel
    HEAD_DIM: tl.constexpr,
):
    # A tile may span several cache blocks (block_size < BLOCK_N), so look the block id up per position.
    blk = tl.load(bt_row_ptr + (cols >> block_shift), mask=col_mask, other=0).to(tl.int64)
    slot = (blk << block_shift) + (cols & ((1 << block_shift) - 1))  # [BLOCK_N]
    off = slot * stride_co + head_off
    d = tl.arange(0, HEAD_DIM)
    k = tl.load(k_cache_ptr + off[:, None] + d[None, :], mask=col_mask[:, None], other=0.0)  # [BLOCK_N, HEAD_DIM]
    v = tl.load(v_cache_ptr + off[:, None] + d[None, :], mask=col_mask[:, None], other=0.0)  # [BLOCK_N, HEAD_DIM]
    return k, v


@triton.jit
def _softmax_step(
    q,  # [M, HEAD_DIM]
    k,  # [BLOCK_N, HEAD_DIM]
    v,  # [BLOCK_N, HEAD_DIM]
    acc,  # [M, HEAD_DIM] fp32
    m_i,  # [M] running max (base-2 logits)
    l_i,  # [M] running sum
    mask,  # [M, BLOCK_N] or [1, BLOCK_N]; ignored when HAS_MASK is False
    qk_scale,  # softmax scale * log2(e)
    HAS_MASK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # [M, BLOCK_N] fp32
    s = s * qk_scale
    if HAS_MASK:
        s = tl.where(mask, s, float("-inf"))
    # Every row sees at least one unmasked key in the first tile it processes, so m_new is finite from then on.
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


# ---------------------------------------------------------------------------------------------------------------------
# Decode
# ---------------------------------------------------------------------------------------------------------------------


@triton.jit
def _split_layout(seq_len, num_splits, BLOCK_N: tl.constexpr):
    """Split-KV partition of one sequence: BLOCK_N-aligned chunks; `used` splits are non-empty (>= 1, even for
    seq_len 0, so that someone writes the zero row). Every program of the sequence computes the same values."""
    chunk = tl.maximum(tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N, BLOCK_N)
    used = tl.maximum(tl.cdiv(seq_len, chunk), 1)
    return chunk, used


@triton.jit
def _merge_splits(
    part_out_ptr,  # [num_seqs, num_heads, num_splits, HEAD_DIM] fp32
    part_lse_ptr,  # [num_seqs, num_heads, num_splits] fp32
    out_ptr,  # [num_seqs, num_heads, HEAD_DIM]
    seq,
    first_head,  # merge heads first_head .. first_head + HEADS - 1 (those < last_head)
    last_head,
    num_heads,
    num_splits,
    used,  # splits holding a partial (>= 2)
    stride_os,
    stride_oh,
    HEADS: tl.constexpr,
    BLOCK_S: tl.constexpr,  # num_splits rounded up to a power of two
    HEAD_DIM: tl.constexpr,
):
    h = first_head + tl.arange(0, HEADS)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, HEAD_DIM)
    rows = (seq * num_heads + h).to(tl.int64)[:, None] * num_splits + s[None, :]  # [HEADS, BLOCK_S]
    mask = (h < last_head)[:, None] & (s < used)[None, :]
    # Both loads before any reduction, so that their latencies overlap. .cg: read the partials from L2, where the
    # other programs stored them, never from a stale L1 line.
    lse = tl.load(part_lse_ptr + rows, mask=mask, other=float("-inf"), cache_modifier=".cg")  # [HEADS, BLOCK_S]
    o = tl.load(
        part_out_ptr + rows[:, :, None] * HEAD_DIM + d[None, None, :],
        mask=mask[:, :, None],
        other=0.0,
        cache_modifier=".cg",
    )  # [HEADS, BLOCK_S, HEAD_DIM]
    m = tl.max(lse, axis=1)
    m = tl.where(m == float("-inf"), 0.0, m)  # heads past last_head (a used split always has lse > -inf)
    w = tl.exp2(lse - m[:, None])
    denom = tl.sum(w, axis=1)
    o = tl.sum(w[:, :, None] * o, axis=1) / tl.where(denom > 0, denom, 1.0)[:, None]  # [HEADS, HEAD_DIM]
    o_ptrs = out_ptr + seq * stride_os + h[:, None] * stride_oh + d[None, :]
    tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=(h < last_head)[:, None])


# Integer arguments that vary from step to step are not specialised on (Triton compiles a variant for ints equal
# to 1 or divisible by 16): a block table's width changes with the batch, and each new variant is a JIT compile of
# ~0.5-1 s in the middle of serving.
@triton.jit(do_not_specialize=["num_splits", "stride_bt"])
def _decode_kernel(
    q_ptr,  # [num_seqs, num_heads, HEAD_DIM]
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    out_ptr,  # [num_seqs, num_heads, HEAD_DIM]
    part_out_ptr,  # [num_seqs, num_heads, num_splits, HEAD_DIM] fp32, normalised partial outputs
    part_lse_ptr,  # [num_seqs, num_heads, num_splits] fp32, base-2 log-sum-exp of each split
    arrivals_ptr,  # [>= num_seqs * num_kv_heads] int32, zero between launches (FUSED_REDUCE only)
    qk_scale,
    num_splits,  # runtime, so that every split count shares one compiled kernel
    stride_qs,
    stride_qh,
    stride_os,
    stride_oh,
    stride_bt,
    stride_co,
    stride_ch,
    block_shift,
    GROUP: tl.constexpr,  # query heads per kv head
    # GROUP padded to a power of two >= 16 (tl.dot's minimum). The mostly-padding tensor-core tile was measured 2-3x
    # faster on H100 than a broadcast multiply-sum over the bare group (group 2): decode is bound by loads, not MMA.
    BLOCK_G: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr,  # num_splits > 1: sequences longer than one chunk go through partials
    FUSED_REDUCE: tl.constexpr,  # the last split to finish merges the partials (else _decode_reduce_kernel does)
    BLOCK_S: tl.constexpr,  # num_splits rounded up to a power of two (FUSED_REDUCE only)
    MERGE_HEADS: tl.constexpr,  # heads merged at once (FUSED_REDUCE only)
    DOT_PRECISION: tl.constexpr,
    PDL: tl.constexpr,  # launched as a programmatic dependent (kernels/pdl.py)
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    num_kv_heads = tl.num_programs(1)
    num_heads = num_kv_heads * GROUP

    seq_len = tl.load(seq_lens_ptr + seq)  # an input of the step: before the wait (kernels/pdl.py)
    if SPLIT:
        # The grid is sized for the longest sequence (or max_model_len under CUDA graphs): the trailing splits of
        # shorter ones are empty and leave at once. Nothing waits for them: the merge counts `used` splits only.
        chunk, used = _split_layout(seq_len, num_splits, BLOCK_N)
        if split >= used:
            return
        start = split * chunk
        end = tl.minimum(start + chunk, seq_len)
    else:
        used = 1
        start = 0
        end = seq_len

    bt_row_ptr = block_tables_ptr + seq.to(tl.int64) * stride_bt
    head_off = kv_head * stride_ch
    # Split into one-tile chunks (batch 1 and other small batches), a program loads its tile before the wait, but
    # for the new token's key and value, which the kernel just before (qk_norm_rope) stores: so the tile's HBM
    # latency overlaps that kernel (qwen3-0.6b batch-1 TPOT 0.865 -> 0.855 ms, H200). Longer chunks leave every tile
    # to the loop after the wait, whose software pipeline loads the next tiles ahead (a first tile loaded apart from
    # it made batch 8, two tiles a split, 2% slower, and batch 64, unsplit, 3%).
    if SPLIT:
        one_tile = chunk == BLOCK_N
        cols0 = start + tl.arange(0, BLOCK_N)
        k, v = _load_kv_tile(
            k_cache_ptr, v_cache_ptr, bt_row_ptr, cols0, (cols0 < tl.minimum(end, seq_len - 1)) & one_tile, head_off,
            stride_co, block_shift, HEAD_DIM,
        )
    if PDL:
        pdl.wait()

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, HEAD_DIM)
    head = kv_head * GROUP + g  # [BLOCK_G]
    g_mask = g < GROUP
    q = tl.load(q_ptr + seq * stride_qs + head[:, None] * stride_qh + d[None, :], mask=g_mask[:, None], other=0.0)

    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, HEAD_DIM], dtype=tl.float32)
    loop_start = start
    if SPLIT:
        if one_tile:
            if end == seq_len:  # the last split's tile holds the new token: load it whole, now that it is stored
                k, v = _load_kv_tile(
                    k_cache_ptr, v_cache_ptr, bt_row_ptr, cols0, cols0 < end, head_off, stride_co, block_shift,
                    HEAD_DIM,
                )
            if start < end:  # seq_len 0 (a padding row) has no tile
                acc, m_i, l_i = _softmax_step(
                    q, k, v, acc, m_i, l_i, (cols0 < end)[None, :], qk_scale, True, DOT_PRECISION
                )
            loop_start = end
    for n_start in range(loop_start, end, BLOCK_N):
        cols = n_start + tl.arange(0, BLOCK_N)
        col_mask = cols < end
        k, v = _load_kv_tile(
            k_cache_ptr, v_cache_ptr, bt_row_ptr, cols, col_mask, head_off, stride_co, block_shift, HEAD_DIM
        )
        acc, m_i, l_i = _softmax_step(q, k, v, acc, m_i, l_i, col_mask[None, :], qk_scale, True, DOT_PRECISION)

    # seq_len == 0 padding rows have l_i == 0: write zeros, never NaN.
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    o = acc / l_safe[:, None]
    if used == 1:  # the whole sequence in this program: no partials
        o_ptrs = out_ptr + seq * stride_os + head[:, None] * stride_oh + d[None, :]
        tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=g_mask[:, None])
    else:
        row = (seq * num_heads + head).to(tl.int64) * num_splits + split  # [BLOCK_G]
        tl.store(part_out_ptr + row[:, None] * HEAD_DIM + d[None, :], o, mask=g_mask[:, None])
        tl.store(part_lse_ptr + row, m_i + tl.log2(l_safe), mask=g_mask)  # a used split has l_i > 0
        if FUSED_REDUCE:
            # Arrival: the barrier puts every thread's partial stores before the one thread's atomic, whose release
            # (gpu scope) publishes them; the atomics on one counter form a release sequence, so the program that
            # reads used - 1 acquires all other splits' partials, and the barrier after hands that to all threads.
            tl.debug_barrier()
            counter = arrivals_ptr + seq * num_kv_heads + kv_head
            arrived = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
            tl.debug_barrier()
            if arrived == used - 1:  # the last one: merge the group's heads, and leave the counter 0 for next launch
                for first in tl.static_range(0, GROUP, MERGE_HEADS):
                    _merge_splits(
                        part_out_ptr,
                        part_lse_ptr,
                        out_ptr,
                        seq,
                        kv_head * GROUP + first,
                        (kv_head + 1) * GROUP,
                        num_heads,
                        num_splits,
                        used,
                        stride_os,
                        stride_oh,
                        MERGE_HEADS,
                        BLOCK_S,
                        HEAD_DIM,
                    )
                tl.store(counter, 0)


@triton.jit(do_not_specialize=["num_splits"])
def _decode_reduce_kernel(
    part_out_ptr,  # [num_seqs, num_heads, num_splits, HEAD_DIM] fp32
    part_lse_ptr,  # [num_seqs, num_heads, num_splits] fp32
    seq_lens_ptr,
    out_ptr,  # [num_seqs, num_heads, HEAD_DIM]
    stride_os,
    stride_oh,
    num_splits,
    BLOCK_N: tl.constexpr,  # _decode_kernel's, which fixes the split layout
    BLOCK_S: tl.constexpr,  # num_splits rounded up to a power of two
    HEAD_DIM: tl.constexpr,
    PDL: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    _, used = _split_layout(tl.load(seq_lens_ptr + seq), num_splits, BLOCK_N)  # an input of the step: before the wait
    if PDL:
        pdl.wait()
    if used == 1:  # _decode_kernel wrote the output directly
        return
    num_heads = tl.num_programs(1)
    _merge_splits(
        part_out_ptr,
        part_lse_ptr,
        out_ptr,
        seq,
        head,
        head + 1,
        num_heads,
        num_splits,
        used,
        stride_os,
        stride_oh,
        1,
        BLOCK_S,
        HEAD_DIM,
    )


# One arrival counter per (sequence, kv head) and device, allocated once: CUDA graphs bake the address in, and the
# fused decode leaves every counter back at 0. Kernels on one stream run in order, so calls may share it; decode
# attention on two streams of one device at once would not. Replaced buffers stay alive for graphs that hold them.
_ARRIVALS: dict[torch.device, list[torch.Tensor]] = {}
_MIN_ARRIVALS = 8192


def _arrival_counters(device: torch.device, n: int) -> torch.Tensor:
    buffers = _ARRIVALS.setdefault(device, [])
    if not buffers or buffers[-1].numel() < n:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                f"paged_decode_attention needs {n} arrival counters but has "
                f"{buffers[-1].numel() if buffers else 0} while a CUDA graph is being captured; run the same shapes "
                "once outside the capture first (as a warm-up does)"
            )
        size = max(_MIN_ARRIVALS, triton.next_power_of_2(n))
        buffers.append(torch.zeros(size, dtype=torch.int32, device=device))
    return buffers[-1]


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # the interpreter on CPU: pretend to be an H100 so split choices match


def choose_num_splits(num_seqs: int, num_kv_heads: int, max_seq_len: int, device: torch.device) -> int:
    """Split-KV partitions per (sequence, kv head), each >= MIN_SPLIT_LEN tokens: the regimes above."""
    programs, sms = num_seqs * num_kv_heads, _sm_count(device)
    if programs <= SMALL_PROGRAMS:
        fill = MAX_SPLITS
    elif 2 * programs >= 3 * sms:
        return 1
    else:
        fill = triton.cdiv(4 * sms, programs)
    return max(min(fill, triton.cdiv(max_seq_len, MIN_SPLIT_LEN), MAX_SPLITS), 1)


def _check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor, head_dim: int) -> tuple[int, int]:
    assert k_cache.shape == v_cache.shape and k_cache.dim() == 4, (k_cache.shape, v_cache.shape)
    assert k_cache.is_contiguous() and v_cache.is_contiguous()
    _, block_size, num_kv_heads, cache_head_dim = k_cache.shape
    assert cache_head_dim == head_dim, (cache_head_dim, head_dim)
    assert head_dim >= 16 and head_dim & (head_dim - 1) == 0, f"head_dim must be a power of two >= 16, got {head_dim}"
    assert block_size & (block_size - 1) == 0, f"block_size must be a power of two, got {block_size}"
    return block_size, num_kv_heads


def decode_config(group: int, head_dim: int, dtype: torch.dtype, programs: int, device: torch.device) -> dict:
    """Tile sizes and launch options of _decode_kernel for `programs` (sequence, kv head) pairs: the regimes above
    (benchmarks/kernel_bench.py --sweep times others)."""
    if dtype == torch.float32 or head_dim > 128:  # fp32 "ieee" dots are FMA loops: keep them small
        return dict(BLOCK_N=32, num_warps=4, num_stages=3)
    if programs <= SMALL_PROGRAMS:
        return dict(BLOCK_N=64, num_warps=4, num_stages=1)
    if programs > 4 * _sm_count(device):
        return dict(BLOCK_N=128, num_warps=4, num_stages=3)
    return dict(BLOCK_N=64, num_warps=4, num_stages=3)


def prefill_config(group: int, head_dim: int, dtype: torch.dtype) -> dict:
    """Tile sizes and launch options of _prefill_kernel; BLOCK_M rows hold BLOCK_M // group tokens x group heads."""
    if dtype == torch.float32 or head_dim > 128:
        return dict(BLOCK_M=max(32, triton.next_power_of_2(group)), BLOCK_N=32, num_warps=4, num_stages=2)
    return dict(BLOCK_M=max(64, triton.next_power_of_2(group)), BLOCK_N=64, num_warps=4, num_stages=3)


def _dot_precision(dtype: torch.dtype) -> str:
    # tf32 would cost fp32 caches ~1e-3 relative error; bf16/fp16 ignore the setting.
    return "ieee" if dtype == torch.float32 else "tf32"


def paged_decode_attention(
    q: torch.Tensor,  # [num_seqs, num_heads, head_dim], unit stride on head_dim
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32, >= 1 (0 gives a zero output row)
    scale: float,
    out: torch.Tensor | None = None,  # [num_seqs, num_heads, head_dim]
    num_splits: int | None = None,
    max_seq_len: int | None = None,  # upper bound on seq_lens, only used to choose num_splits
    # Merge split-KV partials in the decode kernel (True) or in a second, reduce kernel (False). H100, bf16, splits
    # chosen for 4096 at context 640 as in the decode graphs: two kernels 6.2/7.5/8.6 us at batch 1/2/4, fused
    # 6.5/8.3/9.6 (kernel_bench --cudagraph --contexts 640 --max-seq-len 4096); equal from batch 8.
    fused_reduce: bool = False,
) -> torch.Tensor:
    num_seqs, num_heads, head_dim = q.shape
    block_size, num_kv_heads = _check_cache(k_cache, v_cache, head_dim)
    assert num_heads % num_kv_heads == 0, (num_heads, num_kv_heads)
    assert q.stride(2) == 1, "head_dim must be the innermost, unit-stride dimension of q"
    assert block_tables.dim() == 2 and block_tables.shape[0] >= num_seqs, block_tables.shape
    assert block_tables.stride(1) == 1
    if out is None:
        out = torch.empty((num_seqs, num_heads, head_dim), dtype=q.dtype, device=q.device)
    assert out.shape == q.shape and out.stride(2) == 1, (out.shape, out.stride())
    if num_seqs == 0:
        return out

    group = num_heads // num_kv_heads
    if num_splits is None:
        bound = max_seq_len if max_seq_len is not None else block_tables.shape[1] * block_size
        num_splits = choose_num_splits(num_seqs, num_kv_heads, bound, q.device)
    assert 1 <= num_splits <= 1024, num_splits
    cfg = decode_config(group, head_dim, k_cache.dtype, num_seqs * num_kv_heads, q.device)
    block_g = max(triton.next_power_of_2(group), 16)

    split = num_splits > 1
    fused = split and fused_reduce
    if split:
        part_out = torch.empty((num_seqs, num_heads, num_splits, head_dim), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((num_seqs, num_heads, num_splits), dtype=torch.float32, device=q.device)
    else:
        part_out = part_lse = out  # unused
    block_s = triton.next_power_of_2(num_splits)
    merge_heads = min(triton.next_power_of_2(group), 4, max(MERGE_TILE // (block_s * head_dim), 1))
    arrivals = _arrival_counters(q.device, num_seqs * num_kv_heads) if fused else seq_lens  # unused unless fused
    use_pdl = pdl.use(q)
    _decode_kernel[(num_seqs, num_kv_heads, num_splits)](
        q,
        k_cache,
        v_cache,
        block_tables,
        seq_lens,
        out,
        part_out,
        part_lse,
        arrivals,
        scale * LOG2E,
        num_splits,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        block_tables.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        block_size.bit_length() - 1,
        GROUP=group,
        BLOCK_G=block_g,
        HEAD_DIM=head_dim,
        SPLIT=split,
        FUSED_REDUCE=fused,
        BLOCK_S=block_s if fused else 1,
        MERGE_HEADS=merge_heads if fused else 1,
        DOT_PRECISION=_dot_precision(k_cache.dtype),
        PDL=use_pdl,
        launch_pdl=use_pdl,
        **cfg,
    )
    if split and not fused:
        _decode_reduce_kernel[(num_seqs, num_heads)](
            part_out,
            part_lse,
            seq_lens,
            out,
            out.stride(0),
            out.stride(1),
            num_splits,
            BLOCK_N=cfg["BLOCK_N"],
            BLOCK_S=triton.next_power_of_2(num_splits),
            HEAD_DIM=head_dim,
            PDL=use_pdl,
            launch_pdl=use_pdl,
            num_warps=1 if head_dim <= 64 else 2,
        )
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Prefill (plain, over a cached prefix, chunked)
# ---------------------------------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["stride_bt"])
def _prefill_kernel(
    q_ptr,  # [num_tokens, num_heads, HEAD_DIM]
    k_cache_ptr,
    v_cache_ptr,
    out_ptr,  # [num_tokens, num_heads, HEAD_DIM]
    query_start_loc_ptr,
    seq_lens_ptr,
    block_tables_ptr,
    qk_scale,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_bt,
    stride_co,
    stride_ch,
    block_shift,
    GROUP: tl.constexpr,
    TOKENS: tl.constexpr,  # query tokens per tile; rows = TOKENS x GROUP heads (+ padding up to BLOCK_M)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    tile_rev = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq = tl.program_id(2)

    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    num_tiles = tl.cdiv(q_len, TOKENS)
    if tile_rev >= num_tiles:  # the grid is sized for max_query_len
        return
    tile = num_tiles - 1 - tile_rev  # launch the most expensive (last) tiles first
    seq_len = tl.load(seq_lens_ptr + seq)
    prefix = seq_len - q_len  # keys before this chunk (cached prefix or earlier chunks)

    r = tl.arange(0, BLOCK_M)
    d = tl.arange(0, HEAD_DIM)
    first_tok = tile * TOKENS
    tok = first_tok + r // GROUP  # [BLOCK_M] token index within the chunk
    head = kv_head * GROUP + r % GROUP  # [BLOCK_M]
    row_mask = (r < TOKENS * GROUP) & (tok < q_len)
    q_rows = (q_start + tok).to(tl.int64)
    q = tl.load(
        q_ptr + q_rows[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :], mask=row_mask[:, None], other=0.0
    )
    limit = prefix + tok  # [BLOCK_M] last key position each row may attend to

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    bt_row_ptr = block_tables_ptr + seq.to(tl.int64) * stride_bt
    head_off = kv_head * stride_ch

    last_tok = tl.minimum(first_tok + TOKENS, q_len) - 1
    kv_end = prefix + last_tok + 1  # exclusive; keys past it are masked for every row of the tile
    full_end = (prefix + first_tok + 1) // BLOCK_N * BLOCK_N  # keys below it are visible to every row
    all_cols = tl.full([BLOCK_N], 1, dtype=tl.int1)
    for n_start in range(0, full_end, BLOCK_N):
        cols = n_start + tl.arange(0, BLOCK_N)
        k, v = _load_kv_tile(
            k_cache_ptr, v_cache_ptr, bt_row_ptr, cols, all_cols, head_off, stride_co, block_shift, HEAD_DIM
        )
        acc, m_i, l_i = _softmax_step(q, k, v, acc, m_i, l_i, all_cols[None, :], qk_scale, False, DOT_PRECISION)
    for n_start in range(full_end, kv_end, BLOCK_N):  # the diagonal: causal mask
        cols = n_start + tl.arange(0, BLOCK_N)
        col_mask = cols < kv_end
        k, v = _load_kv_tile(
            k_cache_ptr, v_cache_ptr, bt_row_ptr, cols, col_mask, head_off, stride_co, block_shift, HEAD_DIM
        )
        # cols <= limit implies cols < seq_len for real rows; padding rows are never stored.
        causal = cols[None, :] <= limit[:, None]
        acc, m_i, l_i = _softmax_step(q, k, v, acc, m_i, l_i, causal, qk_scale, True, DOT_PRECISION)

    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o_ptrs = out_ptr + q_rows[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :]
    tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=row_mask[:, None])


def paged_prefill_attention(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim], unit stride on head_dim
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]; this step's K/V already stored
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32, >= this sequence's q_len
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    max_query_len: int,  # >= every q_len; sizes the grid
    scale: float,
    out: torch.Tensor | None = None,  # [num_tokens, num_heads, head_dim]
) -> torch.Tensor:
    num_tokens, num_heads, head_dim = q.shape
    block_size, num_kv_heads = _check_cache(k_cache, v_cache, head_dim)
    assert num_heads % num_kv_heads == 0, (num_heads, num_kv_heads)
    assert q.stride(2) == 1, "head_dim must be the innermost, unit-stride dimension of q"
    num_seqs = seq_lens.shape[0]
    assert query_start_loc.shape == (num_seqs + 1,), (query_start_loc.shape, num_seqs)
    assert block_tables.dim() == 2 and block_tables.shape[0] >= num_seqs and block_tables.stride(1) == 1
    if out is None:
        out = torch.empty((num_tokens, num_heads, head_dim), dtype=q.dtype, device=q.device)
    assert out.shape == q.shape and out.stride(2) == 1, (out.shape, out.stride())
    if num_tokens == 0 or num_seqs == 0 or max_query_len <= 0:
        return out

    group = num_heads // num_kv_heads
    cfg = prefill_config(group, head_dim, k_cache.dtype)
    tokens = cfg["BLOCK_M"] // group  # non-power-of-two groups (e.g. 5) leave BLOCK_M % group rows idle
    grid = (triton.cdiv(max_query_len, tokens), num_kv_heads, num_seqs)
    _prefill_kernel[grid](
        q,
        k_cache,
        v_cache,
        out,
        query_start_loc,
        seq_lens,
        block_tables,
        scale * LOG2E,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        block_tables.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        block_size.bit_length() - 1,
        GROUP=group,
        TOKENS=tokens,
        HEAD_DIM=head_dim,
        DOT_PRECISION=_dot_precision(k_cache.dtype),
        **cfg,
    )
    return out
