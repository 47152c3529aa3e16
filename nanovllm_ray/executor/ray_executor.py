"""Tensor-parallel ranks as Ray actors, one per bundle of a placement group, driven each step by a compiled
Ray graph (or plain remote calls).

The driver (the engine's process) sends every rank the same StepInput; each rank runs its shard, the ranks
all-reduce through NCCL (gloo on CPU), and rank 0 samples and returns the StepOutput. With async scheduling the
driver sends step t+1 before it reads step t's tokens: rank 0 broadcasts them to the other ranks at the start of
step t+1. Inside a Ray Serve replica
the workers go into the replica's own placement group (bundle i for rank i); elsewhere the executor makes one.
"""

from __future__ import annotations

import logging
import time
from collections import deque

import torch

from nanovllm_ray.config import Config
from nanovllm_ray.executor.base import Executor
from nanovllm_ray.executor.step import PendingOutput, StepInput, StepOutput
from nanovllm_ray.executor.worker import TPWorker

logger = logging.getLogger(__name__)

class RayExecutor(Executor):
    supports_async = True  # rank 0 keeps its sampled tokens on the device and broadcasts them to the others

    def __init__(self, config: Config, placement_group=None, init_timeout_s: float = 600.0) -> None:
        import ray
        from ray.util.placement_group import get_current_placement_group, remove_placement_group
        from ray.util.placement_group import placement_group as make_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        worker_num_cpus = config.worker_num_cpus
        if not ray.is_initialized():
            ray.init()
        self.config = config
        world = config.tensor_parallel_size
        self._owned_pg = None
        self._dag = None
        self.workers: list = []
        self._outstanding: deque = deque()  # (refs of a call, the slot whose output it returns or None), in order
        self._last: _Slot | None = None  # the last launched step, whose output the ranks hold
        pg = placement_group or get_current_placement_group()
        if pg is None:
            use_gpu = _wants_gpu(config, ray.cluster_resources().get("GPU", 0) >= 1)
            bundle = {"CPU": worker_num_cpus, **({"GPU": 1} if use_gpu else {})}
            pg = self._owned_pg = make_placement_group([dict(bundle) for _ in range(world)], strategy="STRICT_PACK")
            if not _ready(pg, init_timeout_s):
                remove_placement_group(pg)
                raise RuntimeError(f"cannot place {world} ranks of {bundle} within {init_timeout_s:.0f} s; the "
                                   f"cluster has {ray.cluster_resources()}")
        specs = pg.bundle_specs
        if len(specs) < world:
            raise ValueError(f"tensor_parallel_size={world} needs {world} bundles; the placement group has "
                             f"{len(specs)}: {specs}")
        use_gpu = _wants_gpu(config, all(s.get("GPU", 0) >= 1 for s in specs[:world]))
        self.use_gpu = use_gpu
        # A compiled graph's rank waits for its next step in a sched_yield loop (Ray's shared-memory channel read):
        # a core per rank, idle or not. Worth it beside a GPU step; on CPU ranks it starves the steps themselves.
        dispatch = config.dispatch if config.dispatch != "auto" else "compiled" if use_gpu else "remote"
        self.dispatch = dispatch
        actor = ray.remote(TPWorker)
        try:
            for rank in range(world):
                # Each rank in its own bundle: on GPU the bundle's one GPU becomes the actor's.
                self.workers.append(actor.options(
                    num_cpus=min(worker_num_cpus, specs[rank].get("CPU", 0)),
                    num_gpus=1 if use_gpu else 0,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(
                        placement_group=pg, placement_group_bundle_index=rank,
                        placement_group_capture_child_tasks=True),
                    runtime_env={"env_vars": {"NCCL_NVLS_ENABLE": "0"}} if use_gpu else None,
                ).remote(config, rank, world))
            addr, port = ray.get(self.workers[0].address.remote(), timeout=init_timeout_s)
            infos = ray.get([w.init.remote(addr, port, use_gpu) for w in self.workers], timeout=init_timeout_s)
        except BaseException:
            self.shutdown()
            raise
        assert len(set(infos)) == 1, f"ranks disagree on the KV cache: {infos}"
        self.num_kv_blocks, self.block_bytes = infos[0]
        self.device = "cuda" if use_gpu else "cpu"
        if dispatch == "compiled":
            from ray.dag import InputNode, MultiOutputNode

            with InputNode() as step:
                dag = MultiOutputNode([w.execute.bind(step) for w in self.workers])
            self._dag = dag.experimental_compile()
        logger.info("RayExecutor: %d ranks (%s, %s dispatch), %d KV blocks", world, "nccl" if use_gpu else "gloo",
                    dispatch, self.num_kv_blocks)

    def execute(self, step: StepInput) -> StepOutput:
        return self.execute_async(step).result()

    def execute_async(self, step: StepInput) -> PendingOutput:
        """Send the step to every rank and return at once: the driver schedules the next step meanwhile. A rank
        returns a step's tokens with the call after it (TPWorker.execute), so a step's result comes with the next
        step's call, or with a flush call when the driver asks for it before sending another step."""
        self._outstanding.append((self._call(step), self._last))
        slot = self._last = _Slot()
        return PendingOutput(fetch=lambda: self._fetch(slot))

    def _call(self, step: StepInput | None) -> list:
        return self._dag.execute(step) if self._dag is not None else [w.execute.remote(step) for w in self.workers]

    def _fetch(self, slot: _Slot) -> StepOutput:
        """The output of slot's step: read the calls sent since, in order, until the one that carries it."""
        import ray

        while not slot.done:
            if not self._outstanding:  # nothing sent after it: ask the ranks for what they hold
                self._outstanding.append((self._call(None), self._last))
                self._last = None
            refs, owner = self._outstanding.popleft()
            value = ray.get(refs)[0]
            if owner is not None:
                owner.value, owner.done = value, True
        return slot.value

    def forward_logits(self, step: StepInput) -> torch.Tensor:
        """Logits of every token of the step, from rank 0 (every rank runs it; CUDA graphs for decode): for
        teacher-forced comparisons. Plain remote calls: the compiled graph's loop runs on another thread."""
        import ray

        return ray.get([w.forward_logits.remote(step) for w in self.workers])[0]

    def measure_allreduce(self, num_tokens: int, calls: int, iters: int = 20) -> float:
        """Seconds for `calls` all-reduces of [num_tokens, hidden] activations on the ranks (the slowest rank's)."""
        import ray

        return max(ray.get([w.measure_allreduce.remote(num_tokens, calls, iters) for w in self.workers]))

    def measure_decode_graph(self, num_seqs: int, iters: int = 20, profile: bool = False) -> tuple[float, str]:
        """Seconds per decode-graph replay on the ranks (the slowest rank's), and rank 0's kernel table."""
        import ray

        res = ray.get([w.measure_decode_graph.remote(num_seqs, iters, profile) for w in self.workers])
        return max(r[0] for r in res), res[0][1]

    def measure_dispatch(self, n: int = 200, warmup: int = 20) -> float:
        """Seconds per no-op step sent to every rank and back: the executor's own cost beside a model step. With no
        step in flight (what the ranks hold is read first)."""
        import ray

        if self._last is not None:
            self._fetch(self._last)
        for _ in range(warmup):
            ray.get(self._call(None))
        t = time.perf_counter()
        for _ in range(n):
            ray.get(self._call(None))
        return (time.perf_counter() - t) / n

    def shutdown(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        if self._dag is not None:
            try:
                self._dag.teardown()
            except Exception as e:  # a dead actor makes teardown raise; the actors are killed below anyway
                logger.warning("compiled graph teardown: %s", e)
            self._dag = None
        for w in self.workers:
            try:
                ray.kill(w)
            except Exception:  # already gone
                pass
        self.workers = []
        if self._owned_pg is not None:
            remove_placement_group(self._owned_pg)
            self._owned_pg = None

    def __del__(self) -> None:
        # Serve tears replicas down without calling the engine's shutdown; let the actors go with the driver.
        try:
            if self.workers:
                self.shutdown()
        except Exception:
            pass


class _Slot:
    """A launched step's output, once a later call to the ranks has brought it back."""

    __slots__ = ("done", "value")

    def __init__(self) -> None:
        self.done, self.value = False, None


def _wants_gpu(config: Config, have_gpus: bool) -> bool:
    if config.device == "cuda" and not have_gpus:
        raise RuntimeError("device='cuda' was asked for, but the placement has no GPU for each rank")
    return config.device == "cuda" or (config.device == "auto" and have_gpus)


def _ready(pg, timeout_s: float) -> bool:
    import ray

    try:
        ray.get(pg.ready(), timeout=timeout_s)
        return True
    except ray.exceptions.GetTimeoutError:
        return False
