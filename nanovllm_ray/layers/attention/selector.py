"""Which attention backend runs: the one place that knows every backend (each imports only the interface)."""

from __future__ import annotations

import logging

import torch

from nanovllm_ray.layers.attention.backend import AttentionBackend

logger = logging.getLogger(__name__)


def triton_supports_head_dim(head_dim: int) -> bool:
    """The Triton kernels (paged attention, KV store, fused q/k norm + rotary) tile the head dimension: a power of
    two from 16 to 256."""
    return 16 <= head_dim <= 256 and head_dim & (head_dim - 1) == 0


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
            if name == "triton" and not triton_supports_head_dim(head_dim):
                logger.warning("head_dim %d: the Triton kernels need a power of two from 16 to 256; falling back to "
                               "the torch reference attention (slow, no CUDA graphs)", head_dim)
                name = "torch"
    if name == "triton" and not triton_supports_head_dim(head_dim):
        raise ValueError(f"attention_backend='triton' needs head_dim to be a power of two from 16 to 256; this "
                         f"model's head_dim is {head_dim} (attention_backend='torch' runs it, slowly)")
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
