"""A fast all-reduce for decode-sized messages: one-shot or two-shot over peer-accessible (symmetric) memory.

NCCL takes 14-18 us for an all-reduce of any size up to 128 KiB on two H200s (in a CUDA graph), and a decode step
of Qwen3-8B runs 2 x 36 + 1 of them; torch's one-shot kernel takes 6-7 us. Here every rank owns one buffer of
torch's symmetric memory (`torch.distributed._symmetric_memory`), mapped into every peer's address space once,
after the process group starts. An all-reduce then is one or two kernels of torch's `symm_mem` ops, captured in
CUDA graphs like any kernel:

- one-shot: each rank copies its input into its buffer, the ranks meet at a barrier of flags in peer memory, and
  each rank reads all N buffers and sums them into its output. Every rank reads (N - 1) x the message: the fewest
  steps, the most traffic; best for small messages.
- two-shot: the input copied into the buffer, then a reduce-scatter (each rank sums 1/N of the message from all
  buffers) and an all-gather of the sums, with barriers between. 2 (N - 1) / N x the message read per rank; for
  larger messages (above 1 MiB on two H200s, where it also beats NCCL up to the 8 MiB buffer).

Ahead of both, where the engine sets it up (`create_lamport`, setting fused_all_reduce_norm): the sentinel
all-reduce of kernels/allreduce_norm.py, one kernel without a barrier (2.8 us at 8 KiB, 9.3 us at 2 MiB on two
H200s), also fused with the residual add and RMSNorm after a row-parallel layer; up to LAMPORT_MAX_BYTES.

`choose_algo` picks by message size and N. Larger messages than the buffer, dtypes the ops lack (float16), a group
that is not all on one host with P2P access between every pair of GPUs, or the CPU: NCCL or gloo, as before
(nanovllm_ray.layers.parallel.all_reduce decides). NVLink multicast (the multimem ops) is never used: it stays off
on the lent machines, and the symmetric memory is made without multicast objects.
"""

from __future__ import annotations

import logging
import os
import socket

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 8 << 20  # the buffer: 8 MiB holds a decode step of 1024 tokens of a 4096-wide bf16 model
# One-shot up to this message size for N ranks, two-shot above. Two H200s (benchmarks/allreduce_bench.py, in CUDA
# graphs, us): 8 KiB one-shot 6.7, two-shot 10.1, NCCL 15.1; 1 MiB 14.6, 15.6, 24.6; 2 MiB 21.4, 19.2, 37.7;
# 8 MiB 63.1, 41.5, 52.5. With more ranks one-shot reads (N - 1) x the message per rank against two-shot's
# 2 (N - 1) / N x, so it stops paying sooner: the sizes for 4 and 8 are vLLM's custom all-reduce's, not measured.
ONE_SHOT_MAX_BYTES = {2: 1 << 20, 4: 512 << 10, 8: 256 << 10}
# The sentinel all-reduce (kernels/allreduce_norm.py), which the layers take first, up to this message size for N
# ranks: each rank pushes the whole message to every peer, and its buffer holds 2 x N of them. Two H200s (in CUDA
# graphs, us): 8 MiB 32.6 against two-shot's 42.1; 16 MiB 67.3 against 72.6, not taken for a 64 MiB buffer. The
# sizes for 4 and 8 ranks, where a rank pushes 3 or 7 x the message, are guesses, not measured.
LAMPORT_MAX_BYTES = {2: 8 << 20, 4: 1 << 20, 8: 512 << 10}
TWO_SHOT_WORLD_SIZES = (2, 4, 8)  # torch's two-shot kernel with a separate output is compiled for these
DTYPES = (torch.bfloat16, torch.float32)  # what torch's symm_mem all-reduce kernels are compiled for
ALIGN = 16  # bytes: the kernels' vector width; the buffer view and the input must agree on alignment


def choose_algo(nbytes: int, world_size: int, max_bytes: int) -> str:
    """'one_shot', 'two_shot' or 'nccl' for an all-reduce of `nbytes` over `world_size` ranks with a buffer of
    `max_bytes`. The same on every rank for the same message, as it must be: ranks that chose differently would
    each wait for the other forever."""
    if world_size < 2 or nbytes <= 0 or nbytes > max_bytes or nbytes % ALIGN:
        return "nccl"
    return "one_shot" if nbytes <= ONE_SHOT_MAX_BYTES.get(world_size, 256 << 10) else "two_shot"


class SymmMemAllReduce:
    """One symmetric buffer of `max_bytes` per rank, rendezvoused across `group`; all_reduce_ sums a tensor in
    place through it. Make it with `create` (which checks the group can use it) on every rank at once."""

    def __init__(self, group: dist.ProcessGroup, device: torch.device, max_bytes: int) -> None:
        import torch.distributed._symmetric_memory as symm_mem

        self.group, self.device, self.max_bytes = group, device, max_bytes
        self.world_size, self.rank = group.size(), group.rank()
        self.group_name = group.group_name
        self.buffer = symm_mem.empty(max_bytes, dtype=torch.uint8, device=device)  # [max_bytes], any dtype viewed
        self.buffer.zero_()
        self.handle = symm_mem.rendezvous(self.buffer, self.group_name)  # collective: maps every peer's buffer here
        self.ops = torch.ops.symm_mem
        # The copy-in fused into the one-shot kernel (torch >= 2.8); else a separate copy.
        self.fused_copy = hasattr(self.ops, "one_shot_all_reduce_copy_out")
        torch.cuda.synchronize(device)  # the zeroed buffer, before any peer reads it

    def eligible(self, x: torch.Tensor) -> bool:
        return (x.is_cuda and x.dtype in DTYPES and x.is_contiguous() and x.data_ptr() % ALIGN == 0
                and choose_algo(x.numel() * x.element_size(), self.world_size, self.max_bytes) != "nccl")

    def all_reduce_(self, x: torch.Tensor, algo: str | None = None) -> torch.Tensor:
        """x <- the sum of x over the ranks (x eligible); algo forces 'one_shot' or 'two_shot' (benchmarks)."""
        nbytes = x.numel() * x.element_size()
        algo = algo or choose_algo(nbytes, self.world_size, self.max_bytes)
        buf = self.buffer[:nbytes].view(x.dtype).view(x.shape)  # this rank's slot, read by every peer
        if algo == "one_shot":
            if self.fused_copy:
                # Copies x into buf, barrier, sums the N buffers into x: each thread writes back the elements it
                # copied in, so x may be both the input and the output.
                self.ops.one_shot_all_reduce_copy_out(buf, x, "sum", self.group_name, x)
            else:
                buf.copy_(x)
                self.ops.one_shot_all_reduce_out(buf, "sum", self.group_name, x)
        elif algo == "two_shot":
            buf.copy_(x)
            if self.world_size in TWO_SHOT_WORLD_SIZES:
                self.ops.two_shot_all_reduce_out(buf, "sum", self.group_name, x)
            else:  # the in-place kernel is compiled for any N
                self.ops.two_shot_all_reduce_(buf, "sum", self.group_name)
                x.copy_(buf)
        else:
            raise ValueError(f"algo={algo!r} must be one_shot or two_shot")
        return x

    def close(self) -> None:
        self.handle = self.buffer = None


def create(group: dist.ProcessGroup, max_bytes: int = DEFAULT_MAX_BYTES) -> tuple[SymmMemAllReduce | None, str]:
    """The fast all-reduce for `group`, or None and why not. Collective: every rank of the group calls it after
    init_process_group, and the ranks agree after each check, so that all take the same path (a rank on NCCL and
    one on symmetric memory would wait for each other forever)."""
    backend = dist.get_backend(group)
    if backend != "nccl" or not torch.cuda.is_available():
        return None, "the fast path needs NCCL on CUDA"
    if group.size() < 2:
        return None, "one rank"
    device = torch.device("cuda", torch.cuda.current_device())
    ok, why, same_ordinals = _peers_accessible(group, device)
    if not _agree(ok, group, device):
        return None, why or "no P2P access on another rank"
    # No multicast object with the buffer: multicast stays off on the lent machines (a program that uses it can put
    # the host's GPUs out of service), and no op here needs it. Read when the buffer is made.
    os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"
    if same_ordinals:
        # Ray gives each rank actor one GPU through CUDA_VISIBLE_DEVICES, so every rank calls its GPU cuda:0, and
        # torch's rendezvous refuses ranks whose device numbers coincide (it takes them for ranks sharing a GPU).
        # _peers_accessible saw distinct GPUs; the buffers map by their handles, not by these numbers. The switch
        # also skips multicast, which stays off anyway.
        os.environ["TORCH_SYMM_MEM_ALLOW_OVERLAPPING_DEVICES"] = "1"
    fast = None
    try:
        _use_cuda_ipc_backend()
        fast = SymmMemAllReduce(group, device, max_bytes)
        _check_sums(fast)
    except Exception as e:  # an op missing in this torch, no P2P mapping, a wrong sum: NCCL it is
        why = f"symmetric memory failed: {type(e).__name__}: {e}"
        logger.warning("fast all-reduce: %s", why)
        if fast is not None:
            fast.close()
        fast = None
    if not _agree(fast is not None, group, device):
        if fast is not None:
            fast.close()
        return None, why or "symmetric memory failed on another rank"
    return fast, f"one/two-shot over symmetric memory ({max_bytes >> 20} MiB buffer), NCCL above"


def create_lamport(group: dist.ProcessGroup, hidden: int, dtype: torch.dtype, max_bytes: int | None = None):
    """The sentinel all-reduce (kernels/allreduce_norm.py), alone and fused with the residual add and RMSNorm, for
    [rows, hidden] messages of a 16-bit dtype up to max_bytes (default LAMPORT_MAX_BYTES for the group's size), or
    None and why not. Collective, after `create` succeeded on every rank; the ranks agree, and sums are checked
    against NCCL's before they are trusted."""
    if dtype.itemsize != 2 or not dtype.is_floating_point:  # the same model dtype on every rank
        return None, f"sentinel all-reduce off (it takes 16-bit floats, not {dtype})"
    device = torch.device("cuda", torch.cuda.current_device())
    fused, why = None, ""
    if max_bytes is None:
        max_bytes = LAMPORT_MAX_BYTES.get(group.size(), 256 << 10)
    try:
        from nanovllm_ray.kernels.allreduce_norm import LamportAllReduce

        fused = LamportAllReduce(group, device, hidden, max(1, max_bytes // (hidden * dtype.itemsize)), dtype)
        _check_lamport(fused, group, device)
    except Exception as e:  # no Triton, a kernel that does not compile, a wrong sum
        why = f"{type(e).__name__}: {e}"
        logger.warning("sentinel all-reduce: %s", why)
        fused = None
    if not _agree(fused is not None, group, device):
        return None, f"sentinel all-reduce off ({why or 'failed on another rank'})"
    return fused, f"sentinel all-reduce (+ residual + RMSNorm) up to {fused.max_rows} rows"


def _check_lamport(fused, group: dist.ProcessGroup, device: torch.device) -> None:
    """The kernel against NCCL's sum and the unfused add + RMSNorm, at 1 row and the most, fused and alone (both
    slots of its buffer)."""
    from nanovllm_ray.layers.ops import add_rms_norm

    g = torch.Generator(device=device).manual_seed(1234 + fused.rank)
    weight = torch.rand(fused.hidden, generator=torch.Generator(device=device).manual_seed(7), device=device)
    weight = weight.to(fused.dtype)
    for rows in (1, fused.max_rows):
        x = torch.randn(rows, fused.hidden, generator=g, device=device).to(fused.dtype)
        residual = torch.randn(rows, fused.hidden, generator=torch.Generator(device=device).manual_seed(rows),
                               device=device).to(fused.dtype)
        total = x.clone()
        dist.all_reduce(total, group=group)
        want, want_res = add_rms_norm(total, residual, weight, 1e-6)
        got, got_res = fused.add_rms_norm(x, residual, weight, 1e-6)
        if not (torch.allclose(got_res.float(), want_res.float(), rtol=2e-2, atol=2e-2)
                and torch.allclose(got.float(), want.float(), rtol=2e-2, atol=5e-2)):
            raise RuntimeError(f"the fused sentinel all-reduce gave a wrong result at {rows} rows")
        if not torch.allclose(fused.all_reduce_(x).float(), total.float(), rtol=2e-2, atol=2e-2):
            raise RuntimeError(f"the sentinel all-reduce gave a wrong sum at {rows} rows")


def _use_cuda_ipc_backend() -> None:
    """Buffers through CUDA IPC, torch's default (NVSHMEM would bring its own bootstrap and memory pool). The
    backend cannot change once a buffer exists: then the one in use stays."""
    import torch.distributed._symmetric_memory as symm_mem

    try:
        symm_mem.set_backend("CUDA")
    except (AttributeError, RuntimeError):
        pass


def _check_sums(fast: SymmMemAllReduce) -> None:
    """A sum through each kernel before trusting it: rank r adds r + 1 everywhere."""
    n = fast.world_size
    for algo, numel in (("one_shot", 4096), ("two_shot", fast.max_bytes // 2)):
        x = torch.full((numel,), fast.rank + 1.0, dtype=torch.bfloat16, device=fast.device)
        fast.all_reduce_(x, algo)
        if not bool((x == n * (n + 1) / 2).all()):
            raise RuntimeError(f"{algo} all-reduce gave a wrong sum")


def _agree(ok: bool, group: dist.ProcessGroup, device: torch.device) -> bool:
    """True where every rank said ok."""
    flag = torch.tensor([int(ok)], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    return bool(flag.item())


def _peers_accessible(group: dist.ProcessGroup, device: torch.device) -> tuple[bool, str, bool]:
    """(ok, why not, whether ranks number their GPUs alike): whether the group's GPUs are distinct GPUs of one host
    with P2P access between every pair, as far as NVML tells (it sees every GPU of the host, whatever
    CUDA_VISIBLE_DEVICES says: a Ray rank sees only its own). Where NVML cannot tell, the buffer's mapping and the
    checked sums in `create` decide."""
    mine = (socket.gethostname(), str(torch.cuda.get_device_properties(device).uuid), device.index)
    ranks: list = [None] * group.size()
    dist.all_gather_object(ranks, mine, group=group)
    same_ordinals = len({ordinal for _, _, ordinal in ranks}) < len(ranks)
    if len({host for host, _, _ in ranks}) > 1:
        return False, "ranks on several hosts", same_ordinals
    uuids = [u if u.startswith("GPU-") else f"GPU-{u}" for _, u, _ in ranks]
    if len(set(uuids)) < len(uuids):
        return False, "ranks share a GPU", same_ordinals
    try:
        import pynvml
    except ImportError:
        return True, "", same_ordinals
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return True, "", same_ordinals
    try:
        handles = [pynvml.nvmlDeviceGetHandleByUUID(u) for u in uuids]
        for i, a in enumerate(handles):
            for j, b in enumerate(handles):
                # 0, 0: NVML_P2P_CAPS_INDEX_READ and NVML_P2P_STATUS_OK in nvml.h (some pynvml releases wrap the
                # index constant in a type their own ctypes call does not take)
                if i != j and pynvml.nvmlDeviceGetP2PStatus(a, b, 0) != 0:
                    return False, f"no P2P access from GPU {uuids[i]} to {uuids[j]}", same_ordinals
    except Exception as e:  # an NVML or pynvml that cannot answer: the mapping and the checked sums decide
        logger.info("fast all-reduce: NVML cannot check P2P access (%s: %s)", type(e).__name__, e)
    finally:
        pynvml.nvmlShutdown()
    return True, "", same_ordinals
