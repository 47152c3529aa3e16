"""The small element-wise ops of a decoder layer (layers/ops.py) as Triton kernels, one launch each: RMSNorm with or
without the residual add before it, SiLU-and-mul, and the merge of the tokens sampled on the device into the next
step's input ids. On CUDA they replace torch.compile'd versions of the plain ops, which brought Dynamo and Inductor
into every start (their imports, Inductor's code generation and compile workers) and a guard check into every call.

Rounding follows the plain ops under eager PyTorch: x + residual is rounded to the model dtype; the norm is taken in
fp32 and the normalised value rounded to the model dtype before the weight multiplies it (in fp32, rounded once);
silu(gate) is rounded before it multiplies up. SiLU uses libdevice's expf and an IEEE division, as PyTorch's kernel
does (tl.exp and `/` are approximations). The sum of squares is summed in another order than PyTorch's reduction,
so the normalised values may differ from eager's in the last bit, rarely.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from nanovllm_ray.kernels import jit, pdl

if os.environ.get("TRITON_INTERPRET") == "1":

    @triton.jit
    def _exp(x):
        return tl.exp(x)  # the interpreter (CPU tests) has no libdevice

else:
    from triton.language.extra.cuda.libdevice import exp as _exp  # CUDA's expf (tl.exp: ex2.approx of x * log2 e)


# Row counts change from step to step and are not specialised on (a variant for 1 and for multiples of 16 would each
# be a JIT compile in the middle of serving). Row strides are: they are fixed by the model's shapes, and knowing them
# divisible by 16 lets rows load as 16-byte vectors.
@triton.jit(do_not_specialize=["n_rows"])
def _rms_norm_kernel(
    x_ptr,  # [n_rows, H], unit stride on H
    res_ptr,  # [n_rows, H], unit stride on H (ADD)
    w_ptr,  # [H]
    out_ptr,  # [n_rows, H] contiguous: RMSNorm(x (+ residual)) * w
    res_out_ptr,  # [n_rows, H] contiguous: x + residual (ADD)
    n_rows,
    stride_x,
    stride_res,
    eps,
    H: tl.constexpr,
    BLOCK: tl.constexpr,  # next power of two >= H
    ROWS: tl.constexpr,  # rows a program
    ADD: tl.constexpr,
    PDL: tl.constexpr,  # launched as a programmatic dependent (kernels/pdl.py)
):
    cols = tl.arange(0, BLOCK)
    cmask = cols < H
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)  # before the wait: no kernel writes weights
    if PDL:
        pdl.wait()
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    mask = (rows < n_rows)[:, None] & cmask[None, :]
    rows = rows.to(tl.int64)[:, None]
    dtype = x_ptr.dtype.element_ty
    h = tl.load(x_ptr + rows * stride_x + cols[None, :], mask=mask, other=0.0)
    if ADD:
        r = tl.load(res_ptr + rows * stride_res + cols[None, :], mask=mask, other=0.0)
        h = (h.to(tl.float32) + r.to(tl.float32)).to(dtype)  # x + residual in the model dtype
        tl.store(res_out_ptr + rows * H + cols[None, :], h, mask=mask)
    h = h.to(tl.float32)
    # mean as PyTorch's reduction takes it: the sum times 1 / H (in fp32)
    rstd = tl.rsqrt(tl.sum(h * h, axis=1) * (1.0 / H) + eps)  # [ROWS]
    normed = (h * rstd[:, None]).to(dtype).to(tl.float32)
    tl.store(out_ptr + rows * H + cols[None, :], (w[None, :] * normed).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _silu_and_mul_kernel(
    x_ptr,  # [n_rows, 2 * INTER]: gate | up, unit stride on the columns
    out_ptr,  # [n_rows, INTER] contiguous
    stride_x,
    INTER: tl.constexpr,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr,
):
    if PDL:
        pdl.wait()
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < INTER
    dtype = x_ptr.dtype.element_ty
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + INTER + cols, mask=mask, other=0.0).to(tl.float32)
    silu = tl.math.div_rn(gate, 1.0 + _exp(-gate)).to(dtype).to(tl.float32)
    tl.store(out_ptr + row * INTER + cols, (silu * up).to(dtype), mask=mask)


@triton.jit(do_not_specialize=["n"])
def _merge_pending_kernel(
    ids_ptr,  # [n]
    src_ptr,  # [n]: row of tokens to take, or -1
    tokens_ptr,  # [>= max(src) + 1]
    out_ptr,  # [n]
    n,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr,
):
    if PDL:
        pdl.wait()
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    src = tl.load(src_ptr + offs, mask=mask, other=-1)
    pending = src >= 0
    tok = tl.load(tokens_ptr + tl.maximum(src, 0), mask=mask & pending, other=0)
    ids = tl.load(ids_ptr + offs, mask=mask & ~pending, other=0)
    out_ty = out_ptr.dtype.element_ty
    tl.store(out_ptr + offs, tl.where(pending, tok.to(out_ty), ids.to(out_ty)), mask=mask)


def _rows(t: torch.Tensor, width: int) -> torch.Tensor:
    """t as [rows, width] with unit stride on width: a view where one exists (rows may be strided), else a copy."""
    t = t.reshape(-1, width)
    return t if t.stride(1) == 1 else t.contiguous()


def _rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
    H = x.shape[-1]
    assert weight.shape == (H,), (weight.shape, x.shape)
    assert residual is None or (residual.shape == x.shape and residual.dtype == x.dtype), (residual.shape, x.shape)
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    res_out = torch.empty(x.shape, dtype=x.dtype, device=x.device) if residual is not None else None
    x2 = _rows(x, H)
    n = x2.shape[0]
    if n == 0:
        return out, res_out
    r2 = _rows(residual, H) if residual is not None else x2
    block = triton.next_power_of_2(H)
    rows = max(1, 1024 // block)  # narrow rows (per-head norms) several to a program
    use_pdl = pdl.use(x)
    jit.launch(_rms_norm_kernel, (triton.cdiv(n, rows),))(
        x2, r2, weight.contiguous(), out, res_out if res_out is not None else out, n, x2.stride(0), r2.stride(0), eps,
        H=H, BLOCK=block, ROWS=rows, ADD=residual is not None, PDL=use_pdl,
        num_warps=min(8, max(1, rows * block // 256)), launch_pdl=use_pdl)
    return out, res_out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm(x) * weight over x's last dim; x [..., H], weight [H]."""
    return _rms_norm(x, None, weight, eps)[0]


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(x + residual) * weight, x + residual); x and residual [..., H] of one dtype, weight [H]."""
    return _rms_norm(x, residual, weight, eps)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for x [..., 2 * I] = gate | up; returns [..., I]."""
    assert x.shape[-1] % 2 == 0, x.shape
    inter = x.shape[-1] // 2
    out = torch.empty((*x.shape[:-1], inter), dtype=x.dtype, device=x.device)
    x2 = _rows(x, 2 * inter)
    n = x2.shape[0]
    if n == 0:
        return out
    block = min(1024, triton.next_power_of_2(inter))
    use_pdl = pdl.use(x)
    jit.launch(_silu_and_mul_kernel, (n, triton.cdiv(inter, block)))(
        x2, out, x2.stride(0), INTER=inter, BLOCK=block, PDL=use_pdl, num_warps=4, launch_pdl=use_pdl)
    return out


def merge_pending(input_ids: torch.Tensor, src: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """input_ids [n] with row i replaced by tokens[src[i]] where src[i] >= 0 (tokens sampled on the device)."""
    n = input_ids.shape[0]
    assert input_ids.dim() == src.dim() == tokens.dim() == 1 and src.shape[0] == n, (input_ids.shape, src.shape)
    out = torch.empty(n, dtype=torch.promote_types(input_ids.dtype, tokens.dtype), device=input_ids.device)
    if n == 0:
        return out
    block = 256
    use_pdl = pdl.use(input_ids)
    jit.launch(_merge_pending_kernel, (triton.cdiv(n, block),))(
        input_ids.contiguous(), src.contiguous(), tokens.contiguous(), out, n, BLOCK=block, PDL=use_pdl,
        num_warps=4, launch_pdl=use_pdl)
    if jit.compiling():  # compiled, not run: hand on valid token ids, which the embedding after it indexes with
        out.copy_(input_ids)
    return out
