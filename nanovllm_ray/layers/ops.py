"""The small element-wise ops of a decoder layer, as plain functions. On CUDA the model runner swaps in
torch.compile'd versions (enable_compiled_ops), which fuse each into one or two kernels: in a decode step of a
small model these ops, not the matmuls, are most of the kernels launched."""

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


_PLAIN = {name: globals()[name] for name in ("rms_norm", "add_rms_norm", "silu_and_mul", "qk_norm_rope",
                                             "exponential_race", "merge_pending")}


# Triton kernels that replace small ops on CUDA, set by enable_triton_ops():
qk_norm_rope_store = None  # q/k RMSNorm + rotary + KV-cache store of a layer in one kernel
skinny_gemm = None  # nanovllm_ray.kernels.skinny_gemm: decode-sized matmuls where it measured faster than cuBLAS
gemv = None  # nanovllm_ray.kernels.gemv: small decode batches, with the norm before and SiLU-and-mul after folded in


def enable_triton_ops(enabled: bool = True, fused_gemv: bool = True) -> None:
    global qk_norm_rope_store, skinny_gemm, gemv
    fused = skinny = small = None
    if enabled:
        from nanovllm_ray.kernels import skinny_gemm as skinny
        from nanovllm_ray.kernels.qk_norm_rope import qk_norm_rope_store as fused
        if fused_gemv:
            from nanovllm_ray.kernels import gemv as small
    qk_norm_rope_store, skinny_gemm, gemv = fused, skinny, small


def enable_compiled_ops(enabled: bool = True) -> None:
    """Swap this module's ops for torch.compile'd ones (dynamic in the token dimension) or back."""
    for name, fn in _PLAIN.items():
        globals()[name] = torch.compile(fn, dynamic=True, fullgraph=True) if enabled else fn
