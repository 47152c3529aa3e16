"""The flash-attn package (an optional extra) as a backend: paged KV through its block-table support, which
needs block sizes that are multiples of 256."""

from __future__ import annotations

import torch

from nanovllm_ray.layers.attention.backend import AttentionBackend
from nanovllm_ray.layers.attention.metadata import AttentionMetadata
from nanovllm_ray.layers.attention.torch_ref import store_kvcache_ref


class FlashAttnBackend(AttentionBackend):
    name = "flash_attn"
    supports_cuda_graphs = True

    def __init__(self, block_size: int, head_dim: int, dtype: torch.dtype) -> None:
        try:
            from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache
        except ImportError as e:
            raise ValueError("attention_backend='flash_attn' needs the flash-attn package "
                             "(pip install 'nanovllm-ray[flash-attn]')") from e
        if block_size % 256:
            raise ValueError(f"attention_backend='flash_attn' needs block_size to be a multiple of 256, "
                             f"not {block_size}")
        if dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"attention_backend='flash_attn' needs float16 or bfloat16, not {dtype}")
        self.varlen, self.with_kvcache = flash_attn_varlen_func, flash_attn_with_kvcache
        try:
            from nanovllm_ray.kernels.kv_store import store_kvcache
        except ImportError:
            store_kvcache = store_kvcache_ref
        self.store = store_kvcache

    def prepare(self, meta: AttentionMetadata) -> None:
        if not meta.is_decode_only and not meta.no_cached_context:
            cu_k = torch.zeros(meta.num_seqs + 1, dtype=torch.int32, device=meta.seq_lens.device)
            torch.cumsum(meta.seq_lens, 0, out=cu_k[1:])
            meta.state["cu_seqlens_k"] = cu_k

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, meta: AttentionMetadata, scale: float, kv_stored: bool = False) -> torch.Tensor:
        if not kv_stored:
            self.store(k, v, k_cache, v_cache, meta.slot_mapping)
        if meta.is_decode_only:
            # int32 lengths (the decode graphs keep them as int64)
            return self.with_kvcache(q.unsqueeze(1), k_cache, v_cache, cache_seqlens=meta.seq_lens.int(),
                                     block_table=meta.block_tables, softmax_scale=scale, causal=True).squeeze(1)
        cu_q = meta.query_start_loc
        if meta.no_cached_context:
            return self.varlen(q, k, v, cu_q, cu_q, meta.max_query_len, meta.max_query_len, softmax_scale=scale,
                               causal=True)
        return self.varlen(q, k_cache, v_cache, cu_q, meta.state["cu_seqlens_k"], meta.max_query_len,
                           meta.max_seq_len, softmax_scale=scale, causal=True, block_table=meta.block_tables)
