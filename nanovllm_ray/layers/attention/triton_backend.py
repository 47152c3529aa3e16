"""Triton paged attention (decode with split-KV, prefill over a cached prefix or a chunk), with PyTorch's
built-in FlashAttention-2 (`varlen_attn`) for prefills that have nothing cached, where it exists."""

from __future__ import annotations

import logging

import numpy as np
import torch

from nanovllm_ray.kernels import paged_attention
from nanovllm_ray.kernels.kv_store import store_kvcache
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

    def decode_plan_size(self, num_seqs: int, num_kv_heads: int, device: torch.device) -> int:
        return paged_attention.plan_size(num_seqs, num_kv_heads, device)

    def decode_plan(self, seq_lens: list[int], num_kv_heads: int, device: torch.device, out: np.ndarray) -> None:
        paged_attention.decode_plan(seq_lens, num_kv_heads, device, out=out)

    def _plan(self, meta: AttentionMetadata, num_kv_heads: int, device: torch.device) -> torch.Tensor:
        """The step's decode plan: the graph's buffer, or made from the host's lengths by the first layer."""
        if meta.decode_plan is not None:
            return meta.decode_plan
        plan = meta.state.get("decode_plan")
        if plan is None:
            host = torch.from_numpy(paged_attention.decode_plan(meta.seq_lens_cpu, num_kv_heads, device))
            plan = meta.state["decode_plan"] = host.pin_memory().to(device, non_blocking=True)
        return plan

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, meta: AttentionMetadata, scale: float, kv_stored: bool = False) -> torch.Tensor:
        if not kv_stored:
            store_kvcache(k, v, k_cache, v_cache, meta.slot_mapping)
        if meta.is_decode_only:
            plan = self._plan(meta, k_cache.shape[2], q.device)
            return paged_attention.paged_decode_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens,
                                                          scale, plan=plan)
        if meta.no_cached_context and self.use_varlen and q.dtype != torch.float32:
            cu = meta.query_start_loc
            return varlen_attn(q, k, v, cu, cu, meta.max_query_len, meta.max_query_len, scale=scale,
                               window_size=(-1, 0))
        return paged_attention.paged_prefill_attention(q, k_cache, v_cache, meta.query_start_loc, meta.seq_lens,
                                                       meta.block_tables, meta.max_query_len, scale)
