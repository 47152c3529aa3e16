"""Plain-torch reference attention: correct for any mix of prefill, cached-prefix prefill, chunks and decode.
Slow (a loop over sequences); used on the CPU and as the reference the kernels are tested against."""

from __future__ import annotations

import torch

from nanovllm_ray.layers.attention.backend import AttentionBackend
from nanovllm_ray.layers.attention.metadata import AttentionMetadata


def store_kvcache_ref(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      slot_mapping: torch.Tensor) -> None:
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    k_cache.view(-1, *k_cache.shape[2:])[slots] = k[keep]
    v_cache.view(-1, *v_cache.shape[2:])[slots] = v[keep]


def paged_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, query_lens: list[int],
                        seq_lens: list[int], block_tables: torch.Tensor, scale: float) -> torch.Tensor:
    """q: [num_tokens, num_heads, head_dim] packed by sequence -> [num_tokens, num_heads, head_dim]."""
    block_size, num_kv_heads, head_dim = k_cache.shape[1:]
    group = q.shape[1] // num_kv_heads
    out = torch.empty_like(q)
    start = 0
    for i, (q_len, seq_len) in enumerate(zip(query_lens, seq_lens)):
        blocks = block_tables[i, :(seq_len + block_size - 1) // block_size].long()
        k = k_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len].float()
        v = v_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len].float()
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        qi = q[start:start + q_len].float()
        scores = torch.einsum("qhd,khd->hqk", qi, k) * scale  # [heads, q_len, seq_len]
        # query j sits at position seq_len - q_len + j and sees keys 0..that position
        qpos = torch.arange(seq_len - q_len, seq_len, device=q.device).unsqueeze(1)
        kpos = torch.arange(seq_len, device=q.device).unsqueeze(0)
        scores.masked_fill_(kpos > qpos, float("-inf"))
        out[start:start + q_len] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).to(q.dtype)
        start += q_len
    return out


class TorchReferenceBackend(AttentionBackend):
    name = "torch"

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, meta: AttentionMetadata, scale: float, kv_stored: bool = False) -> torch.Tensor:
        if not kv_stored:
            store_kvcache_ref(k, v, k_cache, v_cache, meta.slot_mapping)
        return paged_attention_ref(q, k_cache, v_cache, meta.query_lens_cpu, meta.seq_lens_cpu,
                                   meta.block_tables, scale)
