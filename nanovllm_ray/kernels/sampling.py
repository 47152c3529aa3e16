"""Sampling straight from the model's logits: temperature + Gumbel-max (argmax of logits / T + G, G ~ Gumbel), or
argmax where T = 0, in two launches and one read of the logits in their own dtype.

The unfused path (logits.float(), an Exp(1) noise tensor, a fused argmax) writes and reads the [n, vocab] tensor
three more times in fp32; at batch 256 on the H100 that was ~0.3 ms of a 12.7 ms decode step, and at batch 1 the
argmax alone ran 40 us on a single program. Here each (row, vocab chunk) program draws its uniforms with Philox
from a device-side seed, so the kernels replay inside a CUDA graph; the finishing kernel bumps the seed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nanovllm_ray.kernels import jit, pdl
from nanovllm_ray.kernels.elementwise import ring_launch, ring_slot

if jit.INTERPRETED:

    @triton.jit
    def _log(x):
        return tl.log(x)  # the interpreter (CPU tests) has no libdevice

else:  # lg2.approx times ln 2: one MUFU op
    from triton.language.extra.cuda.libdevice import fast_logf as _log

_SEEDS: dict[torch.device, torch.Tensor] = {}
BLOCK = 1024
MAX_CHUNKS = 256  # one compiled finishing kernel for every batch size (a new specialisation costs ~0.5 s)


@triton.jit
def _gumbel(bits):
    """Gumbel noise -log(E), E = -log(1 - v) ~ Exp(1), from 32 random bits: v = (bits + 1/2) / 2^32 in (0, 1). The
    large draws, the ones that win, come from a small E: for v < 1/128 it is the series v + v^2/2 + v^3/3 (relative
    error under 2^-23), which keeps its precision where a log of 1 - v would lose it; above, the log's absolute error
    (2^-22 with lg2.approx) is a relative error under 2^-15 of E. Two MUFU ops, no logf polynomials: two of those a
    token were most of this kernel's time (H200, the sampler at 64 / 192 rows: 34.7 / 94.4 -> 19.9 / 52.0 us)."""
    v = (bits.to(tl.float32) + 0.5) * 2.3283064365386963e-10
    e = tl.where(v < 0.0078125, v * (1.0 + v * (0.5 + v * 0.3333333333333333)), -_log(1.0 - v))
    return -_log(e)


@triton.jit
def _keep_better(acc_val, acc_idx, x, cols, mask):
    better = mask & (x > acc_val)  # strict: the earlier column wins ties
    return tl.where(better, x, acc_val), tl.where(better, cols, acc_idx)


@triton.jit
def _partial_argmax_kernel(
    logits_ptr,  # [n, vocab]
    stride_row,
    temps_ptr,  # [n] float (any float dtype); 0 = greedy
    seed_ptr,  # [1] int64
    part_val_ptr,  # [n, num_chunks] fp32
    part_idx_ptr,  # [n, num_chunks] int32
    vocab,  # columns of these logits
    col_offset,  # their first column's token id (a tensor-parallel rank's vocabulary slice; else 0)
    chunk_len,  # multiple of BLOCK
    BLOCK: tl.constexpr,
    PDL: tl.constexpr,  # launched as a programmatic dependent (kernels/pdl.py)
):
    if PDL:
        pdl.wait()
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    num_chunks = tl.num_programs(1)
    t = tl.load(temps_ptr + row).to(tl.float32)
    seed = tl.load(seed_ptr).to(tl.uint32)
    # Lane-wise running maxima, reduced once at the end.
    acc_val = tl.full([BLOCK], float("-inf"), tl.float32)
    acc_idx = tl.zeros([BLOCK], dtype=tl.int32)
    start = chunk * chunk_len
    end = tl.minimum(start + chunk_len, vocab)
    row_ptr = logits_ptr + row.to(tl.int64) * stride_row
    if t > 0:
        inv_t = 1.0 / t
        # One Philox call gives the uniforms of four tokens: a group of four ids in a row. Windows start at a multiple
        # of four in token ids (up to 3 columns early, masked), so a vocabulary slice draws the same noise for a token.
        first = start - (col_offset + start) % 4
        for base in range(first, end, BLOCK):
            cols = base + tl.arange(0, BLOCK)
            mask = (cols >= start) & (cols < end)
            x = tl.load(row_ptr + cols, mask=mask, other=float("-inf")).to(tl.float32)
            group = (col_offset + base) // 4 + tl.arange(0, BLOCK // 4)
            zero = tl.zeros_like(group)
            r0, r1, r2, r3 = tl.philox(seed, group, zero + row, zero, zero)
            bits = tl.reshape(tl.join(tl.join(r0, r1), tl.join(r2, r3)), [BLOCK])
            acc_val, acc_idx = _keep_better(acc_val, acc_idx, x * inv_t + _gumbel(bits), cols, mask)
    else:  # greedy: a loop of its own (H200, batch 256: 27.0 us; 38.5 inside the noise's loop, 31.7 before)
        for base in range(start, end, BLOCK):
            cols = base + tl.arange(0, BLOCK)
            mask = cols < end
            x = tl.load(row_ptr + cols, mask=mask, other=float("-inf")).to(tl.float32)
            acc_val, acc_idx = _keep_better(acc_val, acc_idx, x, cols, mask)
    best_val = tl.max(acc_val, axis=0)
    best_idx = tl.min(tl.where(acc_val == best_val, acc_idx, 2**31 - 1), axis=0)  # first column at the maximum
    out = row * num_chunks + chunk
    tl.store(part_val_ptr + out, best_val)
    tl.store(part_idx_ptr + out, best_idx + col_offset)


@triton.jit(do_not_specialize=["num_chunks"])
def _final_argmax_kernel(part_val_ptr, part_idx_ptr, out_ptr, out_val_ptr, seed_ptr, num_chunks,
                         header_ptr,  # int64 [.., .., ring slot, launch number] (RING)
                         ring_ptr,  # int64 [slots, ring_width] (RING): pinned host memory
                         ring_width,
                         BLOCK_C: tl.constexpr, WRITE_VAL: tl.constexpr, RING: tl.constexpr, PDL: tl.constexpr):
    if PDL:
        pdl.wait()
    row = tl.program_id(0)
    c = tl.arange(0, BLOCK_C)
    mask = c < num_chunks
    val = tl.load(part_val_ptr + row * num_chunks + c, mask=mask, other=float("-inf"))
    best = tl.argmax(val, axis=0)  # first chunk among equal maxima
    idx = tl.load(part_idx_ptr + row * num_chunks + best)
    tl.store(out_ptr + row, idx.to(out_ptr.dtype.element_ty))
    if RING:  # the token straight into the host's ring slot too (elementwise.store_tokens, fused)
        slot_row = ring_slot(ring_ptr, header_ptr, ring_width)
        tl.store(slot_row + 1 + row, idx.to(tl.int64))
        if row == 0:
            tl.store(slot_row, ring_launch(header_ptr))
    if WRITE_VAL:  # the winning score, for a merge across vocabulary slices
        tl.store(out_val_ptr + row, tl.max(val, axis=0).to(out_val_ptr.dtype.element_ty))
    if row == 0:  # every program of the first kernel has read the seed by now (stream order)
        tl.store(seed_ptr, tl.load(seed_ptr) + 1)


def _seed(device: torch.device) -> torch.Tensor:
    """This device's sampling seed, drawn once from torch's generator (so torch.manual_seed makes runs repeat)."""
    if device not in _SEEDS:
        _SEEDS[device] = torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64, device=device)
    return _SEEDS[device]


def num_chunks_for(num_rows: int, vocab: int, device: torch.device) -> int:
    """Vocabulary chunks per row: about 16 programs per SM (measured at batch 64 with 2 per SM: 63 us for 19 MB of
    logits, the random numbers and logs of a long serial loop per program, not the reads, set the pace)."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132
    return max(1, min(triton.cdiv(16 * sms, num_rows), triton.cdiv(vocab, BLOCK), MAX_CHUNKS))


def sample_tokens(logits: torch.Tensor, temperatures: torch.Tensor, out: torch.Tensor | None = None,
                  col_offset: int = 0, out_val: torch.Tensor | None = None,
                  ring: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """logits [n, vocab] (unit stride along vocab), temperatures [n] -> token ids [n] (int64 unless `out` says
    otherwise): argmax(logits) where the temperature is 0, else a draw from softmax(logits / T).

    A tensor-parallel rank passes its vocabulary slice: col_offset (its first token id), and out_val [n] for
    each row's winning score (logits / T + Gumbel noise, or the logit where T = 0); the slices' winners then
    merge by the highest score (nanovllm_ray.layers.sampler.merge_shard_samples). Each token's noise depends on its
    id, not on the split. ring (header, ring): also write the tokens as elementwise.store_tokens does."""
    n, vocab = logits.shape
    assert logits.stride(1) == 1 and temperatures.shape == (n,), (logits.stride(), temperatures.shape)
    if out is None:
        out = torch.empty(n, dtype=torch.int64, device=logits.device)
    if n == 0:
        return out
    chunks = num_chunks_for(n, vocab, logits.device)
    chunk_len = triton.cdiv(triton.cdiv(vocab, chunks), BLOCK) * BLOCK
    chunks = triton.cdiv(vocab, chunk_len)
    part_val = torch.empty((n, chunks), dtype=torch.float32, device=logits.device)
    part_idx = torch.empty((n, chunks), dtype=torch.int32, device=logits.device)
    seed = _seed(logits.device)
    use_pdl = pdl.use(logits)
    jit.launch(_partial_argmax_kernel, (n, chunks))(
        logits, logits.stride(0), temperatures, seed, part_val, part_idx, vocab, col_offset, chunk_len, BLOCK=BLOCK,
        PDL=use_pdl, num_warps=4, launch_pdl=use_pdl)
    header, ring_buf = ring if ring is not None else (seed, seed.view(1, 1))
    assert ring is None or (ring_buf.dtype == torch.int64 and ring_buf.shape[1] > n and ring_buf.is_contiguous())
    jit.launch(_final_argmax_kernel, (n,))(
        part_val, part_idx, out, part_val if out_val is None else out_val, seed, chunks, header, ring_buf,
        ring_buf.shape[1], BLOCK_C=MAX_CHUNKS, WRITE_VAL=out_val is not None, RING=ring is not None, PDL=use_pdl,
        num_warps=1, launch_pdl=use_pdl)
    return out
