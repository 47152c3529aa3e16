"""The decode path's all-reduce, alone or fused with the residual add and the RMSNorm after a row-parallel layer: one
kernel, no flags, no barrier (ranks of one host with P2P access; 16-bit model dtypes).

Every rank owns a receive buffer in symmetric memory (every peer maps it): two slots, each with a region per sender
of [max_rows, H]. A buffer element that holds -0.0 (the sentinel) has not arrived. A call with slot s:

1. each program pushes its rows of this rank's partial sums, with any -0.0 written as +0.0 (the same sum), into
   slot s of every peer's buffer, at this rank's region: plain stores over NVLink, one trip one way;
2. then, row by row, it reads the peers' regions of its own buffer until no element is the sentinel (the data is the
   flag: no fence, no second trip), sums the ranks in rank order (every rank computes the same bits), writes the
   sentinel back into what it read, and writes the sum, or the residual add and RMSNorm of it, as the output.

Why two slots are enough: rank A writes slot s again two calls later, after its next call has received B's data of
that call, which B sent after its call with slot s had ended, sentinels written back included (kernels on a stream
end in order). Every call of every rank launches the same NUM_PROGRAMS programs, each keeping its own call counter on
the device, so every counter is the call's number on both ranks and picks the same slot; the rows go to programs
round-robin. The grid is at most the GPU's SM count, so that every program is resident together and a program that
waits for a peer's row never waits on a program of its own that cannot start.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nanovllm_ray.kernels import pdl

SENTINEL = tl.constexpr(-32768)  # int16 bits of bfloat16 / float16 -0.0


@triton.jit
def _lamport_all_reduce_kernel(
    x_ptr,  # [n, H] this rank's partial sums (16-bit float)
    residual_ptr,  # [n, H] (NORM only)
    weight_ptr,  # [H] (NORM only)
    out_ptr,  # [n, H] the sum, or RMSNorm(sum + residual) * weight; may be x_ptr
    res_out_ptr,  # [n, H] sum + residual (NORM only; may be residual_ptr)
    buf_ptr,  # int16 [2, W, max_rows, H]: this rank's receive buffer
    peer_offs_ptr,  # [W] int64: where each rank's buffer lies, in elements from this rank's
    calls_ptr,  # [NUM_PROGRAMS] int32: this rank's per-program call counters
    n_rows,
    max_rows,
    rank,
    eps,
    H: tl.constexpr,
    BLOCK_H: tl.constexpr,
    W: tl.constexpr,
    NUM_PROGRAMS: tl.constexpr,
    NORM: tl.constexpr,
    PDL: tl.constexpr,  # launched as a programmatic dependent (kernels/pdl.py)
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_H)
    cmask = cols < H
    dtype = x_ptr.dtype.element_ty
    if NORM:
        w = tl.load(weight_ptr + cols, mask=cmask, other=0.0).to(tl.float32)  # before the wait: no kernel writes it
    if PDL:
        pdl.wait()  # then the counter too: the call before, if it ran just before, stores it at its end
    call = tl.load(calls_ptr + pid)
    region = (call & 1).to(tl.int64) * W * max_rows * H  # this call's slot

    # 1. push this rank's rows into every peer's buffer (-0.0 as +0.0: -0.0 is the sentinel)
    for row in range(pid.to(tl.int64), n_rows, NUM_PROGRAMS):  # int64 rows: offsets past 2**31
        offs = row * H + cols
        bits = tl.load(x_ptr + offs, mask=cmask).to(tl.int16, bitcast=True)
        bits = tl.where(bits == SENTINEL, 0, bits)
        dst = region + rank * max_rows * H + offs
        for q in tl.static_range(W):
            if q != rank:
                peer = tl.load(peer_offs_ptr + q) // 8 * 8  # a multiple of 8 already: this says so to Triton
                tl.store(buf_ptr + peer + dst, bits, mask=cmask)

    # 2. wait for every peer's rows in this rank's buffer, sum in rank order, put the sentinels back
    for row in range(pid.to(tl.int64), n_rows, NUM_PROGRAMS):
        offs = row * H + cols
        acc = tl.zeros([BLOCK_H], dtype=tl.float32)
        for q in tl.static_range(W):
            if q == rank:
                bits = tl.load(x_ptr + offs, mask=cmask, other=0.0).to(tl.int16, bitcast=True)
                bits = tl.where(bits == SENTINEL, 0, bits)
            else:
                src = buf_ptr + region + q * max_rows * H + offs
                bits = tl.load(src, mask=cmask, other=0, volatile=True)
                while tl.max((bits == SENTINEL).to(tl.int32), axis=0) > 0:
                    bits = tl.load(src, mask=cmask, other=0, volatile=True)
                tl.store(src, tl.full([BLOCK_H], SENTINEL, tl.int16), mask=cmask)
            acc += bits.to(dtype, bitcast=True).to(tl.float32)
        if NORM:
            res = tl.load(residual_ptr + offs, mask=cmask, other=0.0).to(tl.float32)
            h = (acc.to(dtype).to(tl.float32) + res).to(dtype)  # the all-reduce's rounding, then the add's
            tl.store(res_out_ptr + offs, h, mask=cmask)
            hf = h.to(tl.float32)
            var = tl.sum(hf * hf, axis=0) / H
            normed = (hf * tl.rsqrt(var + eps)).to(dtype).to(tl.float32)
            tl.store(out_ptr + offs, (w * normed).to(dtype), mask=cmask)
        else:
            tl.store(out_ptr + offs, acc.to(dtype), mask=cmask)
    tl.store(calls_ptr + pid, call + 1)


def peer_offsets(buffer_ptrs: list[int], base: torch.Tensor) -> torch.Tensor:
    """Every rank's int16 buffer (its address here) as an offset in elements from `base`, this rank's: the kernel
    reaches peers' buffers from its own, whose alignment Triton knows."""
    assert all(p % 16 == 0 for p in buffer_ptrs) and base.data_ptr() % 16 == 0, buffer_ptrs
    return torch.tensor([(p - base.data_ptr()) // 2 for p in buffer_ptrs], dtype=torch.int64, device=base.device)


class LamportAllReduce:
    """The kernel's buffers on one rank: made on every rank of `group` at once (collective). Takes [rows, hidden]
    messages of `dtype` (16-bit) up to max_rows rows."""

    def __init__(self, group, device: torch.device, hidden: int, max_rows: int, dtype: torch.dtype) -> None:
        import torch.distributed._symmetric_memory as symm_mem

        if dtype.itemsize != 2 or not dtype.is_floating_point:
            raise ValueError(f"dtype {dtype}: the sentinel all-reduce takes 16-bit floats")
        self.hidden, self.max_rows, self.dtype = hidden, max_rows, dtype
        self.world_size, self.rank = group.size(), group.rank()
        self.buffer = symm_mem.empty(2 * self.world_size * max_rows * hidden, dtype=torch.int16, device=device)
        self.buffer.fill_(SENTINEL.value)
        self.programs = min(max_rows, torch.cuda.get_device_properties(device).multi_processor_count)
        self.calls = torch.zeros(self.programs, dtype=torch.int32, device=device)
        torch.cuda.synchronize(device)  # every sentinel in place before a peer pushes
        self.handle = symm_mem.rendezvous(self.buffer, group.group_name)  # collective: after every rank's fill
        self.peer_offs = peer_offsets(self.handle.buffer_ptrs, self.buffer)
        self.block_h = triton.next_power_of_2(hidden)

    def eligible(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> bool:
        """Whether x (any shape of whole [hidden] rows; with a residual, [rows, hidden] like it) fits the kernel."""
        if not (x.is_cuda and x.dtype == self.dtype and x.is_contiguous() and x.numel() % self.hidden == 0
                and x.numel() // self.hidden <= self.max_rows):
            return False
        return residual is None or (x.dim() == 2 and residual.is_contiguous() and residual.shape == x.shape)

    def _launch(self, x, residual, weight, out, res_out, eps: float, norm: bool) -> None:
        rows = x.numel() // self.hidden
        if rows == 0:
            return
        use_pdl = pdl.use(x)
        _lamport_all_reduce_kernel[(self.programs,)](
            x, residual, weight, out, res_out, self.buffer, self.peer_offs, self.calls, rows, self.max_rows, self.rank,
            eps,
            H=self.hidden, BLOCK_H=self.block_h, W=self.world_size, NUM_PROGRAMS=self.programs, NORM=norm,
            PDL=use_pdl, launch_pdl=use_pdl, num_warps=4 if self.block_h <= 2048 else 8)

    def all_reduce_(self, x: torch.Tensor) -> torch.Tensor:
        """x <- the sum of x over the ranks (x eligible, any shape of whole rows); returns x."""
        self._launch(x, x, x, x, x, 0.0, norm=False)
        return x

    def add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """(RMSNorm(sum over ranks of x + residual) * weight, sum + residual); x and residual [n, hidden]."""
        out, res_out = torch.empty_like(x), torch.empty_like(residual)
        self._launch(x, residual, weight, out, res_out, eps, norm=True)
        return out, res_out

    def close(self) -> None:
        self.handle = self.buffer = None
