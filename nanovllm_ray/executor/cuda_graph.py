"""CUDA graphs for decode steps: one graph per padded batch size, all sharing one memory pool.

A decode step of n sequences replays the graph of the smallest captured size bs >= n. Padded rows write no KV
(slot -1) and attend over one token of block 0, so they cost almost nothing and never touch real sequences.

The graph holds the whole step: the tokens the previous step sampled are gathered on the device, then the model,
the LM head and the sampler (temperature + Gumbel-max, or argmax) run, and the new tokens land in `tokens`, where
the next step's graph reads them. With tensor parallelism every rank does so: each samples its vocabulary slice and
the ranks merge the slices' winners (layers/sampler.py, sample_temperature_sharded). The driver's per-step work is
then one host-to-device copy and the replay: the copy holds the packed int64 inputs (ids, positions, slots, lengths,
pending sources, temperatures), a header, the attention backend's decode plan and the step's block tables row after
row, which the graph's first kernel unpacks (ops.decode_inputs). Its last kernel writes the sampled tokens into a slot
of a ring in pinned host memory (ops.store_tokens), so no device-to-host copy follows the replay on the stream either:
each operation between two replays costs the stream 3-10 us at batch 1 (about 2% of a step), idle. Requests that need
more (top-k/p, min-p, seeds, logprobs) sample from the logits outside the graph, on rank 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from nanovllm_ray.config import Config
from nanovllm_ray.executor.step import PendingOutput, StepInput, StepOutput
from nanovllm_ray.layers import ops
from nanovllm_ray.layers.attention import Attention, AttentionBackend, AttentionMetadata
from nanovllm_ray.layers.parallel import tp_size
from nanovllm_ray.layers.sampler import sample_temperature, sample_temperature_sharded

# Sections of the packed per-step vector, each `bs` long for a graph of bs rows.
IDS, POS, SLOTS, LENS, SRC, TEMPS = range(6)
SECTIONS = 6
# int64 words after the sections: the step's rows, its block tables' width, the ring slot and the launch's number.
HEADER = 4
# Slots of the host ring the graphs write sampled tokens into: a rank has at most two steps in flight (it launches
# step t + 1, then reads step t), and a slot is checked before it is read.
RING = 4


def _even(words: int) -> int:
    return words + (words & 1)  # int32 views start 16-byte aligned, as Triton's kernels like them


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    sizes = [1, 2, 4, 8] + list(range(16, min(max_num_seqs, 512) + 1, 16))
    return [s for s in sizes if s <= max(max_num_seqs, 1)] or [1]


@torch.inference_mode()
def capture_graphs(sizes: list[int], prepare: Callable[[int], AttentionMetadata],
                   forward: Callable[[int, AttentionMetadata], None], capture: bool = True
                   ) -> dict[int, torch.cuda.CUDAGraph]:
    """A graph of forward(size, prepare(size)) for each size, largest first, all in one memory pool; each run once
    eagerly first (Triton JIT compiles). capture=False: only that eager run (the start-up's compile pass)."""
    graphs, pool = {}, None
    for size in reversed(sizes):
        meta = prepare(size)
        forward(size, meta)  # warm-up
        if not capture:
            continue
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool):
            forward(size, meta)
        pool = pool or graph.pool()
        graphs[size] = graph
        torch.cuda.synchronize()
    return graphs


class DecodeGraphs:
    def __init__(self, model: torch.nn.Module, backend: AttentionBackend, config: Config, device: torch.device,
                 dtype: torch.dtype, capture: bool = True) -> None:
        """model: called as model(ids, positions, meta) -> hidden states, with an `lm_head`; captured at once
        (capture=False: each size's step run once eagerly, nothing captured)."""
        cfg = self.config = config
        self.model, self.backend = model, backend
        self.sizes = graph_batch_sizes(cfg.max_num_seqs)
        self.max_bs = self.sizes[-1]
        dev = device
        max_blocks = math.ceil(cfg.max_model_len / cfg.block_size)
        # With several ranks each samples the winner of its vocabulary slice and every rank merges the all-gathered
        # winners alike, so every rank's `tokens` holds the step's tokens for the next step's graph (no logits
        # gathered to rank 0, no broadcast).
        self.tp = tp_size()
        # The backend's decode plan (which programs attend over which chunk), rewritten by each launch.
        self.kv_heads = next(m.num_kv_heads for m in model.modules() if isinstance(m, Attention))
        self.plan_sizes = {bs: backend.decode_plan_size(bs, self.kv_heads, dev) for bs in self.sizes}
        # Static inputs that every graph reads, one buffer a launch copies into at once; a graph of bs rows reads
        # [sections (SECTIONS x bs) | header | plan | block tables (bs x max_blocks int32 at most, row after row)].
        self.max_blocks = max_blocks
        self.layout = {bs: self._layout(bs) for bs in self.sizes}
        self.staging = torch.zeros(max(end for _, _, end in self.layout.values()), dtype=torch.int64, device=dev)
        self.block_tables = torch.zeros(self.max_bs, max_blocks, dtype=torch.int32, device=dev)
        self.query_start_loc = torch.arange(self.max_bs + 1, dtype=torch.int32, device=dev)
        self.hidden: dict[int, torch.Tensor] = {}  # each graph's hidden states [bs, hidden], its own output
        # Sampled tokens, rows of the last step (its sampled rows may be more than max_bs after a mixed step).
        self.tokens = torch.zeros(max(cfg.max_num_seqs, self.max_bs), dtype=torch.int64, device=dev)
        # Logits of this rank's vocabulary slice (all of it with one rank); the slices' winners, all-gathered.
        head = model.lm_head
        self.logits = torch.zeros(self.max_bs, head.weight.shape[0], dtype=dtype, device=dev)
        self.winners = torch.zeros(self.tp * self.max_bs, 2, dtype=torch.float64, device=dev) if self.tp > 1 else None
        # Each launch's tokens, read by the host: [launch number, tokens] a slot (Triton writes it; else a copy).
        self.ring = None
        if ops.store_tokens is not None and dev.type == "cuda":
            self.ring = torch.full((RING, 1 + self.max_bs), -1, dtype=torch.int64, pin_memory=True)
        self.launches = 0
        self._capture(capture)

    def _layout(self, bs: int) -> tuple[int, int, int]:
        """Where a graph of bs rows finds its plan and its block tables in the staging buffer, and where its part
        ends (int64 words)."""
        plan = _even(SECTIONS * bs + HEADER)
        tables = plan + _even(-(-self.plan_sizes[bs] // 2))
        return plan, tables, tables + _even(-(-bs * self.max_blocks // 2))

    def section(self, bs: int, k: int) -> torch.Tensor:
        return self.staging[k * bs:(k + 1) * bs]

    def header(self, bs: int) -> torch.Tensor:
        return self.staging[SECTIONS * bs:SECTIONS * bs + HEADER]

    def plan(self, bs: int) -> torch.Tensor | None:
        start, end, _ = self.layout[bs]
        return self.staging[start:end].view(torch.int32)[:self.plan_sizes[bs]] if self.plan_sizes[bs] else None

    def compact_tables(self, bs: int) -> torch.Tensor:
        _, start, end = self.layout[bs]
        return self.staging[start:end].view(torch.int32)

    def _meta(self, bs: int) -> AttentionMetadata:
        max_len = self.config.max_model_len
        meta = AttentionMetadata(
            backend=self.backend, slot_mapping=self.section(bs, SLOTS),
            query_start_loc=self.query_start_loc[:bs + 1], seq_lens=self.section(bs, LENS),
            block_tables=self.block_tables[:bs], max_query_len=1, max_seq_len=max_len, query_lens_cpu=[1] * bs,
            seq_lens_cpu=[max_len] * bs, is_decode_only=True, no_cached_context=False,
            decode_plan=self.plan(bs))
        self.backend.prepare(meta)
        return meta

    def _forward(self, bs: int, meta: AttentionMetadata) -> None:
        """The captured work: gather pending tokens (and, at one rank, their embeddings), model, LM head and
        temperature sampling, whose tokens go to the host ring too."""
        model = self.model
        embed = model.model.embed_tokens.weight if self.tp == 1 else None
        ids, embeds = ops.decode_inputs(self.section(bs, IDS), self.section(bs, SRC), self.tokens, self.header(bs),
                                        self.compact_tables(bs), self.block_tables, embed)
        # The graph's own output: its memory stays the graph's while this holds it (no copy into a static buffer).
        self.hidden[bs] = hidden = model(ids, self.section(bs, POS), meta, embeds)
        head, temps = model.lm_head, self.section(bs, TEMPS).view(torch.float64)
        torch.mm(hidden, head.weight.t(), out=self.logits[:bs])
        ring = (self.header(bs), self.ring) if self.ring is not None else None
        if self.tp == 1:
            sample_temperature(self.logits[:bs], temps, out=self.tokens[:bs], ring=ring)
        else:
            sample_temperature_sharded(self.logits[:bs], temps, head.start, self.winners[:self.tp * bs],
                                       out=self.tokens[:bs])
            if ring is not None:
                ops.store_tokens(self.tokens[:bs], *ring)

    def _capture(self, capture: bool) -> None:
        def prepare(bs: int) -> AttentionMetadata:
            self._reset_padding(bs)
            return self._meta(bs)

        self.graphs: dict[int, torch.cuda.CUDAGraph] = capture_graphs(self.sizes, prepare, self._forward, capture)

    def _reset_padding(self, bs: int) -> None:
        """Valid inputs for bs empty rows: slot -1, length 1, no pending source, greedy; no block tables."""
        self._upload(bs, [], [], [], [], np.zeros((0, 0), dtype=np.int32), launch=-1)

    def _upload(self, bs: int, input_ids, positions, slot_mapping, seq_lens, tables: np.ndarray,
                pending_dst=(), pending_src=(), temperatures=None, launch: int = -1) -> None:
        """The inputs of a graph of bs rows for a step of n = len(seq_lens) rows, in one host-to-device copy: the
        sections (padding rows past n), the header, the backend's plan and the block tables [n, width] (int32). The
        graph writes its tokens into ring slot launch % RING, marked with launch."""
        n, (rows, width) = len(seq_lens), tables.shape
        assert rows in (0, n), (tables.shape, n)
        plan_at, tables_at, _ = self.layout[bs]
        words = tables_at + -(-tables.size // 2)
        host = torch.empty(words, dtype=torch.int64, pin_memory=True)
        buf = host.numpy()
        a = buf[:SECTIONS * bs].reshape(SECTIONS, bs)
        for k, values, pad in ((IDS, input_ids, 0), (POS, positions, 0), (SLOTS, slot_mapping, -1),
                               (LENS, seq_lens, 1)):
            a[k, :n] = values
            a[k, n:] = pad
        a[SRC] = -1
        if len(pending_dst):
            a[SRC, pending_dst] = pending_src
        temps = a[TEMPS].view(np.float64)
        temps[:] = 0.0
        if temperatures is not None:
            temps[:n] = temperatures
        buf[SECTIONS * bs:SECTIONS * bs + HEADER] = (rows, width, launch % RING, launch)
        if self.plan_sizes[bs]:
            self.backend.decode_plan(list(seq_lens) + [1] * (bs - n), self.kv_heads, self.staging.device,
                                     buf[plan_at:tables_at].view(np.int32))
        buf[tables_at:].view(np.int32)[:tables.size] = tables.ravel()
        self.staging[:words].copy_(host, non_blocking=True)

    def can_run(self, num_seqs: int) -> bool:
        return num_seqs <= self.max_bs

    def padded(self, n: int) -> int:
        return next(s for s in self.sizes if s >= n)

    def launch(self, step: StepInput, prev_tokens: torch.Tensor | None) -> int:
        """Replay the graph for a decode step from the driver's lists: one host-to-device copy of its inputs, then
        the replay. prev_tokens: the previous step's sampled tokens when they are not already in self.tokens. Returns
        the padded batch size."""
        n = len(step.seq_lens)
        bs = self.padded(n)
        if len(step.temperatures) == n:
            temps = step.temperatures
        else:  # not every row samples (a one-token prefill chunk): those rows' tokens are ignored
            temps = np.zeros(n)
            temps[step.sample_rows] = step.temperatures
        if prev_tokens is not None:
            self.tokens[:prev_tokens.shape[0]].copy_(prev_tokens)
        self.launches += 1
        self._upload(bs, step.input_ids, step.positions, step.slot_mapping, step.seq_lens,
                     step.padded_block_tables().numpy(), step.pending_dst, step.pending_src, temps, self.launches)
        self.graphs[bs].replay()
        return bs

    def pending(self, n: int) -> PendingOutput:
        """The tokens of the last launch's n rows, read from the host ring once the replay is done (ring set up)."""
        launch, ring = self.launches, self.ring.numpy()
        slot = launch % RING
        done = torch.cuda.Event()
        done.record()

        def fetch() -> StepOutput:
            done.synchronize()
            tokens = ring[slot, 1:1 + n].tolist()
            if ring[slot, 0] != launch:  # a later launch wrote the slot: more steps in flight than RING - 1
                raise RuntimeError(f"decode step {launch}: its ring slot {slot} holds step {ring[slot, 0]}'s tokens")
            return StepOutput(tokens)

        return PendingOutput(fetch=fetch)

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
            seq_lens: torch.Tensor, block_tables: torch.Tensor, seq_lens_cpu: list[int]) -> torch.Tensor:
        """Replay for device tensors already built by the runner (teacher forcing, several ranks); returns the
        hidden states [n, hidden]."""
        n = input_ids.shape[0]
        bs = self.padded(n)
        self._upload(bs, input_ids.cpu().numpy(), positions.cpu().numpy(), slot_mapping.cpu().numpy(), seq_lens_cpu,
                     block_tables.to(torch.int32).cpu().numpy())
        self.graphs[bs].replay()
        return self.hidden[bs][:n]


PREFILL_GRAPH_TOKENS = (64, 128, 256, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192)
PREFILL_GRAPH_SEQS = 8  # sequences a prefill graph holds (more: the step runs eagerly)


def prefill_graph_sizes(max_tokens: int) -> list[int]:
    return [t for t in PREFILL_GRAPH_TOKENS if t <= max_tokens]


class PrefillGraphs:
    """CUDA graphs for small prefill steps: one per padded token count T (prefill_graph_sizes), each for up to
    PREFILL_GRAPH_SEQS sequences, plain or over a cached prefix (the paged prefill kernel; decode rows of a mixed
    step too). A step of n tokens and m sequences replays the smallest T >= n: tokens past n are padding (slot -1,
    no KV written, outputs unused), sequences past m have no query. Eagerly, a prefill pays the host's cost of each
    op (~15 a layer): about 24 ms for a 512-token prompt of Qwen3-0.6B on an H200 whose kernels take 3 ms. The model
    runs in the graph; the LM head on the sampled rows and sampling stay outside."""

    def __init__(self, model: torch.nn.Module, backend: AttentionBackend, config: Config, device: torch.device,
                 dtype: torch.dtype, max_tokens: int, capture: bool = True) -> None:
        self.model, self.backend, self.config = model, backend, config
        self.sizes = prefill_graph_sizes(max_tokens)
        t, s = self.sizes[-1], PREFILL_GRAPH_SEQS
        max_blocks = math.ceil(config.max_model_len / config.block_size)
        self.ids = torch.zeros(t, dtype=torch.int64, device=device)
        self.positions = torch.zeros(t, dtype=torch.int64, device=device)
        self.slots = torch.full((t,), -1, dtype=torch.int64, device=device)
        self.query_start_loc = torch.zeros(s + 1, dtype=torch.int32, device=device)
        self.seq_lens = torch.zeros(s, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(s, max_blocks, dtype=torch.int32, device=device)
        self.hidden = torch.zeros(t, config.hf_config["hidden_size"], dtype=dtype, device=device)
        self._capture(capture)

    def _meta(self, t: int) -> AttentionMetadata:
        meta = AttentionMetadata(
            backend=self.backend, slot_mapping=self.slots[:t], query_start_loc=self.query_start_loc,
            seq_lens=self.seq_lens, block_tables=self.block_tables, max_query_len=t,
            max_seq_len=self.config.max_model_len, query_lens_cpu=[t] + [0] * (PREFILL_GRAPH_SEQS - 1),
            seq_lens_cpu=[t] + [0] * (PREFILL_GRAPH_SEQS - 1), is_decode_only=False, no_cached_context=False)
        self.backend.prepare(meta)
        return meta

    def _forward(self, t: int, meta: AttentionMetadata) -> None:
        self.hidden[:t] = self.model(self.ids[:t], self.positions[:t], meta)

    def _capture(self, capture: bool) -> None:
        self.query_start_loc.zero_()  # no sequence has a query: capture writes nothing
        self.seq_lens.zero_()
        self.graphs: dict[int, torch.cuda.CUDAGraph] = capture_graphs(self.sizes, self._meta, self._forward, capture)

    def can_run(self, num_tokens: int, num_seqs: int) -> bool:
        return num_tokens <= self.sizes[-1] and num_seqs <= PREFILL_GRAPH_SEQS

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Replay for a step whose device tensors the runner built (meta: its metadata); returns the hidden states
        [n, hidden]."""
        n, m = input_ids.shape[0], meta.num_seqs
        t = next(s for s in self.sizes if s >= n)
        self.ids[:n] = input_ids
        self.positions[:n] = positions
        self.slots[:n] = meta.slot_mapping
        self.slots[n:t] = -1
        self.query_start_loc[:m + 1] = meta.query_start_loc
        self.query_start_loc[m + 1:] = n  # sequences past m: empty queries
        self.seq_lens[:m] = meta.seq_lens
        self.seq_lens[m:] = 0
        width = meta.block_tables.shape[1]
        self.block_tables[:m, :width] = meta.block_tables
        self.graphs[t].replay()
        return self.hidden[:n]
