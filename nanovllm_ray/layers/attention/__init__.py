"""Attention: the layer, its per-step metadata, and the backends behind one interface."""

from __future__ import annotations

import torch
from torch import nn

from nanovllm_ray.layers.attention.backend import AttentionBackend
from nanovllm_ray.layers.attention.metadata import AttentionMetadata
from nanovllm_ray.layers.attention.selector import select_backend, triton_supports_head_dim

__all__ = ["Attention", "AttentionBackend", "AttentionMetadata", "select_backend", "triton_supports_head_dim"]


class Attention(nn.Module):
    def __init__(self, num_heads: int, head_dim: int, scale: float, num_kv_heads: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.scale, self.num_kv_heads = num_heads, head_dim, scale, num_kv_heads
        # [num_blocks, block_size, num_kv_heads, head_dim], assigned by the model runner
        self.k_cache = self.v_cache = torch.tensor([])

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata,
                kv_stored: bool = False) -> torch.Tensor:
        return meta.backend.forward(q, k, v, self.k_cache, self.v_cache, meta, self.scale, kv_stored=kv_stored)
