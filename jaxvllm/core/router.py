"""Which data-parallel replica a new request goes to: the least-loaded one, unless a replica already
holds the request's prompt prefix in its KV cache and is not overloaded.

Pure bookkeeping (no JAX): the engine passes one `ReplicaState` per replica. A prefix is "held"
when the chained hashes of the prompt's first full blocks (`block_pool.hash_block_tokens`, exactly
as the KV-cache manager computes them) are in the replica's `cached_blocks` (the data-parallel
front's record of the prompts it sent there), so a request routed there starts with those blocks
as prefix-cache hits instead of recomputing them on another replica.

Affinity yields to balance: a replica with more than `overload_margin` unfinished sequences above
the least-loaded replica is passed over whatever it holds (the absolute threshold of SGLang's
cache-aware router), since a shared system prompt would otherwise send every request to the replica
that saw it first.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Container, Optional, Sequence

from jaxvllm.core.block_pool import NONE_HASH, BlockHash, hash_block_tokens
from jaxvllm.core.kv_cache_manager import salt_key


@dataclass
class RouterConfig:
    block_size: int
    overload_margin: int  # unfinished sequences above the least-loaded replica that void affinity

    def __post_init__(self) -> None:
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"block_size must be a positive int, got {self.block_size!r}")
        if not isinstance(self.overload_margin, int) or self.overload_margin < 0:
            raise ValueError(f"overload_margin must be a non-negative int, got {self.overload_margin!r}")


@dataclass
class ReplicaState:
    """What the router reads of one replica when a request arrives."""
    num_unfinished: int                  # sequences (n > 1 counts n) queued or running
    kv_cache_usage: float                # fraction of its KV blocks in use
    cached_blocks: Container[BlockHash]  # block hashes it holds (or was sent)


class Router:
    def __init__(self, config: RouterConfig) -> None:
        self.config = config

    def route(self, block_hashes: Sequence[BlockHash], replicas: Sequence[ReplicaState]) -> int:
        """Index of the replica for a new request whose prompt has `block_hashes`
        (`block_hashes(prompt)`): among replicas not overloaded, the one holding the longest prefix
        of them, then the least loaded (fewest unfinished sequences, then lowest KV-cache usage),
        then the lowest index."""
        if not replicas:
            raise ValueError("no replicas to route to")
        least = min(r.num_unfinished for r in replicas)
        eligible = [i for i, r in enumerate(replicas)
                    if r.num_unfinished <= least + self.config.overload_margin]
        held = self.held_prefix_blocks(block_hashes, [replicas[i] for i in eligible])
        return min(zip(eligible, held),
                   key=lambda e: (-e[1], replicas[e[0]].num_unfinished,
                                  replicas[e[0]].kv_cache_usage, e[0]))[0]

    @staticmethod
    def held_prefix_blocks(block_hashes: Sequence[BlockHash],
                           replicas: Sequence[ReplicaState]) -> list[int]:
        """Per replica, how many of the leading `block_hashes` it holds."""
        held = [0] * len(replicas)
        alive = list(range(len(replicas)))
        for i, h in enumerate(block_hashes):
            alive = [j for j in alive if h in replicas[j].cached_blocks]
            if not alive:
                break
            for j in alive:
                held[j] = i + 1
        return held

    def block_hashes(self, prompt_token_ids: Sequence[int],
                     cache_salt: Optional[str] = None) -> list[BlockHash]:
        """The chained hashes of the prompt's full blocks, in order, salted as the request's
        (`Request.cache_salt`: a LoRA adapter's K/V are its own). The last prompt token is always
        computed (as the KV-cache manager's lookup), so the blocks considered end before it."""
        bs = self.config.block_size
        hashes, parent = [], NONE_HASH
        for i in range((len(prompt_token_ids) - 1) // bs):
            parent = hash_block_tokens(parent, prompt_token_ids[i * bs:(i + 1) * bs],
                                       salt_key(cache_salt) if i == 0 else None)
            hashes.append(parent)
        return hashes
