"""KVCacheManager: per-request block tables on top of the BlockPool, with automatic prefix caching.

Each request owns a block table (a list of blocks; the runner sees their ids). Blocks are allocated
on demand as tokens are scheduled, so a request wastes at most the unfilled tail of its last block,
and all of them are released when it finishes or is preempted.

Prefix caching: block i of a request is identified by ``request.block_hashes[i]``, a hash chained
from block i-1's hash and block i's token ids (``Request.cache_salt`` is mixed into block 0, so
different salts never share). A full block is registered in the hash table as soon as it is
allocated for tokens whose ids are known, i.e. in the very step that computes it: the model runner
writes every scheduled token's K/V before any attention of that step reads the cache, so another
request scheduled later in the same step may already hit it (this is how n>1 fan-outs share the
prompt's blocks). If that step is rolled back for the request (preempted in the same schedule()
call), the blocks whose K/V was not computed are unregistered when they are freed. If the whole step
never runs (its dispatch raised), discard_step() unregisters every block the step registered, hits
by other requests of that step included.
"""
from __future__ import annotations

from typing import Optional, Sequence

from jaxvllm.core.block_pool import NONE_HASH, BlockPool, KVCacheBlock, hash_block_tokens
from jaxvllm.core.request import Request


def block_token_ids(req: Request, block_index: int, block_size: int) -> list[int]:
    """Token ids of one (full) block of `req`, without materializing all_token_ids."""
    start = block_index * block_size
    end = start + block_size
    prompt = req.prompt_token_ids
    p = len(prompt)
    if end <= p:
        return prompt[start:end]
    if start >= p:
        return req.output_token_ids[start - p:end - p]
    return prompt[start:] + req.output_token_ids[:end - p]


def salt_key(salt: Optional[str | bytes]) -> Optional[bytes]:
    """A cache salt as the extra key of a request's first block hash."""
    if salt is None:
        return None
    return salt if isinstance(salt, bytes) else str(salt).encode("utf-8")


def ensure_block_hashes(req: Request, num_blocks: int, block_size: int) -> list[bytes]:
    """Extend `req.block_hashes` to cover its first `num_blocks` blocks (which must be full)."""
    hashes = req.block_hashes
    i = len(hashes)
    if i < num_blocks:
        parent = hashes[-1] if hashes else NONE_HASH
        while i < num_blocks:
            parent = hash_block_tokens(parent, block_token_ids(req, i, block_size),
                                       salt_key(req.cache_salt) if i == 0 else None)
            hashes.append(parent)
            i += 1
    return hashes


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int = 16, enable_prefix_caching: bool = True) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.block_pool = BlockPool(num_blocks, enable_prefix_caching)
        self.req_to_blocks: dict[str, list[KVCacheBlock]] = {}
        # Number of leading blocks of each request already offered to the hash table.
        self.num_cached_blocks: dict[str, int] = {}
        # Blocks registered since begin_step(): their K/V exists only once that step has run.
        self.step_cached_blocks: list[KVCacheBlock] = []
        # Cumulative prefix-cache counters, in tokens (counted once per successful admission).
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    # ---- metrics -------------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return self.block_pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.block_pool.get_num_free_blocks()

    @property
    def num_used_blocks(self) -> int:
        return self.block_pool.get_num_used_blocks()

    @property
    def usage(self) -> float:
        return self.block_pool.get_usage()

    def can_use_prefix_cache(self, req: Request) -> bool:
        # Prompt logprobs need every prompt position computed, so such requests never hit.
        return self.enable_prefix_caching and req.sampling_params.prompt_logprobs is None

    # ---- lookup / allocation -------------------------------------------------------------------
    def get_computed_blocks(self, req: Request) -> tuple[list[KVCacheBlock], int]:
        """Longest run of cached full blocks at the start of `req`'s known tokens, leaving at least
        the last token to compute. Returns (blocks, number of tokens they hold). Takes no reference."""
        if not self.can_use_prefix_cache(req):
            return [], 0
        bs = self.block_size
        max_blocks = (req.num_tokens - 1) // bs
        table = self.block_pool.cached_block_hash_to_block
        hashes = req.block_hashes
        hits: list[KVCacheBlock] = []
        for i in range(max_blocks):
            if i >= len(hashes):
                ensure_block_hashes(req, i + 1, bs)
            block = table.get(hashes[i])
            if block is None:
                break
            hits.append(block)
        return hits, len(hits) * bs

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def allocate_slots(self, req: Request, num_new_tokens: int,
                       new_computed_blocks: Sequence[KVCacheBlock] = (),
                       num_new_computed_tokens: int = 0,
                       num_lookahead_tokens: int = 0) -> Optional[list[int]]:
        """Make room for `num_new_tokens` more tokens of `req` (after its `num_computed_tokens`
        plus `num_new_computed_tokens` prefix-cache hits held by `new_computed_blocks`), and
        `num_lookahead_tokens` slots after them (a draft model's guesses; never cached).

        Returns the ids of newly allocated blocks (hits excluded), or None, changing nothing, when
        the free blocks do not suffice. Full blocks covered by the scheduled tokens are registered
        in the prefix cache immediately (see the module docstring)."""
        rid = req.request_id
        blocks = self.req_to_blocks.get(rid)
        first = blocks is None
        if first:
            blocks = []
        elif new_computed_blocks:
            raise ValueError(f"request {rid} already holds blocks; prefix hits only on admission")
        bs = self.block_size
        total = req.num_computed_tokens + num_new_computed_tokens + num_new_tokens
        need = -(-(total + num_lookahead_tokens) // bs) - len(blocks) - len(new_computed_blocks)
        pool = self.block_pool
        new_ids: list[int] = []
        if need > 0 or first:
            avail = len(pool.free_queue)
            if new_computed_blocks:
                avail -= sum(1 for b in new_computed_blocks if b.ref_cnt == 0)
            if need > avail:
                return None
            if first:
                self.req_to_blocks[rid] = blocks
                self.num_cached_blocks[rid] = len(new_computed_blocks)
                if self.can_use_prefix_cache(req):
                    self.prefix_cache_queries += req.num_tokens
                    self.prefix_cache_hits += num_new_computed_tokens
                if new_computed_blocks:
                    pool.touch(new_computed_blocks)
                    blocks.extend(new_computed_blocks)
            if need > 0:
                new = pool.get_new_blocks(need)
                blocks.extend(new)
                new_ids = [b.block_id for b in new]
        if self.enable_prefix_caching:
            # Only blocks whose token ids are all known (a sampled token may still be in flight).
            n_full = min(total, req.num_tokens) // bs
            done = self.num_cached_blocks[rid]
            if n_full > done:
                hashes = ensure_block_hashes(req, n_full, bs)
                cache_block = pool.cache_block
                for i in range(done, n_full):
                    if cache_block(blocks[i], hashes[i]):
                        self.step_cached_blocks.append(blocks[i])
                self.num_cached_blocks[rid] = n_full
        return new_ids

    def free(self, req: Request) -> None:
        """Release all of `req`'s blocks, tail first (so its prefix blocks are evicted last).
        Hashed blocks at or beyond `req.num_computed_tokens` whose only owner is `req` were
        registered for a step that never ran: they are unregistered."""
        rid = req.request_id
        blocks = self.req_to_blocks.pop(rid, None)
        self.num_cached_blocks.pop(rid, None)
        if not blocks:
            return
        pool = self.block_pool
        for i in range(req.num_computed_tokens // self.block_size, len(blocks)):
            b = blocks[i]
            if b.block_hash is not None and b.ref_cnt == 1:
                pool.uncache_block(b)
        pool.free_blocks(reversed(blocks))

    def begin_step(self) -> None:
        """Start a step's allocations: what the previous step registered is committed."""
        self.step_cached_blocks = []

    def discard_step(self) -> None:
        """The step allocated since begin_step() will never run: unregister the blocks it
        registered, whoever holds them now, so no later request reads K/V never written."""
        uncache = self.block_pool.uncache_block
        for b in self.step_cached_blocks:
            uncache(b)  # a block handed out again within the step has no hash or one of the step
        self.step_cached_blocks = []

    def get_blocks(self, req_id: str) -> list[KVCacheBlock]:
        return self.req_to_blocks.get(req_id, [])

    def get_block_ids(self, req_id: str) -> list[int]:
        return [b.block_id for b in self.req_to_blocks.get(req_id, ())]

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix (e.g. the weights were swapped, so cached K/V is stale).

        Safe to call at any time: free blocks lose their hashes (they are plain free blocks now);
        blocks in use keep their owners and contents but are unregistered, so no later request can
        hit them. Full blocks that running requests complete afterwards are registered as usual
        (their K/V mixes old and new weights if the weights changed mid-request; callers that care
        should reset while no request is running). Always returns True."""
        self.block_pool.reset_prefix_cache()
        return True

    # ---- checking ------------------------------------------------------------------------------
    def check_invariants(self) -> None:
        """Every block owned at most once per table, ref counts == number of owning tables."""
        pool = self.block_pool
        pool.check_invariants()
        refs = [0] * pool.num_blocks
        for rid, blocks in self.req_to_blocks.items():
            ids = [b.block_id for b in blocks]
            assert len(set(ids)) == len(ids), f"request {rid} owns a block twice: {ids}"
            assert 0 not in ids, f"request {rid} owns the reserved block 0"
            for b in blocks:
                assert pool.blocks[b.block_id] is b
                refs[b.block_id] += 1
            assert self.num_cached_blocks[rid] <= len(blocks)
        for block in pool.blocks[1:]:
            assert block.ref_cnt == refs[block.block_id], \
                f"{block}: ref count {block.ref_cnt} but owned by {refs[block.block_id]} tables"
