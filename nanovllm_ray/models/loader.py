"""Loads a Hugging Face safetensors checkpoint into a model by parameter name, each rank taking its shard."""

from __future__ import annotations

import glob
import os

import torch
from safetensors import safe_open
from torch import nn


class CheckpointError(RuntimeError):
    """The checkpoint directory is missing files, is corrupt, or does not match the model."""


def load_model(model: nn.Module, path: str) -> None:
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise CheckpointError(f"no *.safetensors files in {path!r}")
    packed = getattr(model, "packed_modules_mapping", {})
    params = dict(model.named_parameters(remove_duplicate=False))
    tied = getattr(model, "tie_word_embeddings", False)
    loaded: set[str] = set()
    for file in files:
        try:
            f = safe_open(file, "pt", "cpu")
        except Exception as e:  # safetensors raises its own error types for truncated or bad headers
            raise CheckpointError(f"cannot read checkpoint file {file!r}: {e}") from e
        with f:
            for name in f.keys():
                if tied and name == "lm_head.weight":
                    continue  # tied checkpoints sometimes carry a copy of the embedding
                target, shard = name, None
                for frag, (fused, shard_id) in packed.items():
                    if f".{frag}." in name:
                        target, shard = name.replace(frag, fused), shard_id
                        break
                param = params.get(target)
                if param is None:
                    raise CheckpointError(f"{file!r} has tensor {name!r}, which the model does not have")
                try:
                    tensor = f.get_tensor(name)
                except Exception as e:
                    raise CheckpointError(f"cannot read tensor {name!r} from {file!r}: {e}") from e
                loader = getattr(param, "weight_loader", None)
                try:
                    with torch.no_grad():
                        if loader is None:
                            _default_load(param, tensor)
                        elif shard is None:
                            loader(param, tensor)
                        else:
                            loader(param, tensor, shard)
                except (ValueError, RuntimeError) as e:  # a shard that does not fit: shape mismatch
                    raise CheckpointError(f"tensor {name!r} in {file!r} (shape {tuple(tensor.shape)}) does not fit "
                                          f"the model: {e}") from e
                loaded.add(target if shard is None else f"{target}:{shard}")
    expected = set()
    for name in params:
        if tied and name == "lm_head.weight":
            continue
        shards = [sid for frag, (fused, sid) in packed.items() if f".{fused}." in name]
        expected |= {f"{name}:{s}" for s in shards} if shards else {name}
    missing = sorted(expected - loaded)
    if missing:
        raise CheckpointError(f"checkpoint {path!r} lacks {len(missing)} tensors, e.g. {missing[:5]}")


def _default_load(param: nn.Parameter, tensor: torch.Tensor) -> None:
    if param.shape != tensor.shape:
        raise ValueError(f"shape {tuple(tensor.shape)} does not fit parameter shape {tuple(param.shape)}")
    param.data.copy_(tensor)
