"""The worker of one rank: owns the model shard, the KV cache and (on GPU) the CUDA graphs; turns a StepInput
into tensors, runs the model, and samples on rank 0."""

from __future__ import annotations

import importlib.util
import logging
import math
import time

import torch
import torch.distributed as dist

from nanovllm_ray.config import Config
from nanovllm_ray.executor.step import PendingOutput, StepInput, StepOutput
from nanovllm_ray.layers import ops
from nanovllm_ray.layers.attention import Attention, AttentionMetadata, select_backend, triton_supports_head_dim
from nanovllm_ray.layers.parallel import fast_all_reduce_bytes, tp_rank, tp_size
from nanovllm_ray.layers.sampler import SamplerOutput, SamplingTensors, sample
from nanovllm_ray.models.loader import load_model
from nanovllm_ray.models.qwen3 import Qwen3ForCausalLM
from nanovllm_ray.startup import StartupClock

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(config: Config) -> torch.device:
    if config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("device='cuda' was asked for, but CUDA is not available")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def resolve_dtype(config: Config, device: torch.device) -> torch.dtype:
    if config.dtype != "auto":
        return _DTYPES[config.dtype]
    ckpt = config.hf_config.get("torch_dtype") or config.hf_config.get("dtype") or "bfloat16"
    dtype = _DTYPES.get(str(ckpt).removeprefix("torch."), torch.bfloat16)
    # On the CPU, half precision is slow and inexact: auto means float32 there.
    return torch.float32 if device.type == "cpu" else dtype


def profile_cuda(run, reps: int = 5) -> torch.profiler.profile:
    """torch.profiler's record of the CUDA work that `reps` calls of `run` launch."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            run()
        torch.cuda.synchronize()
    return prof


def cuda_kernel_table(prof: torch.profiler.profile, rows: int = 25) -> str:
    """The table of a profile_cuda record's kernels, costliest first."""
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows)


class ModelRunner:
    def __init__(self, config: Config, defer_graphs: bool = False) -> None:
        """defer_graphs: leave warmup() and CUDA-graph capture to the caller (ranks first agree on the KV block count
        and resize_kv_cache: graphs bake in the KV cache's addresses, and every rank must warm up alike)."""
        self.config = config
        self.clock = StartupClock(tp_rank())
        self.rank, self.world_size = tp_rank(), tp_size()
        self.device = resolve_device(config)
        self.dtype = resolve_dtype(config, self.device)
        cfg = config.hf_config
        self.block_size = config.block_size
        self.num_layers = cfg["num_hidden_layers"]
        self.head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
        self.num_kv_heads = max(1, cfg.get("num_key_value_heads", cfg["num_attention_heads"]) // self.world_size)
        self.vocab_size = cfg["vocab_size"]
        if self.device.type == "cuda" and not config.enforce_eager and importlib.util.find_spec("triton") is not None:
            # the element-wise ops as Triton kernels (most decode kernels; no torch.compile, so no Inductor compile
            # at start-up); fused q/k norm + rotary + KV store and skinny GEMM where it measured faster (if they tile
            # this head); the decode GEMV with its norm and activation
            ops.enable_triton_ops(True, config.fused_gemv, triton_supports_head_dim(self.head_dim))
        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        try:
            with torch.device(self.device):
                self.model = Qwen3ForCausalLM(cfg)
        finally:
            torch.set_default_dtype(default_dtype)
        self.clock.done("model built", f"{self.device}, {self.dtype}")
        load_model(self.model, config.model)
        self.model.eval()
        self.clock.done("weights loaded")
        self.backend = select_backend(config.attention_backend, self.device, self.block_size, self.head_dim,
                                      self.dtype)
        self.attn_layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        self.graphs = None
        self.prefill_graphs = None
        self.prev_sampled = torch.zeros(0, dtype=torch.int64, device=self.device)  # last step's sampled tokens
        self.prev_in_graph = False  # prev_sampled is the decode graphs' own token buffer
        self.prev_rows = 0  # rows the previous step sampled (on every rank)
        if self.device.type == "cuda" and importlib.util.find_spec("triton") is not None:
            # With several ranks every rank walks the same steps, so the collectives in them (NCCL, and the sentinel
            # all-reduce, which launches for real in the pass) meet in the same order.
            self._compile_kernels()
        self.num_kv_blocks = self._allocate_kv_cache()
        self.clock.done("KV cache sized", f"{self.num_kv_blocks} blocks")
        if not defer_graphs:
            self.warmup()
            self.capture_cuda_graphs()

    def capture_cuda_graphs(self, capture: bool = True) -> None:
        """capture=False: run each graph's step once eagerly instead, and keep no graphs (the compile pass)."""
        if self.device.type == "cuda" and not self.config.enforce_eager and self.backend.supports_cuda_graphs:
            from nanovllm_ray.executor.cuda_graph import DecodeGraphs, PrefillGraphs, prefill_graph_sizes

            graphs = DecodeGraphs(self.model, self.backend, self.config, self.device, self.dtype, capture)
            detail = f"decode: {len(graphs.sizes)} batch sizes"
            max_tokens = min(self.config.prefill_graph_tokens, self.config.max_num_batched_tokens)
            if self.world_size > 1:
                # Several ranks: a prefill graph's all-reduces stay on the fast path (checked at start-up, and
                # measured in graphs); NCCL all-reduces of prefill-sized messages inside graphs were not measured.
                row = self.config.hf_config["hidden_size"] * self.dtype.itemsize
                max_tokens = min(max_tokens, fast_all_reduce_bytes(self.dtype) // row)
            prefill_graphs = None
            if self.backend.supports_prefill_graphs and prefill_graph_sizes(max_tokens):
                prefill_graphs = PrefillGraphs(self.model, self.backend, self.config, self.device, self.dtype,
                                               max_tokens, capture)
                detail += f"; prefill: up to {prefill_graphs.sizes[-1]} tokens"
            if capture:
                self.graphs, self.prefill_graphs = graphs, prefill_graphs
                self.clock.done("CUDA graphs captured", detail)

    def _compile_kernels(self) -> None:
        """Compile the Triton kernels of the steps start-up runs next (the profile pass, the warm-up steps, each CUDA
        graph's step) side by side on a thread pool, launching none (kernels/jit.py), so that those steps find them
        built: compiled one at a time as the steps met them, they took about 15 s of a first start on an H200. The
        pass's outputs are garbage and dropped; a kernel it missed compiles when first launched, as before."""
        from nanovllm_ray.kernels import jit

        blocks, step = self._profile_step()
        self._set_kv_cache(blocks)
        self.num_kv_blocks = blocks  # what warmup_steps() may write into
        with jit.compile_only() as mode:
            # The graphs' steps first: their kernels compile while the prefills after them pay what a first
            # varlen_attn call costs (Dynamo's imports, 1-3 s).
            self.capture_cuda_graphs(capture=False)
            for warm in self.warmup_steps():
                self.execute(warm)
            self.execute(step)
        torch.cuda.synchronize()
        self._free_kv_cache()
        self.prev_sampled, self.prev_rows, self.prev_in_graph = self.prev_sampled.new_zeros(0), 0, False
        self.clock.done("kernels compiled", f"{len(mode.future_kernels)} side by side")

    # ---- KV cache ------------------------------------------------------------------------------------------

    @property
    def block_bytes(self) -> int:
        """Bytes of K and V of one block over all layers, on this rank."""
        elem = torch.tensor([], dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * elem

    def _allocate_kv_cache(self) -> int:
        cfg = self.config
        if cfg.num_kvcache_blocks is not None:
            num_blocks = cfg.num_kvcache_blocks
        elif self.device.type == "cuda":
            num_blocks = self._profile_gpu_blocks()
        else:
            num_blocks = int(cfg.kv_cache_memory_gb * 2**30) // self.block_bytes
        # Never more than every running sequence at full length could use.
        useful = cfg.max_num_seqs * math.ceil(cfg.max_model_len / self.block_size) + 1
        num_blocks = min(num_blocks, useful)
        if num_blocks < 1:
            raise RuntimeError(f"no memory left for the KV cache ({self.block_bytes} bytes a block): lower "
                               "max_num_batched_tokens or raise gpu_memory_utilization")
        self._set_kv_cache(num_blocks)
        return num_blocks

    def resize_kv_cache(self, num_blocks: int) -> None:
        """Replace the KV pool with one of num_blocks blocks (ranks agree on the smallest); before graphs."""
        assert self.graphs is None, "CUDA graphs hold the old pool's addresses"
        self._free_kv_cache()  # the old pool first
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self._set_kv_cache(num_blocks)
        self.num_kv_blocks = num_blocks

    def _free_kv_cache(self) -> None:
        self.kv_cache = None
        for layer in self.attn_layers:  # they hold views of it
            layer.k_cache = layer.v_cache = torch.tensor([])

    def _set_kv_cache(self, num_blocks: int) -> None:
        # [2, num_layers, num_blocks, block_size, num_kv_heads, head_dim]
        self.kv_cache = torch.zeros(2, self.num_layers, num_blocks, self.block_size, self.num_kv_heads,
                                    self.head_dim, dtype=self.dtype, device=self.device)
        for i, layer in enumerate(self.attn_layers):
            layer.k_cache, layer.v_cache = self.kv_cache[0, i], self.kv_cache[1, i]

    def _profile_step(self) -> tuple[int, StepInput]:
        """The largest step (max_num_batched_tokens of prompts) and the KV blocks it writes."""
        cfg = self.config
        tokens = min(cfg.max_num_batched_tokens, cfg.max_num_seqs * cfg.max_model_len)
        seq_len = min(tokens, cfg.max_model_len)
        num_seqs = max(1, tokens // seq_len)
        blocks_per_seq = math.ceil(seq_len / self.block_size)
        tables = [list(range(s * blocks_per_seq, (s + 1) * blocks_per_seq)) for s in range(num_seqs)]
        step = StepInput.forward_only([[0] * seq_len] * num_seqs, [0] * num_seqs, tables, self.block_size,
                                      temperatures=[1.0] * num_seqs)
        return num_seqs * blocks_per_seq, step

    def _profile_gpu_blocks(self) -> int:
        """KV blocks that fit in gpu_memory_utilization of the card after a forward of the largest step."""
        cfg = self.config
        blocks, step = self._profile_step()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        self._set_kv_cache(blocks)
        self.execute(step)
        torch.cuda.synchronize()
        self._free_kv_cache()
        free, total = torch.cuda.mem_get_info()
        stats = torch.cuda.memory_stats()
        used = total - free
        peak, current = stats["allocated_bytes.all.peak"], stats["allocated_bytes.all.current"]
        available = int(total * cfg.gpu_memory_utilization) - used - (peak - current)
        return available // self.block_bytes

    def warmup(self) -> None:
        """On CUDA, compile before serving what the profile pass and graph capture leave out, so that no Triton
        JIT compile (~0.5-2 s each) lands in a request's step: see warmup_steps(). Before any request."""
        if self.device.type != "cuda":
            return
        for step in self.warmup_steps():
            self.execute(step)
        torch.cuda.synchronize()
        self.clock.done("warmed up", "kernels compiled")

    def warmup_steps(self) -> list[StepInput]:
        """A prefill chunk over a cached prefix (the paged prefill kernel) beside a plain prefill, and plain prefills,
        at token counts odd, even and a multiple of 16 (integer arguments are specialised on those); each samples
        greedy and random rows. They write into the first few KV blocks: run them before any request, while no block
        holds a cached prefix. Shapes that do not fit are left out."""
        bs, steps = self.block_size, []
        for lens in ((33, 40), (32, 32), (34,), (33,)):  # [plain prefill, chunk after a one-block prefix]
            starts = [0, bs][:len(lens)]
            ends = [s + n for s, n in zip(starts, lens)]
            sizes = [-(-e // bs) for e in ends]
            if max(ends) > self.config.max_model_len or sum(sizes) > self.num_kv_blocks:
                continue
            firsts = [0, sizes[0]][:len(lens)]
            tables = [list(range(f, f + n)) for f, n in zip(firsts, sizes)]
            steps.append(StepInput.forward_only([[0] * n for n in lens], starts, tables, bs,
                                                temperatures=[0.0, 1.0][:len(lens)]))
        return steps

    # ---- one step ------------------------------------------------------------------------------------------

    def prepare(self, step: StepInput) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        dev = self.device

        n, m, p = len(step.input_ids), len(step.seq_lens), len(step.pending_dst)
        packed, e = step.packed_ints()
        ints = _to_device(torch.from_numpy(packed), dev)
        input_ids, positions, slot_mapping = ints[:n], ints[e:e + n], ints[2 * e:2 * e + n]
        qsl, seq_lens = ints[3 * e:3 * e + m + 1].int(), ints[3 * e + m + 1:3 * e + 2 * m + 1].int()
        if p:  # tokens the previous step sampled, still on the device: no round trip through the driver
            tail = ints[3 * e + 2 * m + 1:]
            input_ids[tail[:p]] = self._prev_tokens()[tail[p:]]
        meta = AttentionMetadata(
            backend=self.backend,
            slot_mapping=slot_mapping,
            query_start_loc=qsl,
            seq_lens=seq_lens,
            block_tables=_to_device(step.padded_block_tables(), dev),
            max_query_len=max(step.query_lens),
            max_seq_len=max(step.seq_lens),
            query_lens_cpu=step.query_lens,
            seq_lens_cpu=step.seq_lens,
            is_decode_only=step.is_decode_only,
            no_cached_context=step.query_lens == step.seq_lens,
        )
        self.backend.prepare(meta)
        return input_ids, positions, meta

    def _prev_tokens(self) -> torch.Tensor:
        """The previous step's sampled tokens on every rank: rank 0 sampled them; with more ranks it broadcasts them
        (every rank saw the previous step, so every rank knows how many there are)."""
        if self.world_size == 1:
            return self.prev_sampled
        buf = (self.prev_sampled.long().contiguous() if self.rank == 0 else
               torch.empty(self.prev_rows, dtype=torch.int64, device=self.device))
        dist.broadcast(buf, src=0)
        return buf

    def sampling_tensors(self, step: StepInput) -> SamplingTensors:
        all_greedy = all(x == 0 for x in step.temperatures)
        if all_greedy:  # sample() reads none of the tensors
            floats, ks = torch.empty(3, 0), torch.empty(0, dtype=torch.int64)
        else:
            floats, ks = (_to_device(t, self.device) for t in step.sampling_arrays(self.vocab_size))
        return SamplingTensors(
            temperatures=floats[0], top_ks=ks, top_ps=floats[1], min_ps=floats[2],
            seeds=step.seeds,
            positions=[step.seq_lens[r] for r in step.sample_rows],
            all_greedy=all_greedy,
            any_greedy=any(x == 0 for x in step.temperatures),
            any_top_k=any(0 < k < self.vocab_size for k in step.top_ks),
            any_top_p=any(p < 1.0 for p in step.top_ps),
            any_min_p=any(p > 0 for p in step.min_ps),
            max_logprobs=step.max_logprobs,
        )

    def _hidden(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        if self.graphs is not None and meta.is_decode_only and self.graphs.can_run(meta.num_seqs):
            return self.graphs.run(input_ids, positions, meta.slot_mapping, meta.seq_lens, meta.block_tables,
                                   meta.seq_lens_cpu)
        pg = self.prefill_graphs
        if pg is not None and not meta.is_decode_only and pg.can_run(input_ids.shape[0], meta.num_seqs):
            return pg.run(input_ids, positions, meta)
        return self.model(input_ids, positions, meta)

    @torch.inference_mode()
    def run_model(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                  step: StepInput) -> torch.Tensor | None:
        hidden = self._hidden(input_ids, positions, meta)
        if not step.sample_rows:
            return None
        ends = meta.query_start_loc[1:].long() - 1
        rows = _to_device(torch.tensor(step.sample_rows, dtype=torch.int64), self.device)  # pinned: no stream sync
        return self.model.compute_logits(hidden[ends[rows]])

    @torch.inference_mode()
    def execute(self, step: StepInput) -> StepOutput | None:
        out = self.execute_async(step)
        return out.result() if out is not None else None

    @torch.inference_mode()
    def execute_async(self, step: StepInput) -> PendingOutput | None:
        """Launch the step; rank 0 gets a handle whose result() waits for the sampled tokens (copied to the host
        without blocking), other ranks None. The sampled tokens stay on the device for the next step."""
        g = self.graphs
        if g is not None and step.is_decode_only and g.can_run(len(step.seq_lens)):
            out = self._execute_graph(step)
            if out is None:
                return None
            # Sampled in the graph: its last kernel put the tokens in the host ring, no copy needed.
            return g.pending(len(step.seq_lens)) if self.prev_in_graph and g.ring is not None else self._finish(out)
        input_ids, positions, meta = self.prepare(step)
        self.prev_rows = len(step.sample_rows)  # for the next step's _prev_tokens()
        self.prev_in_graph = False  # on every rank: the next step's ranks must agree on broadcasting
        logits = self.run_model(input_ids, positions, meta, step)
        if self.rank != 0:
            return None
        if logits is None:
            return PendingOutput(StepOutput([]))
        out = sample(logits, self.sampling_tensors(step))
        self.prev_sampled = out.token_ids
        return self._finish(out)

    def _execute_graph(self, step: StepInput) -> SamplerOutput | None:
        """A decode step replayed whole: inputs, model, LM head and, for temperature-only requests, sampling (on
        every rank, which then holds the tokens). Others sample on rank 0 from the logits: the graph's, or with
        several ranks the slices gathered from its hidden states. Rank 0 gets the output, other ranks None."""
        g, n = self.graphs, len(step.seq_lens)
        prev = None if self.prev_in_graph or not step.pending_dst else self._prev_tokens()
        self.prev_rows = len(step.sample_rows)
        bs = g.launch(step, prev)
        every_row = len(step.sample_rows) == n
        self.prev_in_graph = every_row and _temperature_only(step)  # alike on every rank: the step says
        if not self.prev_in_graph:  # with several ranks, gathering the logits is collective
            rows = slice(n) if every_row else torch.tensor(step.sample_rows, device=self.device)
            logits = g.logits[rows] if self.world_size == 1 else self.model.compute_logits(g.hidden[bs][rows])
        if self.rank != 0:
            return None
        out = SamplerOutput(g.tokens[:n]) if self.prev_in_graph else sample(logits, self.sampling_tensors(step))
        self.prev_sampled = out.token_ids
        return out

    def _finish(self, out: SamplerOutput) -> PendingOutput:
        """Copy the sampled tokens (and logprobs) to the host without blocking; result() waits for them."""
        tensors = [out.token_ids] + ([out.logprobs] if out.logprobs is not None else []) + (
            [out.top_ids, out.top_logprobs] if out.top_ids is not None else [])
        if self.device.type == "cuda":
            host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
            for h, t in zip(host, tensors):
                h.copy_(t, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
            tensors = host
        else:
            done = None

        def fetch() -> StepOutput:
            if done is not None:
                done.synchronize()
            result = StepOutput(tensors[0].tolist())
            if len(tensors) > 1:
                result.logprobs = tensors[1].tolist()
            if len(tensors) > 2:
                result.top_ids, result.top_logprobs = tensors[2].tolist(), tensors[3].tolist()
            return result

        return PendingOutput(fetch=fetch)

    @torch.inference_mode()
    def measure_decode_graph(self, num_seqs: int, iters: int = 20, profile: bool = False) -> tuple[float, str]:
        """Seconds per replay of the decode graph for num_seqs rows, back to back: the device's time for a whole
        decode step (model, LM head, sampling, all-reduces) without the host's. Its rows are padding rows (one token
        of context, no KV written). With several ranks every rank calls it at once. profile: also the top kernels of
        a few replays (torch.profiler's table). Between requests only: it overwrites the graphs' token buffer."""
        g = self.graphs
        if g is None:
            return 0.0, ""
        bs = g.padded(num_seqs)
        g._reset_padding(bs)
        graph = g.graphs[bs]
        graph.replay()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(iters):
            graph.replay()
        torch.cuda.synchronize()
        seconds = (time.perf_counter() - t) / iters
        table = cuda_kernel_table(profile_cuda(graph.replay)) if profile else ""
        self.prev_in_graph = False
        return seconds, table

    @torch.inference_mode()
    def forward_logits(self, step: StepInput) -> torch.Tensor:
        """Logits of every token of the step, through the same path as execute() (CUDA graphs for decode)."""
        input_ids, positions, meta = self.prepare(step)
        return self.model.compute_logits(self._hidden(input_ids, positions, meta))


def _temperature_only(step: StepInput) -> bool:
    """The step's sampling fits the graph's sampler: no top-k/top-p/min-p, seeds or logprobs."""
    return (step.max_logprobs is None and all(k <= 0 for k in step.top_ks) and all(p >= 1.0 for p in step.top_ps)
            and all(p <= 0.0 for p in step.min_ps) and all(s is None for s in step.seeds))


def _to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cpu":
        return x
    return x.pin_memory().to(device, non_blocking=True)
