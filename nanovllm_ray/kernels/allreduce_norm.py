"""One kernel for a row-parallel layer's all-reduce, the residual add and the RMSNorm after it (decode-sized
messages, ranks of one host with P2P access), in place of torch's one-shot all-reduce and the fused add + RMSNorm:
one launch and one barrier instead of two launches and the one-shot kernel's two barriers.

Each rank owns a data buffer of two halves and a flag array, both in symmetric memory (every peer maps them). Rows go
to programs by row % NPROG, at fixed addresses, so a given address is only ever touched by the same program on every
rank. Program p of a call with epoch e (its own counter, kept on the device, one more each call it runs):

1. copies its rows of this rank's partial sums into half e % 2 of its own buffer;
2. sets flags[p, this rank] = e in every peer's flag array (release, system scope), and waits until its own
   flags[p, q] has reached e for every peer q (acquire);
3. sums the rows over all ranks' buffers in rank order (so every rank computes the same bits), rounds the sum to the
   model dtype as an all-reduce would, adds the residual (rounded), and writes it as the new residual and its RMSNorm
   as the output.

Two halves make one barrier a call enough: a rank writes half e % 2 again at e + 2, after every peer signalled e + 1,
which each did after it had read its rows of e. A peer may be one epoch ahead when this rank waits, never two, so the
wait compares by signed difference (epochs wrap). On 2 x H200 (qwen3-8b, tp=2, 2026-11-30) it took batch-1 TPOT from
3.663 to 3.422 ms; tests/gpu/test_all_reduce_gpu.py checks it against NCCL + add_rms_norm, in and out of CUDA graphs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nanovllm_ray.kernels import pdl

NPROG = 32  # programs at most; rows beyond go round-robin


@triton.jit
def _allreduce_add_rms_norm_kernel(
    x_ptr,  # [n, H] this rank's partial sums (model dtype)
    residual_ptr,  # [n, H]
    weight_ptr,  # [H]
    out_ptr,  # [n, H] RMSNorm(sum + residual) * weight
    res_out_ptr,  # [n, H] sum + residual (may be residual_ptr)
    buf_ptrs_ptr,  # [W] int64: every rank's data buffer
    flag_ptrs_ptr,  # [W] int64: every rank's flags, int32 [NPROG, W]
    epoch_ptr,  # [NPROG] int32: this rank's per-program call counters
    n_rows,
    half_elems,  # elements in one half of a data buffer
    rank,
    eps,
    H: tl.constexpr,
    BLOCK_H: tl.constexpr,
    W: tl.constexpr,
    NUM_PROGRAMS: tl.constexpr,
    PDL: tl.constexpr,  # launched as a programmatic dependent (kernels/pdl.py)
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_H)
    cmask = cols < H
    dtype = x_ptr.dtype.element_ty
    w = tl.load(weight_ptr + cols, mask=cmask, other=0.0).to(tl.float32)  # before the wait: no kernel writes it
    if PDL:
        pdl.wait()  # then the epoch too: the call before, if it ran just before, stores it at its end
    epoch = tl.load(epoch_ptr + pid) + 1
    half = (epoch & 1).to(tl.int64) * half_elems
    mine = tl.load(buf_ptrs_ptr + rank).to(tl.pointer_type(dtype)) + half

    # 1. this rank's partial rows into its buffer
    for row in range(pid, n_rows, NUM_PROGRAMS):
        offs = row.to(tl.int64) * H + cols
        tl.store(mine + offs, tl.load(x_ptr + offs, mask=cmask), mask=cmask)

    # 2. barrier with each peer's same program: every thread's stores before the release
    tl.debug_barrier()
    for q in tl.static_range(W):
        if q != rank:
            peer_flags = tl.load(flag_ptrs_ptr + q).to(tl.pointer_type(tl.int32))
            tl.atomic_xchg(peer_flags + pid * W + rank, epoch, sem="release", scope="sys")
    my_flags = tl.load(flag_ptrs_ptr + rank).to(tl.pointer_type(tl.int32))
    for q in tl.static_range(W):
        if q != rank:
            seen = tl.atomic_add(my_flags + pid * W + q, 0, sem="acquire", scope="sys")
            while seen - epoch < 0:
                seen = tl.atomic_add(my_flags + pid * W + q, 0, sem="acquire", scope="sys")
    tl.debug_barrier()

    # 3. sum in rank order, add the residual, normalise
    for row in range(pid, n_rows, NUM_PROGRAMS):
        offs = row.to(tl.int64) * H + cols
        acc = tl.zeros([BLOCK_H], dtype=tl.float32)
        for q in tl.static_range(W):
            buf = tl.load(buf_ptrs_ptr + q).to(tl.pointer_type(dtype)) + half
            acc += tl.load(buf + offs, mask=cmask, other=0.0).to(tl.float32)
        res = tl.load(residual_ptr + offs, mask=cmask, other=0.0).to(tl.float32)
        h = (acc.to(dtype).to(tl.float32) + res).to(dtype)  # the all-reduce's rounding, then the add's
        tl.store(res_out_ptr + offs, h, mask=cmask)
        hf = h.to(tl.float32)
        var = tl.sum(hf * hf, axis=0) / H
        normed = (hf * tl.rsqrt(var + eps)).to(dtype).to(tl.float32)
        tl.store(out_ptr + offs, (w * normed).to(dtype), mask=cmask)
    tl.store(epoch_ptr + pid, epoch)


class AllReduceAddRMSNorm:
    """The buffers of the fused kernel on one rank: made on every rank of `group` at once (collective)."""

    def __init__(self, group, device: torch.device, hidden: int, max_rows: int, dtype: torch.dtype) -> None:
        import torch.distributed._symmetric_memory as symm_mem

        self.hidden, self.max_rows, self.dtype = hidden, max_rows, dtype
        self.world_size, self.rank = group.size(), group.rank()
        self.half_elems = max_rows * hidden
        self.data = symm_mem.empty(2 * self.half_elems, dtype=dtype, device=device)
        self.flags = symm_mem.empty(NPROG * self.world_size, dtype=torch.int32, device=device)
        self.flags.zero_()
        self.epochs = torch.zeros(NPROG, dtype=torch.int32, device=device)
        torch.cuda.synchronize(device)  # zeroed flags before any peer signals
        self.data_handle = symm_mem.rendezvous(self.data, group.group_name)
        self.flag_handle = symm_mem.rendezvous(self.flags, group.group_name)
        self.buf_ptrs = torch.tensor(self.data_handle.buffer_ptrs, dtype=torch.int64, device=device)
        self.flag_ptrs = torch.tensor(self.flag_handle.buffer_ptrs, dtype=torch.int64, device=device)

    def eligible(self, x: torch.Tensor, residual: torch.Tensor) -> bool:
        return (x.dtype == self.dtype and x.dim() == 2 and x.shape[1] == self.hidden and x.shape[0] <= self.max_rows
                and x.is_contiguous() and residual.is_contiguous() and residual.shape == x.shape)

    def __call__(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """(RMSNorm(sum over ranks of x + residual) * weight, sum + residual); x and residual [n, hidden]."""
        n = x.shape[0]
        out = torch.empty_like(x)
        res_out = torch.empty_like(residual)
        if n == 0:
            return out, res_out
        programs = min(n, NPROG)
        block_h = triton.next_power_of_2(self.hidden)
        use_pdl = pdl.use(x)
        _allreduce_add_rms_norm_kernel[(programs,)](
            x, residual, weight, out, res_out, self.buf_ptrs, self.flag_ptrs, self.epochs, n, self.half_elems,
            self.rank, eps, H=self.hidden, BLOCK_H=block_h, W=self.world_size, NUM_PROGRAMS=NPROG, PDL=use_pdl,
            launch_pdl=use_pdl, num_warps=4 if block_h <= 1024 else 8)
        return out, res_out
