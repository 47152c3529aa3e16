"""The small element-wise ops of a decoder layer, as plain functions. On CUDA the model runner swaps in Triton
kernels (enable_triton_ops: kernels/elementwise.py), one launch each: in a decode step of a small model these ops,
not the matmuls, are most of the kernels launched. (torch.compile did that before: it brought Dynamo's and
Inductor's imports, code generation and compile workers into every start.)"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    x = x + residual  # in the model dtype, as transformers does
    return rms_norm(x, weight, eps), x


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, -1)
    return F.silu(gate) * up


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def qk_norm_rope(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, eps: float,
                 cos_sin_cache: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head RMSNorm of q [n, heads, d] and k [n, kv_heads, d], then rotary embedding at `positions`."""
    q, k = rms_norm(q, q_weight, eps), rms_norm(k, k_weight, eps)
    cos, sin = cos_sin_cache[positions].unsqueeze(1).chunk(2, dim=-1)
    return rotate(q, cos, sin), rotate(k, cos, sin)


def exponential_race(logits: torch.Tensor, temperatures: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Sample from softmax(logits / T) as argmax(logits / T - log(E)), E ~ Exp(1) (the Gumbel-max trick)."""
    return (logits / temperatures.unsqueeze(1) - noise.log()).argmax(-1)


def merge_pending(input_ids: torch.Tensor, src: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """input_ids with row i replaced by tokens[src[i]] where src[i] >= 0 (tokens sampled on the device)."""
    return torch.where(src >= 0, tokens[src.clamp(min=0)], input_ids)


def decode_inputs(input_ids: torch.Tensor, src: torch.Tensor, tokens: torch.Tensor, header: torch.Tensor,
                  compact: torch.Tensor, block_tables: torch.Tensor, embed: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """merge_pending's ids, and the step's block tables unpacked from compact (header[0] rows of header[1] entries,
    row after row) into block_tables' first rows; with embed, also the ids' embeddings (else None). Static shapes
    only (a CUDA graph holds it): every entry of block_tables is rewritten, with itself outside the step's rows and
    width."""
    rows, width = block_tables.shape
    n, w = header[0], header[1]
    r = torch.arange(rows, device=block_tables.device)[:, None]
    c = torch.arange(width, device=block_tables.device)[None, :]
    inside = (r < n) & (c < w)
    at = torch.where(inside, r * w + c, 0).clamp(max=compact.numel() - 1)
    block_tables.copy_(torch.where(inside, compact[at], block_tables))
    ids = merge_pending(input_ids, src, tokens)
    return ids, None if embed is None else F.embedding(ids, embed)


# The ops enable_triton_ops swaps for kernels/elementwise.py's; qk_norm_rope (the fallback attention path) calls
# rms_norm through this module's globals, so it takes the kernel too. exponential_race (the sampler's filtered path,
# outside the graphs) stays plain.
_PLAIN = {name: globals()[name] for name in ("rms_norm", "add_rms_norm", "silu_and_mul", "merge_pending",
                                             "decode_inputs")}


# Triton kernels that replace small ops on CUDA, set by enable_triton_ops():
qk_norm_rope_store = None  # q/k RMSNorm + rotary + KV-cache store of a layer in one kernel
skinny_gemm = None  # nanovllm_ray.kernels.skinny_gemm: decode-sized matmuls where it measured faster than cuBLAS
gemv = None  # nanovllm_ray.kernels.gemv: small decode batches, with the norm before and SiLU-and-mul after folded in
store_tokens = None  # a decode graph's sampled tokens written straight into pinned host memory (no plain form)


def _on_cuda(kernel, plain):
    """kernel for CUDA tensors, plain for others: the swap is process-wide, and a CPU model may run after a CUDA one."""

    def op(x, *args, **kwargs):
        return kernel(x, *args, **kwargs) if x.is_cuda else plain(x, *args, **kwargs)

    return op


def enable_triton_ops(enabled: bool = True, fused_gemv: bool = True, head_dim_supported: bool = True) -> None:
    """Swap the Triton kernels in (CUDA, with Triton) or back to the plain ops. The element-wise ops take them for
    any shape; the fused q/k norm + rotary + KV store, the skinny GEMM and (fused_gemv) the decode GEMV only where
    the attention kernels tile the model's head_dim (head_dim_supported)."""
    global qk_norm_rope_store, skinny_gemm, gemv, store_tokens
    fused = skinny = small = store = None
    globals().update(_PLAIN)
    if enabled:
        from nanovllm_ray.kernels import elementwise

        globals().update({name: _on_cuda(getattr(elementwise, name), plain) for name, plain in _PLAIN.items()})
        store = elementwise.store_tokens
        if head_dim_supported:
            from nanovllm_ray.kernels import skinny_gemm as skinny
            from nanovllm_ray.kernels.qk_norm_rope import qk_norm_rope_store as fused
            if fused_gemv:
                from nanovllm_ray.kernels import gemv as small
    qk_norm_rope_store, skinny_gemm, gemv, store_tokens = fused, skinny, small, store
