"""Triton kernels for the paged KV cache.

- `kv_store.store_kvcache`: write a step's new K/V into cache slots.
- `paged_attention.paged_decode_attention`: one query token per sequence, split-KV (flash-decoding).
- `paged_attention.paged_prefill_attention`: prefill / chunked prefill over a cached prefix.

Nothing is imported here so that the package stays importable without Triton (CPU-only CI);
import the submodules directly.
"""
