"""CUDA graphs for decode steps: one graph per padded batch size, all sharing one memory pool.

A decode step of n sequences replays the graph of the smallest captured size >= n. Padded rows write no KV
(slot -1) and attend over one token of block 0, so they cost almost nothing and never touch real sequences.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from nanovllm_ray.layers.attention import AttentionMetadata

if TYPE_CHECKING:
    from nanovllm_ray.executor.model_runner import ModelRunner


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    sizes = [1, 2, 4, 8] + list(range(16, min(max_num_seqs, 512) + 1, 16))
    return [s for s in sizes if s <= max(max_num_seqs, 1)] or [1]


class DecodeGraphs:
    def __init__(self, runner: ModelRunner) -> None:
        cfg = runner.config
        self.runner = runner
        self.sizes = graph_batch_sizes(cfg.max_num_seqs)
        self.max_bs = self.sizes[-1]
        dev = runner.device
        max_blocks = math.ceil(cfg.max_model_len / cfg.block_size)
        hidden_size = cfg.hf_config["hidden_size"]
        # Static inputs and output that every graph reads and writes.
        self.input_ids = torch.zeros(self.max_bs, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(self.max_bs, dtype=torch.int64, device=dev)
        self.slot_mapping = torch.full((self.max_bs,), -1, dtype=torch.int64, device=dev)
        self.seq_lens = torch.ones(self.max_bs, dtype=torch.int32, device=dev)
        self.block_tables = torch.zeros(self.max_bs, max_blocks, dtype=torch.int32, device=dev)
        self.query_start_loc = torch.arange(self.max_bs + 1, dtype=torch.int32, device=dev)
        self.hidden = torch.zeros(self.max_bs, hidden_size, dtype=runner.dtype, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.metas: dict[int, AttentionMetadata] = {}
        self._capture()

    def _meta(self, bs: int) -> AttentionMetadata:
        max_len = self.runner.config.max_model_len
        meta = AttentionMetadata(
            backend=self.runner.backend, slot_mapping=self.slot_mapping[:bs],
            query_start_loc=self.query_start_loc[:bs + 1], seq_lens=self.seq_lens[:bs],
            block_tables=self.block_tables[:bs], max_query_len=1, max_seq_len=max_len, query_lens_cpu=[1] * bs,
            seq_lens_cpu=[max_len] * bs, is_decode_only=True, no_cached_context=False)
        self.runner.backend.prepare(meta)
        return meta

    @torch.inference_mode()
    def _capture(self) -> None:
        model = self.runner.model
        pool = None
        for bs in reversed(self.sizes):
            meta = self._meta(bs)
            self.hidden[:bs] = model(self.input_ids[:bs], self.positions[:bs], meta)  # warm-up (Triton JIT)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool):
                self.hidden[:bs] = model(self.input_ids[:bs], self.positions[:bs], meta)
            pool = pool or graph.pool()
            self.graphs[bs], self.metas[bs] = graph, meta
            torch.cuda.synchronize()

    def can_run(self, num_seqs: int) -> bool:
        return num_seqs <= self.max_bs

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
            seq_lens: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
        """Replay the decode graph for n = len(input_ids) sequences; returns hidden states [n, hidden]."""
        n = input_ids.shape[0]
        bs = next(s for s in self.sizes if s >= n)
        self.input_ids[:n] = input_ids
        self.positions[:n] = positions
        self.slot_mapping[:n] = slot_mapping
        self.slot_mapping[n:bs] = -1
        self.seq_lens[:n] = seq_lens
        self.seq_lens[n:bs] = 1
        self.block_tables[:n, :block_tables.shape[1]] = block_tables
        self.block_tables[n:bs] = 0
        self.graphs[bs].replay()
        return self.hidden[:n]
