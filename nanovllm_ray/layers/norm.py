"""RMSNorm, optionally fused with the residual add that precedes it (as Hugging Face's Qwen3 computes it)."""

from __future__ import annotations

import torch
from torch import nn

from nanovllm_ray.layers import ops
from nanovllm_ray.layers.parallel import all_reduce_add_rms_norm, tp_size


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, reduce: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """reduce: x is a row-parallel layer's partial sums, all-reduced here with the residual add."""
        if residual is None:
            return ops.rms_norm(x, self.weight, self.eps)
        if reduce and tp_size() > 1:
            return all_reduce_add_rms_norm(x, residual, self.weight, self.eps)
        return ops.add_rms_norm(x, residual, self.weight, self.eps)
