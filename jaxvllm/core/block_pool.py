"""The KV-cache block pool: ref-counted blocks, an LRU free queue, and the prefix-cache hash table.

Block 0 is the padding target of the model runner (padded tokens write their K/V there), so it is
never handed out: usable blocks are 1 .. num_blocks-1.

A block is in exactly one of two states:
  * in use: ``ref_cnt > 0`` (owned by that many requests' block tables), not in the free queue;
  * free: ``ref_cnt == 0``, in the free queue.
Independently, a block may carry a ``block_hash`` and be registered in the hash table. A free block
with a hash still holds valid K/V: a prefix-cache hit "touches" it (takes it out of the free queue)
and it is in use again, with no recomputation. A free block is only forgotten (its hash dropped)
when it is handed out again as a new block.

Free-queue order is the eviction order (front = evicted first):
  * blocks freed without a hash carry nothing reusable and go to the FRONT;
  * blocks freed with a hash go to the BACK, so among cached blocks the least recently freed is
    evicted first (LRU). Callers free a request's blocks tail-first, so a request's later blocks
    (the least shareable ones) are evicted before its prefix blocks.
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from typing import Iterable, Optional, Sequence

# Block hashes are sha256 digests (32 bytes) chained from the parent block's digest:
#   hash(block i) = sha256(hash(block i-1) || int64 token ids of block i || extra key (block 0 only))
# A collision would make a request silently read another prefix's K/V (wrong output, and in a
# multi-tenant server a cross-user leak), so the hash must be collision resistant even against
# crafted prompts; Python's built-in tuple hash is 64-bit and not designed for adversaries. sha256
# over the compact int64 encoding costs ~1 us per 16-token block, and each full block is hashed once
# per request, which is negligible next to a model step. The encoding is unambiguous: the parent is
# always 32 bytes and a full block always has block_size tokens, so the extra key is a pure suffix.
BlockHash = bytes
NONE_HASH: BlockHash = b"\x00" * 32  # parent of a request's first block


def hash_block_tokens(parent_hash: BlockHash, token_ids: Sequence[int],
                      extra_key: Optional[bytes] = None) -> BlockHash:
    data = parent_hash + array("q", token_ids).tobytes()
    if extra_key:
        data += extra_key
    return hashlib.sha256(data).digest()


class KVCacheBlock:
    __slots__ = ("block_id", "ref_cnt", "block_hash")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: Optional[BlockHash] = None

    def __repr__(self) -> str:
        h = self.block_hash.hex()[:8] if self.block_hash else None
        return f"KVCacheBlock(id={self.block_id}, ref={self.ref_cnt}, hash={h})"


class BlockPool:
    """All blocks of one KV cache. Pure bookkeeping; the K/V arrays live in the model runner."""

    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        if num_blocks < 2:
            raise ValueError(f"num_blocks must be at least 2 (block 0 is reserved), got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVCacheBlock(i) for i in range(num_blocks)]
        self.null_block = self.blocks[0]
        self.null_block.ref_cnt = 1  # never free, never handed out
        # block_id -> block; insertion order is eviction order (OrderedDict: O(1) pop-front,
        # removal from the middle and push-front, all in C).
        self.free_queue: OrderedDict[int, KVCacheBlock] = OrderedDict(
            (b.block_id, b) for b in self.blocks[1:])
        self.cached_block_hash_to_block: dict[BlockHash, KVCacheBlock] = {}

    # ---- queries -------------------------------------------------------------------------------
    def get_num_free_blocks(self) -> int:
        return len(self.free_queue)

    def get_num_used_blocks(self) -> int:
        return self.num_blocks - 1 - len(self.free_queue)

    def get_usage(self) -> float:
        """Fraction of usable blocks that are in use (free-but-cached blocks count as free)."""
        return (self.num_blocks - 1 - len(self.free_queue)) / (self.num_blocks - 1)

    # ---- allocation ----------------------------------------------------------------------------
    def get_new_blocks(self, num_blocks: int) -> list[KVCacheBlock]:
        """Pop `num_blocks` blocks from the front of the free queue (evicting their hashes)."""
        if num_blocks > len(self.free_queue):
            raise ValueError(f"cannot allocate {num_blocks} blocks: only {len(self.free_queue)} free")
        popitem = self.free_queue.popitem
        table = self.cached_block_hash_to_block
        out = []
        for _ in range(num_blocks):
            block = popitem(last=False)[1]
            h = block.block_hash
            if h is not None:
                if table.get(h) is block:
                    del table[h]
                block.block_hash = None
            block.ref_cnt = 1
            out.append(block)
        return out

    def touch(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Take a reference on prefix-cache hits (removing free ones from the free queue)."""
        fq = self.free_queue
        for block in blocks:
            if block.ref_cnt == 0:
                del fq[block.block_id]
            block.ref_cnt += 1

    def free_blocks(self, ordered_blocks: Iterable[KVCacheBlock]) -> None:
        """Drop one reference from each block, in the given order (earlier = evicted sooner)."""
        fq = self.free_queue
        for block in ordered_blocks:
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                bid = block.block_id
                fq[bid] = block
                if block.block_hash is None:
                    fq.move_to_end(bid, last=False)

    # ---- prefix cache --------------------------------------------------------------------------
    def cache_block(self, block: KVCacheBlock, block_hash: BlockHash) -> bool:
        """Register `block` under `block_hash`. If another block already holds that hash (the same
        content computed twice), the first one stays canonical and `block` stays unhashed."""
        if not self.enable_caching or block.block_hash is not None:
            return False
        table = self.cached_block_hash_to_block
        if block_hash in table:
            return False
        table[block_hash] = block
        block.block_hash = block_hash
        return True

    def uncache_block(self, block: KVCacheBlock) -> None:
        """Forget a block's hash (its K/V will not be valid, e.g. its step was rolled back)."""
        h = block.block_hash
        if h is None:
            return
        if self.cached_block_hash_to_block.get(h) is block:
            del self.cached_block_hash_to_block[h]
        block.block_hash = None
        if block.ref_cnt == 0:  # now worthless: evict it first
            self.free_queue.move_to_end(block.block_id, last=False)

    def reset_prefix_cache(self) -> int:
        """Drop every hash (free and in-use blocks alike). Blocks in use keep their owners and
        contents; they are simply no longer findable. Returns the number of hashes dropped."""
        n = len(self.cached_block_hash_to_block)
        for block in self.cached_block_hash_to_block.values():
            block.block_hash = None
        self.cached_block_hash_to_block.clear()
        return n

    # ---- checking ------------------------------------------------------------------------------
    def check_invariants(self) -> None:
        assert self.null_block.ref_cnt == 1 and 0 not in self.free_queue, "block 0 handed out"
        for bid, block in self.free_queue.items():
            assert block.block_id == bid and block.ref_cnt == 0, f"bad free block {block}"
        for block in self.blocks[1:]:
            assert block.ref_cnt >= 0, f"negative ref count {block}"
            assert (block.ref_cnt == 0) == (block.block_id in self.free_queue), \
                f"block {block} free-queue membership disagrees with its ref count"
        for h, block in self.cached_block_hash_to_block.items():
            assert block.block_hash == h, f"hash table entry disagrees with {block}"
        n_hashed = sum(1 for b in self.blocks if b.block_hash is not None)
        assert n_hashed == len(self.cached_block_hash_to_block), "hashed block missing from table"
