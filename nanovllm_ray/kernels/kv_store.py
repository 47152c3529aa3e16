"""Write the new tokens' K/V into the paged KV cache."""

import torch
import triton
import triton.language as tl

from nanovllm_ray.kernels import jit


@triton.jit
def _store_kvcache_kernel(
    k_ptr,
    v_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_ptr,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    num_kv_heads,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    # One program per token; it copies all num_kv_heads * head_dim values of K and of V.
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    if slot < 0:  # padded token of a CUDA-graph batch
        return
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, HEAD_DIM)
    mask = (h < num_kv_heads)[:, None]
    k = tl.load(k_ptr + token * stride_kt + h[:, None] * stride_kh + d[None, :], mask=mask)
    v = tl.load(v_ptr + token * stride_vt + h[:, None] * stride_vh + d[None, :], mask=mask)
    # The cache is contiguous: slot s starts at s * num_kv_heads * head_dim.
    dst = slot * num_kv_heads * HEAD_DIM + h[:, None] * HEAD_DIM + d[None, :]
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def store_kvcache(
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim], any token/head strides, unit dim stride
    v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim], contiguous
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim], contiguous
    slot_mapping: torch.Tensor,  # [num_tokens] int32/int64; -1 = skip
) -> None:
    num_tokens, num_kv_heads, head_dim = k.shape
    assert v.shape == k.shape, (k.shape, v.shape)
    assert k_cache.shape == v_cache.shape and k_cache.shape[2:] == (num_kv_heads, head_dim), (k.shape, k_cache.shape)
    assert k_cache.is_contiguous() and v_cache.is_contiguous()
    assert k.stride(2) == 1 and v.stride(2) == 1, "head_dim must be the innermost, unit-stride dimension"
    assert slot_mapping.shape == (num_tokens,), (slot_mapping.shape, num_tokens)
    assert head_dim >= 1 and head_dim & (head_dim - 1) == 0, f"head_dim must be a power of two, got {head_dim}"
    if num_tokens == 0:
        return
    jit.launch(_store_kvcache_kernel, (num_tokens,))(
        k,
        v,
        k_cache,
        v_cache,
        slot_mapping,
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        num_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_H=triton.next_power_of_2(num_kv_heads),
    )
