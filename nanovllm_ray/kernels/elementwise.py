"""The small element-wise ops of a decoder layer (layers/ops.py) as Triton kernels, one launch each: RMSNorm with or
without the residual add before it, SiLU-and-mul, and the merge of the tokens sampled on the device into the next
step's input ids; and a decode graph's first and last kernels (decode_inputs, store_tokens: executor/cuda_graph.py).
On CUDA they replace torch.compile'd versions of the plain ops, which brought Dynamo and Inductor
into every start (their imports, Inductor's code generation and compile workers) and a guard check into every call.

Rounding follows the plain ops under eager PyTorch: x + residual is rounded to the model dtype; the norm is taken in
fp32 and the normalised value rounded to the model dtype before the weight multiplies it (in fp32, rounded once);
silu(gate) is rounded before it multiplies up. SiLU uses libdevice's expf and an IEEE division, as PyTorch's kernel
does (tl.exp and `/` are approximations). The sum of squares is summed in another order than PyTorch's reduction,
so the normalised values may differ from eager's in the last bit, rarely.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nanovllm_ray.kernels import jit, pdl

if jit.INTERPRETED:

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
    tl.store(out_ptr + offs, _merged_ids(ids_ptr, src_ptr, tokens_ptr, offs, mask, out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _merged_ids(ids_ptr, src_ptr, tokens_ptr, offs, mask, out_ty: tl.constexpr):
    """ids[offs], or tokens[src[offs]] where src[offs] >= 0 (the tokens sampled on the device), as out_ty."""
    src = tl.load(src_ptr + offs, mask=mask, other=-1)
    pending = src >= 0
    tok = tl.load(tokens_ptr + tl.maximum(src, 0), mask=mask & pending, other=0)
    ids = tl.load(ids_ptr + offs, mask=mask & ~pending, other=0)
    return tl.where(pending, tok.to(out_ty), ids.to(out_ty))


@triton.jit
def ring_slot(ring_ptr, header_ptr, width):
    """Where a decode graph's tokens go in the host ring ([slots, width] int64): the row of the slot its header
    ([rows, table width, slot, launch number]) names; its first entry takes the launch number, the tokens follow."""
    return ring_ptr + tl.load(header_ptr + 2) * width


@triton.jit
def ring_launch(header_ptr):
    return tl.load(header_ptr + 3)


@triton.jit
def _decode_inputs_kernel(
    ids_ptr,  # [bs]
    src_ptr,  # [bs]: row of tokens to take, or -1
    tokens_ptr,  # [>= max(src) + 1]
    out_ptr,  # [bs]
    header_ptr,  # int64 [rows n, table width w, ...]
    compact_ptr,  # int32 [n * w]: the step's block tables, row after row
    tables_ptr,  # int32 [>= n, stride]
    stride,
    embed_ptr,  # [vocab, H] (EMBED)
    hidden_ptr,  # [bs, H] (EMBED): the embeddings of the merged ids
    H: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_H: tl.constexpr,
    EMBED: tl.constexpr,
    PDL: tl.constexpr,
):
    if PDL:
        pdl.wait()
    r = tl.program_id(0)
    merged = _merged_ids(ids_ptr, src_ptr, tokens_ptr, r, r >= 0, out_ptr.dtype.element_ty)
    tl.store(out_ptr + r, merged)
    if EMBED:
        for h0 in tl.static_range(0, H, BLOCK_H):
            h = h0 + tl.arange(0, BLOCK_H)
            vec = tl.load(embed_ptr + merged.to(tl.int64) * H + h, mask=h < H)
            tl.store(hidden_ptr + r.to(tl.int64) * H + h, vec, mask=h < H)
    n = tl.load(header_ptr)
    w = tl.load(header_ptr + 1)
    if r < n:
        row = r.to(tl.int64)
        for start in range(0, w, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < w
            blocks = tl.load(compact_ptr + row * w + cols, mask=mask)
            tl.store(tables_ptr + row * stride + cols, blocks, mask=mask)


@triton.jit
def _store_tokens_kernel(
    tokens_ptr,  # [bs]
    header_ptr,  # int64 [.., .., ring slot, launch number]
    ring_ptr,  # int64 [slots, width], pinned host memory
    bs,
    width,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr,
):
    if PDL:
        pdl.wait()
    row = ring_slot(ring_ptr, header_ptr, width)
    tl.store(row, ring_launch(header_ptr))
    for start in range(0, bs, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < bs
        tl.store(row + 1 + offs, tl.load(tokens_ptr + offs, mask=mask).to(tl.int64), mask=mask)


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


def decode_inputs(input_ids: torch.Tensor, src: torch.Tensor, tokens: torch.Tensor, header: torch.Tensor,
                  compact: torch.Tensor, block_tables: torch.Tensor, embed: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A decode graph's first kernel: merge_pending's ids (input_ids [bs], row i replaced by tokens[src[i]] where
    src[i] >= 0), and the step's block tables unpacked from compact (int32, header[0] rows of header[1] entries, row
    after row) into the first rows of block_tables ([max_rows, max_blocks] int32). Returns the ids and, with embed
    ([vocab, H], the embedding table), their embeddings [bs, H] (else None)."""
    bs = input_ids.shape[0]
    assert src.shape == (bs,) and block_tables.stride(1) == 1 and compact.dtype == block_tables.dtype
    out = torch.empty(bs, dtype=torch.promote_types(input_ids.dtype, tokens.dtype), device=input_ids.device)
    hidden = None if embed is None else torch.empty(bs, embed.shape[1], dtype=embed.dtype, device=embed.device)
    if bs == 0:
        return out, hidden
    assert embed is None or embed.is_contiguous()
    H = 1 if embed is None else embed.shape[1]
    use_pdl = pdl.use(input_ids)
    jit.launch(_decode_inputs_kernel, (bs,))(
        input_ids, src, tokens, out, header, compact, block_tables, block_tables.stride(0),
        out if embed is None else embed, out if hidden is None else hidden, H=H, BLOCK=256,
        BLOCK_H=min(1024, triton.next_power_of_2(H)), EMBED=embed is not None, PDL=use_pdl, num_warps=4,
        launch_pdl=use_pdl)
    if jit.compiling():  # compiled, not run: hand on valid token ids, which the embedding after it indexes with
        out.copy_(input_ids)
    return out, hidden


def store_tokens(tokens: torch.Tensor, header: torch.Tensor, ring: torch.Tensor) -> None:
    """A decode graph's last kernel: ring[header[2]] = [header[3], *tokens] (int64; ring in pinned host memory, which
    the device writes directly, so the host reads the step's tokens without a copy of its own on the stream)."""
    bs = tokens.shape[0]
    assert ring.dim() == 2 and ring.dtype == torch.int64 and ring.shape[1] > bs and ring.is_contiguous()
    use_pdl = pdl.use(tokens)
    jit.launch(_store_tokens_kernel, (1,))(tokens, header, ring, bs, ring.shape[1], BLOCK=256, PDL=use_pdl,
                                           num_warps=4, launch_pdl=use_pdl)
