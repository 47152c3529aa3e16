"""Attention over the paged KV cache: decode (one query token per sequence) and prefill (chunked, cached prefix).

Both kernels read K/V straight from the cache through the block table (no gather copy), pack the query heads of a
GQA group into one program so every K/V tile is loaded once per kv head, and run an fp32 online softmax (base 2).

Layout (fixed, shared with the engine):
    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim], contiguous; slot = block_id * block_size + off
    block_tables:     [num_seqs, max_blocks_per_seq] int32, padded with -1 or 0 (never read past seq_len)
    seq_lens:         [num_seqs] int32, context length including this step's tokens
    query_start_loc:  [num_seqs + 1] int32, cumulative query lengths (prefill only)
The query of a sequence is the last q_len tokens of its context, so the causal mask is bottom-right aligned.

Decode works through a plan made on the host from the step's lengths (decode_plan): every sequence is cut into
chunks of one length for the whole step, each chunk is a program (per kv head), and the programs are listed longest
first, so the GPU, which starts programs in grid order, starts the long ones first. A sequence of one chunk writes its
output directly; the chunks of a longer one write partial outputs and their log-sum-exp, which a second, reduce kernel
merges. The chunk length is chosen so that the step's chunks fill the GPU (below), whatever mix of lengths it holds:
one long sequence among short ones is spread over as many programs as its share of the tokens asks.

Everything is CUDA-graph friendly: no host syncs, and a plan's size depends on the batch size only (plan_size), so a
graph captured for a batch size replays any plan of that size.
"""

import functools
from collections.abc import Sequence

import numpy as np
import torch
import triton
import triton.language as tl

from nanovllm_ray.kernels import jit, pdl

LOG2E = 1.4426950408889634
# The plan's chunks, by (sequence, kv head) pairs (decode_plan, decode_config). Measured on an H200, qwen3-0.6b
# attention, bf16, 28 layers' caches in one CUDA graph (benchmarks/kernel_bench.py --plan):
# - up to SMALL_PROGRAMS pairs (batch 1-8 of 8 kv heads): MAX_SPLITS chunks a sequence on average, one 64-token tile
#   at least, whose tile is loaded ahead of the programmatic wait, with num_stages 1 (a one-tile program has no loop
#   to pipeline; 3 stages cost occupancy): batch 1 / 8 at 640 tokens 6.14 / 12.36 -> 5.30 / 11.25 us a layer. No
#   more chunks than for about 4 programs a SM, as below: batch 8 at ~600 tokens took 80 one-tile chunks a kv head
#   and now 40 of two tiles (TPOT 1.287 -> 1.200 ms; 8 chunks a sequence at batch 1-4 lost: 0.750 -> 0.826 at batch 1).
# - below 1.5 pairs a SM: chunks for about 4 programs a SM (tuned on H100).
# - from 1.5 pairs a SM: chunks of about the mean length, so that sequences of even length run unsplit and longer ones
#   are cut; from more than 4 pairs a SM (one wave of 64-token programs, 128 registers: 4 a SM), 128-token tiles (168
#   registers: 3 a SM), which double what a lone long program has in flight at the end of a step (at batch 64 and even
#   lengths they lost: 42.7 -> 49.0 us a layer, two waves, not one).
# Against split-KV by an equal share of each sequence (chunks proportional to its length, for max_model_len in the
# graphs; kernel_bench-plan-h200-20261130-173525.json): lengths at random from 100 to 2,048 at batch 16 / 32 / 48 / 64
# / 128 / 256 1.10 / 1.19 / 1.33 / 1.18 / 1.05 / 1.03x faster; even lengths 0.95-1.00x from batch 4 (the merge kernel's
# launch, where nothing is split), 1.03-1.11x at batch 1, 2 and 16.
MAX_SPLITS = 16  # chunks a sequence at batch 1-8, on average
MIN_CHUNK = 64  # tokens a chunk at least (one tile)
SMALL_PROGRAMS = 64
# plan[0]: chunk length; plan[1]: chunks; then cu_chunks [rows + 1]; then for each chunk (capacity entries each) its
# sequence, its index in the sequence, the sequence's length
PLAN_HEADER = 2
_HEADER = tl.constexpr(PLAN_HEADER)  # the same, for the kernels


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


# Integer arguments that vary from step to step are not specialised on (Triton compiles a variant for ints equal
# to 1 or divisible by 16): a block table's width changes with the batch, and each new variant is a JIT compile of
# ~0.5-1 s in the middle of serving.
@triton.jit(do_not_specialize=["num_seqs", "capacity", "stride_bt"])
def _decode_kernel(
    q_ptr,  # [num_seqs, num_heads, HEAD_DIM]
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    plan_ptr,  # int32, decode_plan's layout
    out_ptr,  # [num_seqs, num_heads, HEAD_DIM]
    part_out_ptr,  # [capacity, num_heads, HEAD_DIM] fp32, normalised partial outputs, one row a chunk
    part_lse_ptr,  # [capacity, num_heads] fp32, base-2 log-sum-exp of each chunk
    qk_scale,
    num_seqs,  # rows of the plan
    capacity,  # chunks the plan holds at most
    stride_qs,
    stride_qh,
    stride_os,
    stride_oh,
    stride_bt,
    stride_co,
    stride_ch,
    block_shift,
    KV_HEADS: tl.constexpr,
    GROUP: tl.constexpr,  # query heads per kv head
    # GROUP padded to a power of two >= 16 (tl.dot's minimum). The mostly-padding tensor-core tile was measured 2-3x
    # faster on H100 than a broadcast multiply-sum over the bare group (group 2): decode is bound by loads, not MMA.
    BLOCK_G: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    PDL: tl.constexpr,  # launched as a programmatic dependent (kernels/pdl.py)
    PRELOAD: tl.constexpr = False,  # one-tile chunks load their tile before the wait (below)
):
    # Programs go chunk after chunk in the plan's order (longest first), the kv heads of a chunk side by side.
    pid = tl.program_id(0)
    item = pid // KV_HEADS
    kv_head = pid % KV_HEADS
    # The plan is an input of the step: read before the wait (kernels/pdl.py), each chunk's sequence, place and
    # length side by side and beside the chunk count, so that the block table and then the keys are the second and
    # third loads in a row. Entries past the chunk count are zeros (decode_plan), so they are safe to read.
    items = tl.load(plan_ptr + 1)
    chunks = plan_ptr + _HEADER + num_seqs + 1
    seq = tl.load(chunks + item)
    index = tl.load(chunks + capacity + item)  # the chunk's place in its sequence
    seq_len = tl.load(chunks + 2 * capacity + item)
    chunk = tl.load(plan_ptr)
    first = tl.load(plan_ptr + _HEADER + seq)  # the sequence's first chunk row (needed at the end only)
    used = tl.load(plan_ptr + _HEADER + seq + 1) - first
    start = index * chunk
    end = tl.minimum(start + chunk, seq_len)

    bt_row_ptr = block_tables_ptr + seq.to(tl.int64) * stride_bt
    head_off = kv_head * stride_ch
    # A one-tile chunk (batch 1 and other small batches) loads its tile before the wait, but for the new token's key
    # and value, which the kernel just before (qk_norm_rope) stores: so the tile's HBM latency overlaps that kernel
    # (qwen3-0.6b batch-1 TPOT 0.865 -> 0.855 ms, H200). Longer chunks leave every tile to the loop after the wait,
    # whose software pipeline loads the next tiles ahead (a first tile loaded apart from it made batch 8, two tiles a
    # chunk, 2% slower, and batch 64, unsplit, 3%). The code is there only where decode_config asks for it: it took
    # 128-token tiles from 168 registers to 209.
    if PRELOAD:
        one_tile = (chunk == BLOCK_N) & (item < items)
        cols0 = start + tl.arange(0, BLOCK_N)
        k, v = _load_kv_tile(
            k_cache_ptr, v_cache_ptr, bt_row_ptr, cols0, (cols0 < tl.minimum(end, seq_len - 1)) & one_tile, head_off,
            stride_co, block_shift, HEAD_DIM,
        )
    if item >= items:  # the plan has fewer chunks than the grid (sized for its capacity)
        return
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
    if PRELOAD:
        if one_tile:
            if end == seq_len:  # the last chunk's tile holds the new token: load it whole, now that it is stored
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
        row = (first + index).to(tl.int64) * (KV_HEADS * GROUP) + head  # [BLOCK_G]
        tl.store(part_out_ptr + row[:, None] * HEAD_DIM + d[None, :], o, mask=g_mask[:, None])
        tl.store(part_lse_ptr + row, m_i + tl.log2(l_safe), mask=g_mask)  # a chunk has a token, so l_i > 0


@triton.jit
def _merge_step(m, denom, acc, lse, o, AXIS: tl.constexpr):
    """Online log-sum-exp merge of a block of chunks along AXIS: lse [..., BLOCK_S], o [..., BLOCK_S, HEAD_DIM]."""
    m_new = tl.maximum(m, tl.max(lse, axis=AXIS))  # finite: the first block holds two used chunks
    alpha = tl.exp2(m - m_new)
    w = tl.exp2(lse - tl.expand_dims(m_new, AXIS))
    denom = denom * alpha + tl.sum(w, axis=AXIS)
    acc = acc * tl.expand_dims(alpha, AXIS) + tl.sum(tl.expand_dims(w, AXIS + 1) * o, axis=AXIS)
    return m_new, denom, acc


@triton.jit
def _decode_reduce_kernel(
    part_out_ptr,  # [capacity, num_heads, HEAD_DIM] fp32
    part_lse_ptr,  # [capacity, num_heads] fp32
    plan_ptr,
    out_ptr,  # [num_seqs, num_heads, HEAD_DIM]
    stride_os,
    stride_oh,
    num_heads,
    HEADS: tl.constexpr,  # heads a program merges (a power of two)
    BLOCK_S: tl.constexpr,  # chunks merged a loop iteration
    HEAD_DIM: tl.constexpr,
    PDL: tl.constexpr,
):
    seq = tl.program_id(0)
    first = tl.load(plan_ptr + _HEADER + seq)  # the sequence's chunk rows [first, first + used): an input of the step,
    used = tl.load(plan_ptr + _HEADER + seq + 1) - first  # read before the wait
    if PDL:
        pdl.wait()
    if used == 1:  # _decode_kernel wrote the output directly
        return
    d = tl.arange(0, HEAD_DIM)
    # Both loads of a block before any reduction, so that their latencies overlap. .cg: read the partials from L2,
    # where the decode kernel stored them, never from a stale L1 line.
    if HEADS == 1:  # vectors over the chunks (a [1, chunks] tile measured 1.5 us a layer slower at batch 1)
        head = tl.program_id(1)
        m = tl.full([], float("-inf"), dtype=tl.float32)
        denom = tl.zeros([], dtype=tl.float32)
        acc = tl.zeros([HEAD_DIM], dtype=tl.float32)
        for s0 in range(0, used, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            mask = s < used
            rows = (first + s).to(tl.int64) * num_heads + head  # [BLOCK_S]
            lse = tl.load(part_lse_ptr + rows, mask=mask, other=float("-inf"), cache_modifier=".cg")
            o = tl.load(
                part_out_ptr + rows[:, None] * HEAD_DIM + d[None, :], mask=mask[:, None], other=0.0,
                cache_modifier=".cg",
            )  # [BLOCK_S, HEAD_DIM]
            m, denom, acc = _merge_step(m, denom, acc, lse, o, 0)
        tl.store(out_ptr + seq * stride_os + head * stride_oh + d, (acc / denom).to(out_ptr.dtype.element_ty))
    else:
        h = tl.program_id(1) * HEADS + tl.arange(0, HEADS)  # [HEADS]
        h_mask = h < num_heads
        m = tl.full([HEADS], float("-inf"), dtype=tl.float32)
        denom = tl.zeros([HEADS], dtype=tl.float32)
        acc = tl.zeros([HEADS, HEAD_DIM], dtype=tl.float32)
        for s0 in range(0, used, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            mask = h_mask[:, None] & (s < used)[None, :]  # [HEADS, BLOCK_S]
            rows = (first + s).to(tl.int64)[None, :] * num_heads + h[:, None]
            lse = tl.load(part_lse_ptr + rows, mask=mask, other=float("-inf"), cache_modifier=".cg")
            lse = tl.where(h_mask[:, None], lse, 0.0)  # heads past num_heads: finite, so never NaN (not stored)
            o = tl.load(
                part_out_ptr + rows[:, :, None] * HEAD_DIM + d[None, None, :], mask=mask[:, :, None], other=0.0,
                cache_modifier=".cg",
            )  # [HEADS, BLOCK_S, HEAD_DIM]
            m, denom, acc = _merge_step(m, denom, acc, lse, o, 1)
        o_ptrs = out_ptr + seq * stride_os + h[:, None] * stride_oh + d[None, :]
        tl.store(o_ptrs, (acc / denom[:, None]).to(out_ptr.dtype.element_ty), mask=h_mask[:, None])


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # the interpreter on CPU: pretend to be an H100 so plans match


def _plan_target(num_seqs: int, num_kv_heads: int, device: torch.device) -> tuple[int, int]:
    """(chunks a plan aims at, chunk granularity in tokens) for num_seqs rows: the regimes above."""
    pairs, sms = num_seqs * num_kv_heads, _sm_count(device)
    spread = triton.cdiv(4 * sms, num_kv_heads)  # chunks a kv head for about 4 programs a SM
    if pairs <= SMALL_PROGRAMS:
        return min(num_seqs * MAX_SPLITS, spread), MIN_CHUNK
    if 2 * pairs < 3 * sms:
        return spread, MIN_CHUNK
    return num_seqs, 2 * MIN_CHUNK if pairs > 4 * sms else MIN_CHUNK


def plan_size(num_seqs: int, num_kv_heads: int, device: torch.device) -> int:
    """Ints of a plan for num_seqs rows (decode_plan without `chunk`): what a CUDA graph's plan buffer holds. With the
    chunk at least total / target tokens, sum(ceil(len / chunk)) <= total / chunk + rows <= target + rows."""
    return _plan_ints(num_seqs, _plan_target(num_seqs, num_kv_heads, device)[0] + num_seqs)


def _plan_ints(rows: int, capacity: int) -> int:
    return PLAN_HEADER + rows + 1 + 3 * capacity


def decode_plan(seq_lens: Sequence[int], num_kv_heads: int, device: torch.device, chunk: int | None = None,
                out: np.ndarray | None = None) -> np.ndarray:
    """The decode plan of a step (int32): [chunk length, chunks, cu_chunks (rows + 1), then for each chunk (capacity
    entries each) its sequence, its index in the sequence, the sequence's length], chunks listed longest first. A
    sequence of length 0 (padding) has one chunk, which writes zeros. chunk: force a chunk length (tests); the plan may
    then outgrow plan_size."""
    lens = np.asarray(seq_lens, dtype=np.int64)
    rows = len(lens)
    target, grain = _plan_target(rows, num_kv_heads, device)
    if chunk is None:
        per_chunk = -(-int(lens.sum()) // target)  # ceil
        chunk = max(grain, -(-per_chunk // grain) * grain)
    counts = np.maximum(-(-lens // chunk), 1)
    cu = np.zeros(rows + 1, dtype=np.int64)
    np.cumsum(counts, out=cu[1:])
    items = int(cu[-1])
    capacity = max(target + rows, items)
    seq = np.repeat(np.arange(rows), counts)
    index = np.arange(items) - cu[seq]
    order = np.argsort(np.maximum(index * chunk - lens[seq], -chunk), kind="stable")  # longest first
    size = _plan_ints(rows, capacity)
    plan = np.empty(size, dtype=np.int32) if out is None else out[:size]  # every entry is written below
    plan[0], plan[1] = chunk, items
    plan[PLAN_HEADER:PLAN_HEADER + rows + 1] = cu
    base = PLAN_HEADER + rows + 1
    seq = seq[order]
    plan[base:base + items] = seq
    plan[base + capacity:base + capacity + items] = index[order]
    plan[base + 2 * capacity:base + 2 * capacity + items] = lens[seq]
    for part in range(3):  # past the chunk count: zeros (sequence 0), which the kernel may read
        plan[base + part * capacity + items:base + (part + 1) * capacity] = 0
    return plan


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
    (benchmarks/kernel_bench.py --sweep times others). BLOCK_N divides decode_plan's chunk granularity."""
    if dtype == torch.float32 or head_dim > 128:  # fp32 "ieee" dots are FMA loops: keep them small
        return dict(BLOCK_N=32, num_warps=4, num_stages=3)
    if programs <= SMALL_PROGRAMS:
        return dict(BLOCK_N=64, num_warps=4, num_stages=1, PRELOAD=True)
    if programs > 4 * _sm_count(device):
        return dict(BLOCK_N=128, num_warps=4, num_stages=3)
    # ptxas gives this one 168 registers unasked (3 programs a SM), 128 without spilling when held to it (4 a SM):
    # batch 16 at random lengths 29.7 -> 24.9 us a layer, batch 64 at 640 tokens 54.7 -> 45.7.
    return dict(BLOCK_N=64, num_warps=4, num_stages=3, maxnreg=128)


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
    plan: torch.Tensor | None = None,  # decode_plan of seq_lens on q's device; None: made here (reads seq_lens back)
    chunk: int | None = None,  # without a plan: force its chunk length (tests)
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
    if plan is None:
        host = decode_plan(seq_lens[:num_seqs].tolist(), num_kv_heads, q.device, chunk=chunk)
        plan = torch.from_numpy(host).to(q.device)
    assert plan.dtype == torch.int32 and plan.dim() == 1, (plan.dtype, plan.shape)
    capacity = (plan.numel() - PLAN_HEADER - num_seqs - 1) // 3

    group = num_heads // num_kv_heads
    cfg = decode_config(group, head_dim, k_cache.dtype, num_seqs * num_kv_heads, q.device)
    part_out = torch.empty((capacity, num_heads, head_dim), dtype=torch.float32, device=q.device)
    part_lse = torch.empty((capacity, num_heads), dtype=torch.float32, device=q.device)
    use_pdl = pdl.use(q)
    jit.launch(_decode_kernel, (capacity * num_kv_heads,))(
        q,
        k_cache,
        v_cache,
        block_tables,
        plan,
        out,
        part_out,
        part_lse,
        scale * LOG2E,
        num_seqs,
        capacity,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        block_tables.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        block_size.bit_length() - 1,
        KV_HEADS=num_kv_heads,
        GROUP=group,
        BLOCK_G=max(triton.next_power_of_2(group), 16),
        HEAD_DIM=head_dim,
        DOT_PRECISION=_dot_precision(k_cache.dtype),
        PDL=use_pdl,
        launch_pdl=use_pdl,
        **cfg,
    )
    # The merge: a program a (sequence, head) while there are few sequences, each of many chunks; from 1.5 pairs a SM,
    # where most sequences are one chunk and the rest two or three, a program a sequence for 16 heads (a program a
    # head there, 2,048-4,096 mostly idle ones at batch 128-256, cost 4-5 us a layer).
    many = 2 * num_seqs * num_kv_heads >= 3 * _sm_count(q.device)
    heads = min(16, triton.next_power_of_2(num_heads)) if many else 1
    jit.launch(_decode_reduce_kernel, (num_seqs, triton.cdiv(num_heads, heads)))(
        part_out,
        part_lse,
        plan,
        out,
        out.stride(0),
        out.stride(1),
        num_heads,
        HEADS=heads,
        BLOCK_S=4 if many else 16,
        HEAD_DIM=head_dim,
        PDL=use_pdl,
        launch_pdl=use_pdl,
        num_warps=4 if many else 1 if head_dim <= 64 else 2,
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
    jit.launch(_prefill_kernel, grid)(
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
