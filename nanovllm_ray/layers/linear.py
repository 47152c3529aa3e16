"""Linear layers split across tensor-parallel ranks, each loading its own shard of a Hugging Face weight."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanovllm_ray.layers import ops
from nanovllm_ray.layers.norm import RMSNorm
from nanovllm_ray.layers.parallel import all_reduce, divide, tp_rank, tp_size


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear; on CUDA the decode GEMV for a small batch (ops.gemv), or the skinny Triton GEMM for the decode-sized
    shapes where it measured faster than cuBLAS (ops.skinny_gemm)."""
    if _gemv_fits(x, weight, bias):
        return ops.gemv.gemv(x, weight)[0]
    skinny = ops.skinny_gemm
    if (skinny is not None and x.is_cuda and x.dim() == 2
            and skinny.use_skinny(x.shape[0], weight.shape[0], weight.shape[1], x.dtype)):
        return skinny.skinny_linear(x, weight, bias)
    return F.linear(x, weight, bias)


def norm_linear(x: torch.Tensor, residual: torch.Tensor | None, norm: RMSNorm, proj: LinearBase,
                silu_mul: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """proj(norm(x + residual)), then SiLU-and-mul if silu_mul (gate_up_proj); returns it and the new residual
    (x itself where residual is None: the embeddings). x is the previous row-parallel layer's output, summed over
    the ranks by the norm (RMSNorm reduce=True). At tp 1 a small CUDA batch (1-4 rows, where kernels/gemv.py takes the
    shape) is one kernel."""
    if tp_size() == 1 and _gemv_fits(x, proj.weight, proj.bias):
        y, new_residual = ops.gemv.gemv(x, proj.weight, residual=residual, norm_weight=norm.weight, eps=norm.eps,
                                        silu_mul=silu_mul)
        return y, x if residual is None else new_residual
    if residual is None:
        h, residual = norm(x), x
    else:
        h, residual = norm(x, residual, reduce=True)
    y = proj(h)
    return (ops.silu_and_mul(y) if silu_mul else y), residual


def _gemv_fits(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    gemv = ops.gemv
    return (gemv is not None and bias is None and x.is_cuda and x.dim() == 2 and x.stride(1) == 1
            and (x.shape[0] == 1 or x.is_contiguous()) and gemv.supports(x.shape[0], weight.shape[0], x.shape[1],
                                                                         x.dtype))


class LinearBase(nn.Module):
    def __init__(self, input_size: int, output_size: int, bias: bool = False) -> None:
        super().__init__()
        self.tp_rank, self.tp_size = tp_rank(), tp_size()
        self.weight = nn.Parameter(torch.empty(output_size, input_size), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(output_size), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        _copy(param, loaded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class ReplicatedLinear(LinearBase):
    pass


class ColumnParallelLinear(LinearBase):
    """Output features split across ranks: y_rank = x W_rank^T."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False) -> None:
        super().__init__(input_size, divide(output_size, tp_size()), bias)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        size = param.shape[0]
        _copy(param, loaded.narrow(0, self.tp_rank * size, size))


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections fused into one (gate_proj + up_proj)."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False) -> None:
        self.output_sizes = output_sizes
        super().__init__(input_size, sum(output_sizes), bias)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int) -> None:
        size = self.output_sizes[shard_id] // self.tp_size
        offset = sum(self.output_sizes[:shard_id]) // self.tp_size
        _copy(param.data.narrow(0, offset, size), loaded.narrow(0, self.tp_rank * size, size))


class QKVParallelLinear(ColumnParallelLinear):
    """q_proj, k_proj and v_proj fused; KV heads are replicated when there are more ranks than KV heads."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int,
                 bias: bool = False) -> None:
        tp = tp_size()
        self.head_dim = head_dim
        self.num_heads = divide(num_heads, tp)
        self.num_kv_heads = max(1, num_kv_heads // tp)
        self.kv_shard = tp_rank() // max(1, tp // num_kv_heads) if tp > num_kv_heads else tp_rank()
        out = (self.num_heads + 2 * self.num_kv_heads) * head_dim
        LinearBase.__init__(self, hidden_size, out, bias)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str) -> None:
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        if shard_id == "q":
            dst, src = param.data.narrow(0, 0, q_size), loaded.narrow(0, self.tp_rank * q_size, q_size)
        else:
            offset = q_size if shard_id == "k" else q_size + kv_size
            dst, src = param.data.narrow(0, offset, kv_size), loaded.narrow(0, self.kv_shard * kv_size, kv_size)
        _copy(dst, src)


class RowParallelLinear(LinearBase):
    """Input features split across ranks; partial outputs are summed with an all-reduce, here, or (reduce=False) by
    the RMSNorm after it, which fuses the sum with its residual add (parallel.all_reduce_add_rms_norm)."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False, reduce: bool = True) -> None:
        super().__init__(divide(input_size, tp_size()), output_size, bias)
        self.reduce = reduce

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        if param.dim() == 1:  # bias: added once, on rank 0
            _copy(param, loaded if self.tp_rank == 0 else torch.zeros_like(loaded))
            return
        size = param.shape[1]
        _copy(param, loaded.narrow(1, self.tp_rank * size, size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = linear(x, self.weight, self.bias)
        return all_reduce(y) if self.tp_size > 1 and self.reduce else y


def _copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    if dst.shape != src.shape:
        raise ValueError(f"weight shape {tuple(src.shape)} does not fit parameter shape {tuple(dst.shape)}")
    dst.data.copy_(src)
