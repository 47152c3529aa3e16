"""One tensor-parallel rank as a Ray actor: joins the process group, then owns a ModelRunner (its shard, KV
blocks and, on GPU, CUDA graphs). The class is plain Python; ray_executor.py makes it an actor."""

from __future__ import annotations

import logging
import os
import socket
import time

import torch

from nanovllm_ray.config import Config
from nanovllm_ray.executor.step import StepInput, StepOutput
from nanovllm_ray.layers.parallel import all_reduce, close_all_reduce, init_all_reduce

logger = logging.getLogger(__name__)


class TPWorker:
    def __init__(self, config: Config, rank: int, world_size: int) -> None:
        self.config, self.rank, self.world_size = config, rank, world_size
        self.runner = None
        self.pending = None  # rank 0: the last launched step's output, returned with the next call
        self.all_reduce_path = "none"

    def address(self) -> tuple[str, int]:
        """An address and a free port on this node for the process group's rendezvous (asked of rank 0)."""
        import ray

        ip = ray.util.get_node_ip_address()
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("", 0))
            return ip, s.getsockname()[1]

    def init(self, addr: str, port: int, use_gpu: bool) -> tuple[int, int]:
        """Join the group, build this rank's shard and KV cache; returns (num_kv_blocks, block_bytes), the
        block count already agreed across ranks (the smallest)."""
        import torch.distributed as dist

        from nanovllm_ray.executor.model_runner import ModelRunner

        if use_gpu:
            os.environ["NCCL_NVLS_ENABLE"] = "0"  # NVLink multicast stays off on the lent machines
            torch.cuda.set_device(0)  # Ray sets CUDA_VISIBLE_DEVICES to this actor's one GPU
        # Layers read the TP rank and size when they are built: the group must exist before the ModelRunner.
        dist.init_process_group(backend="nccl" if use_gpu else "gloo", init_method=f"tcp://{addr}:{port}",
                                rank=self.rank, world_size=self.world_size)
        # Before the model and its CUDA graphs: they capture the fast all-reduce's buffer address.
        lamport = None
        if use_gpu and self.config.fused_all_reduce_norm:
            from nanovllm_ray.executor.model_runner import resolve_dtype

            lamport = (self.config.hf_config["hidden_size"], resolve_dtype(self.config, torch.device("cuda")))
        self.all_reduce_path = init_all_reduce(self.config.fast_all_reduce, lamport=lamport)
        logger.info("rank %d of %d: all-reduce through %s", self.rank, self.world_size, self.all_reduce_path)
        # CUDA graphs bake in the KV cache's addresses: build without them, agree on the block count, then capture.
        self.runner = runner = ModelRunner(self.config, defer_graphs=True)
        # Every rank must hold the same number of blocks: the driver's block ids index all of them. Rank 0 gathers
        # the logits, so its profile can leave it fewer blocks than the others.
        n = torch.tensor([runner.num_kv_blocks], dtype=torch.int64, device=runner.device)
        dist.all_reduce(n, op=dist.ReduceOp.MIN)
        agreed = int(n.item())
        if agreed != runner.num_kv_blocks:
            runner.resize_kv_cache(agreed)
        runner.warmup()  # collectives: after the agreement, so that every rank runs the same steps
        runner.capture_cuda_graphs()
        return agreed, runner.block_bytes

    def execute(self, step: StepInput | None) -> StepOutput | None:
        """Launch one step on this rank and return the sampled tokens of the step launched before it (rank 0; the
        others None): the device starts this step before the host waits for the last one, so no step waits for
        the result of the one before to travel back to the driver and the next step to come. None launches nothing
        and returns what is still held (the driver's flush; a no-op when nothing is: measures dispatch)."""
        out = self.runner.execute_async(step) if step is not None else None
        prev, self.pending = self.pending, out
        return prev.result() if prev is not None else None

    def forward_logits(self, step: StepInput) -> torch.Tensor | None:
        """Logits of every token of the step (teacher-forced tests): run on every rank, rank 0 returns them on the
        CPU, the others None."""
        logits = self.runner.forward_logits(step)
        return logits.cpu() if self.rank == 0 else None

    def measure_allreduce(self, num_tokens: int, calls: int, iters: int = 20) -> float:
        """Seconds for `calls` back-to-back all-reduces of [num_tokens, hidden] activations in the model's dtype:
        a step's communication without its compute, through the layers' all_reduce (the fast path where it is set
        up). Run on every rank at once. On GPU the burst is one CUDA graph, as a decode step runs."""
        runner = self.runner
        x = torch.zeros(num_tokens, self.config.hf_config["hidden_size"], dtype=runner.dtype, device=runner.device)

        def burst() -> None:
            for _ in range(calls):
                all_reduce(x)  # zeros stay zeros

        burst()  # warm-up (and on gloo every rank has arrived; on NCCL the synchronize below waits for them)
        run, graph = burst, None
        if runner.device.type == "cuda":
            graph = torch.cuda.CUDAGraph()
            # thread_local: the compiled graph's loop waits on its own thread meanwhile
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                burst()
            run = graph.replay
            run()
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(iters):
            run()
        if graph is not None:
            torch.cuda.synchronize()
        return (time.perf_counter() - t) / iters

    def measure_decode_graph(self, num_seqs: int, iters: int = 20, profile: bool = False) -> tuple[float, str]:
        """ModelRunner.measure_decode_graph on this rank (every rank at once: the graphs hold collectives)."""
        return self.runner.measure_decode_graph(num_seqs, iters, profile)

    def shutdown(self) -> None:
        import torch.distributed as dist

        self.runner = None
        close_all_reduce()
        if dist.is_initialized():
            dist.destroy_process_group()
