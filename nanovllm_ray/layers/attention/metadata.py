"""The per-step attention metadata, built once by the model runner and passed down to every layer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from nanovllm_ray.layers.attention.backend import AttentionBackend


@dataclass(slots=True)
class AttentionMetadata:
    """Tokens of a step are packed sequence after sequence; the query of sequence i is the last q_len_i
    tokens of its context of seq_len_i tokens (causal masking aligned bottom-right)."""

    backend: AttentionBackend
    slot_mapping: torch.Tensor  # [num_tokens] int64: KV slot of each new token; -1 skips (graph padding)
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32: cumulative query lengths
    seq_lens: torch.Tensor  # [num_seqs] int32: context length including the new tokens
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32, -1 padded
    max_query_len: int
    max_seq_len: int
    query_lens_cpu: list[int]
    seq_lens_cpu: list[int]
    is_decode_only: bool  # every query is one token
    no_cached_context: bool  # every context is exactly its new tokens (a plain prefill)
    state: dict[str, Any] = field(default_factory=dict)  # what the backend's prepare() computed
    # The backend's decode plan where a CUDA graph holds it (a static buffer the graph's launch rewrites each step);
    # None: the backend makes its own from seq_lens_cpu.
    decode_plan: torch.Tensor | None = None

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)
