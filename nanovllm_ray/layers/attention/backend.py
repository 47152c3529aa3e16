"""The attention-backend interface and the registry that picks one.

A backend stores a step's new K/V into the paged cache and computes attention over each sequence's whole
context through the block table. prepare() runs once per step (before the model), forward() once per layer.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from nanovllm_ray.layers.attention.metadata import AttentionMetadata

logger = logging.getLogger(__name__)


class AttentionBackend(ABC):
    name: ClassVar[str]
    supports_cuda_graphs: ClassVar[bool] = False

    def prepare(self, meta: AttentionMetadata) -> None:  # noqa: B027 (optional hook)
        """Per-step work shared by all layers (e.g. splitting decisions)."""

    @abstractmethod
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, meta: AttentionMetadata, scale: float, kv_stored: bool = False) -> torch.Tensor:
        """q: [num_tokens, num_heads, head_dim]; k, v: [num_tokens, num_kv_heads, head_dim];
        k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]. Returns [num_tokens, num_heads,
        head_dim]. kv_stored: k and v are in the cache already (a fused kernel stored them)."""


def select_backend(name: str, device: torch.device, block_size: int, head_dim: int,
                   dtype: torch.dtype) -> AttentionBackend:
    """Pick the attention backend: `name` forces one; auto takes the fastest that supports the setup."""
    if name == "auto":
        name = "torch"
        if device.type == "cuda":
            try:
                import triton  # noqa: F401

                name = "triton"
            except ImportError:
                logger.warning("triton is not installed: falling back to the torch reference attention")
    if name == "torch":
        from nanovllm_ray.layers.attention.torch_ref import TorchReferenceBackend

        backend: AttentionBackend = TorchReferenceBackend()
    elif name == "triton":
        if device.type != "cuda":
            raise ValueError(f"attention_backend='triton' needs a CUDA device, not {device}")
        from nanovllm_ray.layers.attention.triton_backend import TritonBackend

        backend = TritonBackend()
    elif name == "flash_attn":
        from nanovllm_ray.layers.attention.flash_attn_backend import FlashAttnBackend

        backend = FlashAttnBackend(block_size=block_size, head_dim=head_dim, dtype=dtype)
    else:
        raise ValueError(f"unknown attention backend {name!r}")
    logger.info("attention backend: %s", backend.name)
    return backend
