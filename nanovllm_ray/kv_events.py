"""What the engine and the prefix-aware router agree on about KV blocks: the chained block hash that names a full
block, and the events the block manager records when it stores or evicts one (the router's index follows them).
A neutral module: the engine (block manager) and the router (index, request router) both import it, neither
imports the other.

A full block of `block_size` token ids hashes to xxhash64(parent hash, token ids); the first block has no
parent. Two sequences that share their first n full blocks share the first n hashes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import xxhash

NO_PARENT = -1


def hash_block(parent: int, token_ids: Sequence[int]) -> int:
    h = xxhash.xxh64()
    if parent != NO_PARENT:
        h.update(parent.to_bytes(8, "little"))
    h.update(np.asarray(token_ids, dtype=np.int64).tobytes())
    return h.intdigest()


def prefix_block_hashes(token_ids: Sequence[int], block_size: int, max_blocks: int | None = None) -> list[int]:
    """Hashes of the full blocks of token_ids, in order (at most max_blocks)."""
    n = len(token_ids) // block_size
    if max_blocks is not None:
        n = min(n, max_blocks)
    hashes: list[int] = []
    parent = NO_PARENT
    for i in range(n):
        parent = hash_block(parent, token_ids[i * block_size:(i + 1) * block_size])
        hashes.append(parent)
    return hashes


@dataclass(frozen=True, slots=True)
class BlockStored:
    block_hash: int
    parent_hash: int  # NO_PARENT for a first block
    token_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    block_hash: int


KVCacheEvent = BlockStored | BlockRemoved
