"""Triton kernels: the paged KV cache and the fused pieces of a decode step.

- `kv_store.store_kvcache`: write a step's new K/V into cache slots.
- `paged_attention.paged_decode_attention`: one query token per sequence, split-KV (flash-decoding).
- `paged_attention.paged_prefill_attention`: prefill / chunked prefill over a cached prefix.
- `qk_norm_rope.qk_norm_rope_store`: Qwen3's q/k RMSNorm + rotary embedding + KV store, one launch per layer.
- `sampling.sample_tokens`: temperature + Gumbel-max (or argmax) straight from the logits, CUDA-graph safe.
- `skinny_gemm.skinny_linear`: y = x W^T for few rows, used where it measured faster than cuBLAS.
- `gemv.gemv`: a batch-1 step's projections, with the RMSNorm before and SiLU-and-mul after folded in.
- `pdl`: programmatic dependent launch of the decode-path kernels (Hopper+): each starts while the one before runs.
- `jit`: every launch above goes through `jit.launch`, which a start-up's compile pass (`jit.compile_only`) turns into
  compiles side by side on a thread pool.

Nothing is imported here so that the package stays importable without Triton (CPU-only CI);
import the submodules directly.
"""
