"""Vocabulary-parallel embedding and LM head: each rank holds a slice of the vocabulary."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from nanovllm_ray.layers.parallel import all_reduce, divide, tp_rank, tp_size


class VocabParallelEmbedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        self.tp_rank, self.tp_size = tp_rank(), tp_size()
        self.num_embeddings = num_embeddings
        self.per_rank = divide(num_embeddings, self.tp_size)
        self.start = self.per_rank * self.tp_rank
        self.weight = nn.Parameter(torch.empty(self.per_rank, embedding_dim), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        shard = loaded.narrow(0, self.start, self.per_rank)
        if shard.shape != param.shape:
            raise ValueError(f"embedding shape {tuple(loaded.shape)} does not fit {tuple(param.shape)} per rank")
        param.data.copy_(shard)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(ids, self.weight)
        mask = (ids >= self.start) & (ids < self.start + self.per_rank)
        y = F.embedding((ids - self.start) * mask, self.weight) * mask.unsqueeze(-1)
        return all_reduce(y)


class ParallelLMHead(VocabParallelEmbedding):
    def forward(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """[n, hidden] -> [n, vocab] logits on rank 0 (None on other ranks)."""
        logits = F.linear(hidden, self.weight)
        if self.tp_size == 1:
            return logits
        parts = [torch.empty_like(logits) for _ in range(self.tp_size)] if self.tp_rank == 0 else None
        dist.gather(logits, parts, 0)
        return torch.cat(parts, -1) if self.tp_rank == 0 else None
