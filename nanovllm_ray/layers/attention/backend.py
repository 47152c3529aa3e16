"""The attention-backend interface (selector.py picks the backend).

A backend stores a step's new K/V into the paged cache and computes attention over each sequence's whole
context through the block table. prepare() runs once per step (before the model), forward() once per layer.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import numpy as np
import torch

from nanovllm_ray.layers.attention.metadata import AttentionMetadata


class AttentionBackend(ABC):
    name: ClassVar[str]
    supports_cuda_graphs: ClassVar[bool] = False
    # A prefill step replays from a graph: forward() reads no host-side length but max_query_len, an upper bound
    # (the graph's token count), when is_decode_only and no_cached_context are False.
    supports_prefill_graphs: ClassVar[bool] = False

    def prepare(self, meta: AttentionMetadata) -> None:  # noqa: B027 (optional hook)
        """Per-step work shared by all layers (e.g. splitting decisions)."""

    def decode_plan_size(self, num_seqs: int, num_kv_heads: int, device: torch.device) -> int:
        """Ints of the decode plan a CUDA graph of num_seqs rows holds (0: the backend takes none)."""
        return 0

    def decode_plan(self, seq_lens: list[int], num_kv_heads: int, device: torch.device, out: np.ndarray) -> None:
        """Write a decode step's plan, from its context lengths, into out (decode_plan_size ints)."""
        raise NotImplementedError(f"the {self.name} backend takes no decode plan")

    @abstractmethod
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, meta: AttentionMetadata, scale: float, kv_stored: bool = False) -> torch.Tensor:
        """q: [num_tokens, num_heads, head_dim]; k, v: [num_tokens, num_kv_heads, head_dim];
        k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]. Returns [num_tokens, num_heads,
        head_dim]. kv_stored: k and v are in the cache already (a fused kernel stored them)."""
