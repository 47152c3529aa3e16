"""Triton paged attention (decode with split-KV, prefill over a cached prefix or a chunk), with PyTorch's
built-in FlashAttention-2 (`varlen_attn`) for prefills that have nothing cached, where it exists."""

from __future__ import annotations

import logging

import torch

from nanovllm_ray.kernels.kv_store import store_kvcache
from nanovllm_ray.kernels.paged_attention import paged_decode_attention, paged_prefill_attention
from nanovllm_ray.layers.attention.backend import AttentionBackend
from nanovllm_ray.layers.attention.metadata import AttentionMetadata

logger = logging.getLogger(__name__)

try:
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # torch < 2.10
    varlen_attn = None


class TritonBackend(AttentionBackend):
    name = "triton"
    supports_cuda_graphs = True
    supports_prefill_graphs = True  # the paged prefill kernel sizes its grid by max_query_len, reads lengths on device

    def __init__(self, use_varlen: bool = True) -> None:
        self.use_varlen = use_varlen and varlen_attn is not None
        logger.info("triton attention: plain prefill through %s",
                    "torch varlen_attn (FlashAttention-2)" if self.use_varlen else "the Triton prefill kernel")

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, meta: AttentionMetadata, scale: float, kv_stored: bool = False) -> torch.Tensor:
        if not kv_stored:
            store_kvcache(k, v, k_cache, v_cache, meta.slot_mapping)
        if meta.is_decode_only:
            return paged_decode_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, scale,
                                          max_seq_len=meta.max_seq_len)
        if meta.no_cached_context and self.use_varlen and q.dtype != torch.float32:
            cu = meta.query_start_loc
            return varlen_attn(q, k, v, cu, cu, meta.max_query_len, meta.max_query_len, scale=scale,
                               window_size=(-1, 0))
        return paged_prefill_attention(q, k_cache, v_cache, meta.query_start_loc, meta.seq_lens, meta.block_tables,
                                       meta.max_query_len, scale)
