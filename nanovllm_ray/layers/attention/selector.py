"""Which attention backend runs: the one place that knows every backend (each imports only the interface)."""

from __future__ import annotations

import logging

import torch

from nanovllm_ray.layers.attention.backend import AttentionBackend

logger = logging.getLogger(__name__)


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
