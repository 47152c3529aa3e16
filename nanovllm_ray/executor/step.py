"""What the driver sends to every rank each step, and what rank 0 sends back: plain lists, cheap to pickle."""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import accumulate, chain
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch


@dataclass(slots=True)
class StepInput:
    input_ids: list[int]  # [num_tokens], packed sequence after sequence
    positions: list[int]  # [num_tokens]
    slot_mapping: list[int]  # [num_tokens]
    query_lens: list[int]  # [num_seqs]
    seq_lens: list[int]  # [num_seqs] context length including this step's tokens
    block_tables: list[list[int]]  # [num_seqs][blocks]
    sample_rows: list[int]  # sequences (indices into the batch) whose last token is sampled this step
    temperatures: list[float]  # per sampled row
    top_ks: list[int]
    top_ps: list[float]
    min_ps: list[float]
    seeds: list[int | None]
    max_logprobs: int | None  # None: no logprobs this step
    # Async scheduling: input_ids[pending_dst[i]] is the token the previous step sampled in row pending_src[i],
    # still on the device when this step was built (input_ids holds a placeholder there).
    pending_dst: list[int] = field(default_factory=list)
    pending_src: list[int] = field(default_factory=list)

    @classmethod
    def forward_only(cls, seqs: list[list[int]], starts: list[int], tables: list[list[int]], block_size: int,
                     temperatures: list[float] | None = None) -> StepInput:
        """A step that computes seqs[i] at positions starts[i].. through block table tables[i] and samples
        nothing (teacher-forced logits in tests and benchmarks), or, given temperatures, the last token of each
        sequence at temperatures[i] (the runner's profile and warm-up steps)."""
        ids, pos, slots, qlens, slens = [], [], [], [], []
        for toks, start, table in zip(seqs, starts, tables):
            end = start + len(toks)
            ids += toks
            pos += range(start, end)
            slots += [table[p // block_size] * block_size + p % block_size for p in range(start, end)]
            qlens.append(len(toks))
            slens.append(end)
        k = len(temperatures or [])
        return cls(ids, pos, slots, qlens, slens, tables, list(range(k)), list(temperatures or []), [-1] * k,
                   [1.0] * k, [0.0] * k, [None] * k, None)

    @property
    def is_decode_only(self) -> bool:
        return all(q == 1 for q in self.query_lens)

    def packed_ints(self) -> tuple[np.ndarray, int]:
        """Every integer input as one int64 array (one host-to-device copy): input ids, positions and slots (each
        padded to an even length e), query start offsets [num_seqs + 1], seq lens, pending dst and src."""
        n, m, p = len(self.input_ids), len(self.seq_lens), len(self.pending_dst)
        # Sections start at even offsets: 16-byte aligned pointers whatever n is, so Triton and Inductor kernels keep
        # one specialisation (an odd n once cost a JIT compile of ~0.5 s in the middle of a run).
        pad = [0] * (n & 1)
        e = n + len(pad)
        packed = np.fromiter(chain(self.input_ids, pad, self.positions, pad, self.slot_mapping, pad, [0],
                                   accumulate(self.query_lens), self.seq_lens, self.pending_dst, self.pending_src),
                             dtype=np.int64, count=3 * e + 2 * m + 1 + 2 * p)
        return packed, e

    def sampling_arrays(self, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per sampled row, on the host: [3, rows] float32 (temperature, top-p, min-p) and [rows] int64 top-k (off,
        or larger than the vocabulary: the vocabulary size)."""
        import torch  # here, not at the top: the HTTP ingress and the Serve app's build import this module

        top_ks = [k if 0 < k < vocab_size else vocab_size for k in self.top_ks]
        return (torch.tensor([self.temperatures, self.top_ps, self.min_ps], dtype=torch.float32),
                torch.tensor(top_ks, dtype=torch.int64))

    def check(self, vocab_size: int) -> None:
        """Convert every value as the runner will, on the host: raises for one that does not fit its tensor."""
        self.packed_ints()
        self.sampling_arrays(vocab_size)
        self.padded_block_tables()
        for s in self.seeds:
            if s is not None:
                np.int64(s)

    def padded_block_tables(self) -> torch.Tensor:
        """The ragged block tables as [num_seqs, longest] int32 on the host, padded with -1."""
        import torch

        arr = np.full((len(self.block_tables), max(map(len, self.block_tables))), -1, dtype=np.int32)
        for i, b in enumerate(self.block_tables):
            arr[i, :len(b)] = b
        return torch.from_numpy(arr)


@dataclass(slots=True)
class StepOutput:
    token_ids: list[int]  # per sampled row
    logprobs: list[float] | None = None  # chosen-token logprob per sampled row
    top_ids: list[list[int]] | None = None
    top_logprobs: list[list[float]] | None = None


class PendingOutput:
    """The result of a launched step: result() waits for it (a finished step on the CPU)."""

    def __init__(self, result: StepOutput | None = None, fetch=None) -> None:
        self._result, self._fetch = result, fetch

    def result(self) -> StepOutput:
        if self._result is None:
            self._result, self._fetch = self._fetch(), None
        return self._result
