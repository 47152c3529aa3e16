"""Qwen3's per-head q/k RMSNorm, the rotary embedding and the KV-cache store of a step's new tokens, in one launch.

Unfused, this is three compiled kernels plus the store kernel per layer; in a batch-1 decode step, where every
kernel costs its few microseconds of latency whatever its size, that was ~6 us of each layer's ~45. One program
per token reads the token's q, k and v straight from the QKV projection's output row, writes the rotated q and k
(the attention needs them: q always, k for a prefill with nothing cached) and stores k and v at the token's slot
(slot -1 skips: padded rows of a CUDA-graph batch).

Rounding follows the unfused ops: the normalised value is rounded to the model dtype before the weight multiplies
it, cos/sin are rounded to the model dtype, the rest is fp32 with one rounding at the store.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nanovllm_ray.kernels import jit, pdl


@triton.jit
def _norm_rope(row_ptr, w1, w2, cos, sin, eps, h, d, mask, HALF: tl.constexpr):
    """RMSNorm over head_dim of heads h of one token (weight halves w1, w2), then neox-style rotation; returns both
    halves (fp32)."""
    x1 = tl.load(row_ptr + h * (2 * HALF) + d, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(row_ptr + h * (2 * HALF) + HALF + d, mask=mask, other=0.0).to(tl.float32)
    r = tl.rsqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / (2 * HALF) + eps)[:, None]
    dtype = row_ptr.dtype.element_ty
    n1 = (x1 * r).to(dtype).to(tl.float32) * w1
    n2 = (x2 * r).to(dtype).to(tl.float32) * w2
    return n1 * cos - n2 * sin, n2 * cos + n1 * sin


@triton.jit
def _qk_norm_rope_store_kernel(
    qkv_ptr,  # [n, (num_heads + 2 * num_kv_heads) * head_dim]: q | k | v of each token
    stride_t,
    q_w_ptr,  # [head_dim]
    k_w_ptr,  # [head_dim]
    cos_sin_ptr,  # [max_position, head_dim]: cos | sin halves
    stride_cs,
    pos_ptr,  # [n]
    slot_ptr,  # [n]; -1 = do not store
    q_out_ptr,  # [n, num_heads, head_dim] contiguous
    k_out_ptr,  # [n, num_kv_heads, head_dim] contiguous
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim] contiguous
    v_cache_ptr,
    eps,
    NUM_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    BLOCK_QH: tl.constexpr,
    BLOCK_KH: tl.constexpr,
    HALF: tl.constexpr,  # head_dim // 2
    STORE: tl.constexpr,
    PDL: tl.constexpr,  # launched as a programmatic dependent (kernels/pdl.py)
):
    t = tl.program_id(0).to(tl.int64)
    dtype = qkv_ptr.dtype.element_ty
    # The step's inputs, the cos/sin table and the norm weights before the wait: the kernel just before (the QKV
    # projection) writes only the row.
    pos = tl.load(pos_ptr + t).to(tl.int64)
    d = tl.arange(0, HALF)[None, :]
    cos = tl.load(cos_sin_ptr + pos * stride_cs + d).to(dtype).to(tl.float32)
    sin = tl.load(cos_sin_ptr + pos * stride_cs + HALF + d).to(dtype).to(tl.float32)
    qw1 = tl.load(q_w_ptr + d).to(tl.float32)
    qw2 = tl.load(q_w_ptr + HALF + d).to(tl.float32)
    kw1 = tl.load(k_w_ptr + d).to(tl.float32)
    kw2 = tl.load(k_w_ptr + HALF + d).to(tl.float32)
    slot = tl.load(slot_ptr + t).to(tl.int64)  # (positions when not STORE: unused)
    if PDL:
        pdl.wait()
    row = qkv_ptr + t * stride_t
    D = 2 * HALF

    # Every load before the first store, so that their latencies overlap.
    qh = tl.arange(0, BLOCK_QH)[:, None]
    q_mask = qh < NUM_HEADS
    q1, q2 = _norm_rope(row, qw1, qw2, cos, sin, eps, qh, d, q_mask, HALF)
    kh = tl.arange(0, BLOCK_KH)[:, None]
    k_mask = kh < NUM_KV_HEADS
    k1, k2 = _norm_rope(row + NUM_HEADS * D, kw1, kw2, cos, sin, eps, kh, d, k_mask, HALF)
    k1, k2 = k1.to(dtype), k2.to(dtype)
    if STORE:
        v_src = row + (NUM_HEADS + NUM_KV_HEADS) * D + kh * D + d
        v_mask = k_mask & (slot >= 0)
        v1 = tl.load(v_src, mask=v_mask)
        v2 = tl.load(v_src + HALF, mask=v_mask)

    q_dst = q_out_ptr + t * (NUM_HEADS * D) + qh * D + d
    tl.store(q_dst, q1.to(dtype), mask=q_mask)
    tl.store(q_dst + HALF, q2.to(dtype), mask=q_mask)
    k_dst = k_out_ptr + t * (NUM_KV_HEADS * D) + kh * D + d
    tl.store(k_dst, k1, mask=k_mask)
    tl.store(k_dst + HALF, k2, mask=k_mask)
    if STORE:
        if slot >= 0:
            dst = slot * (NUM_KV_HEADS * D) + kh * D + d
            cache_dtype = k_cache_ptr.dtype.element_ty
            tl.store(k_cache_ptr + dst, k1.to(cache_dtype), mask=k_mask)
            tl.store(k_cache_ptr + dst + HALF, k2.to(cache_dtype), mask=k_mask)
            tl.store(v_cache_ptr + dst, v1.to(cache_dtype), mask=k_mask)
            tl.store(v_cache_ptr + dst + HALF, v2.to(cache_dtype), mask=k_mask)


def qk_norm_rope_store(
    qkv: torch.Tensor,  # [n, (num_heads + 2 * num_kv_heads) * head_dim], unit stride along features
    num_heads: int,
    num_kv_heads: int,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    eps: float,
    cos_sin_cache: torch.Tensor,  # [max_position, head_dim], contiguous rows
    positions: torch.Tensor,  # [n]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim], or empty: no store
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [n]; -1 skips
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotated, normalised q [n, num_heads, head_dim] and k [n, num_kv_heads, head_dim]; k and v stored in the cache
    at slot_mapping when the cache is not empty."""
    n = qkv.shape[0]
    head_dim = cos_sin_cache.shape[1]
    assert qkv.shape[1] == (num_heads + 2 * num_kv_heads) * head_dim and qkv.stride(1) == 1, qkv.shape
    assert head_dim % 2 == 0 and (head_dim // 2) & (head_dim // 2 - 1) == 0, f"head_dim {head_dim}: power of two"
    assert cos_sin_cache.stride(1) == 1
    q = torch.empty((n, num_heads, head_dim), dtype=qkv.dtype, device=qkv.device)
    k = torch.empty((n, num_kv_heads, head_dim), dtype=qkv.dtype, device=qkv.device)
    store = k_cache.numel() > 0
    if store:
        assert k_cache.is_contiguous() and v_cache.is_contiguous()
        assert k_cache.shape[2:] == (num_kv_heads, head_dim), (k_cache.shape, num_kv_heads, head_dim)
        assert slot_mapping.shape == (n,), (slot_mapping.shape, n)
    if n == 0:
        return q, k
    use_pdl = pdl.use(qkv)
    jit.launch(_qk_norm_rope_store_kernel, (n,))(
        qkv, qkv.stride(0), q_weight, k_weight, cos_sin_cache, cos_sin_cache.stride(0), positions,
        slot_mapping if store else positions, q, k, k_cache if store else q, v_cache if store else q, eps,
        NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, BLOCK_QH=triton.next_power_of_2(num_heads),
        BLOCK_KH=triton.next_power_of_2(num_kv_heads), HALF=head_dim // 2, STORE=store, PDL=use_pdl,
        launch_pdl=use_pdl, num_warps=4)
    return q, k
