import pytest

from jaxvllm.core.block_pool import NONE_HASH, BlockPool, hash_block_tokens


def test_hash_is_deterministic_and_chained():
    toks = list(range(16))
    h1 = hash_block_tokens(NONE_HASH, toks)
    assert h1 == hash_block_tokens(NONE_HASH, list(toks))
    assert isinstance(h1, bytes) and len(h1) == 32
    # Same tokens, different parent -> different hash.
    other_parent = hash_block_tokens(NONE_HASH, [7] * 16)
    assert hash_block_tokens(other_parent, toks) != h1
    # Different tokens -> different hash; order matters.
    assert hash_block_tokens(NONE_HASH, toks[::-1]) != h1
    # Extra key (cache salt) changes the hash.
    assert hash_block_tokens(NONE_HASH, toks, b"salt") != h1
    assert hash_block_tokens(NONE_HASH, toks, b"salt") != hash_block_tokens(NONE_HASH, toks, b"salt2")
    # Large token ids are encoded without collisions between neighbours.
    assert hash_block_tokens(NONE_HASH, [2**40] + [0] * 15) != hash_block_tokens(NONE_HASH, [0] * 16)


def test_block_zero_reserved_and_allocation():
    pool = BlockPool(8)
    assert pool.get_num_free_blocks() == 7
    blocks = pool.get_new_blocks(7)
    ids = [b.block_id for b in blocks]
    assert sorted(ids) == list(range(1, 8))
    assert all(b.ref_cnt == 1 for b in blocks)
    assert pool.get_num_free_blocks() == 0 and pool.get_usage() == 1.0
    with pytest.raises(ValueError):
        pool.get_new_blocks(1)
    pool.free_blocks(blocks)
    assert pool.get_num_free_blocks() == 7 and pool.get_usage() == 0.0
    pool.check_invariants()
    with pytest.raises(ValueError):
        BlockPool(1)


def test_ref_counts_touch_and_free():
    pool = BlockPool(4)
    (b,) = pool.get_new_blocks(1)
    pool.touch([b])
    assert b.ref_cnt == 2
    pool.free_blocks([b])
    assert b.ref_cnt == 1 and b.block_id not in pool.free_queue
    pool.free_blocks([b])
    assert b.ref_cnt == 0 and b.block_id in pool.free_queue
    # Touching a free block takes it out of the free queue.
    pool.touch([b])
    assert b.ref_cnt == 1 and b.block_id not in pool.free_queue
    pool.check_invariants()


def test_lru_eviction_order_of_cached_blocks():
    pool = BlockPool(6)
    blocks = pool.get_new_blocks(5)
    hashes = [hash_block_tokens(NONE_HASH, [i] * 16) for i in range(5)]
    for b, h in zip(blocks, hashes):
        assert pool.cache_block(b, h)
    # Free in the order 3, 1, 4, 0, 2: eviction must follow the same order.
    order = [3, 1, 4, 0, 2]
    for i in order:
        pool.free_blocks([blocks[i]])
    assert all(pool.cached_block_hash_to_block.get(h) is not None for h in hashes)  # still reusable
    for k, i in enumerate(order):
        (nb,) = pool.get_new_blocks(1)
        assert nb is blocks[i]
        assert nb.block_hash is None and pool.cached_block_hash_to_block.get(hashes[i]) is None
        # Blocks not yet evicted are still cached.
        for j in order[k + 1:]:
            assert pool.cached_block_hash_to_block.get(hashes[j]) is blocks[j]
    pool.check_invariants()


def test_unhashed_free_blocks_are_evicted_before_cached_ones():
    pool = BlockPool(5)
    a, b, c, d = pool.get_new_blocks(4)
    pool.cache_block(a, hash_block_tokens(NONE_HASH, [1] * 16))
    pool.cache_block(b, hash_block_tokens(NONE_HASH, [2] * 16))
    pool.free_blocks([a, b])          # cached, LRU order a, b
    pool.free_blocks([c, d])          # plain: go to the front
    got = [x.block_id for x in pool.get_new_blocks(4)]
    assert set(got[:2]) == {c.block_id, d.block_id}
    assert got[2:] == [a.block_id, b.block_id]


def test_cache_block_keeps_first_owner_of_a_hash():
    pool = BlockPool(4)
    a, b = pool.get_new_blocks(2)
    h = hash_block_tokens(NONE_HASH, [5] * 16)
    assert pool.cache_block(a, h)
    assert not pool.cache_block(b, h)
    assert b.block_hash is None and pool.cached_block_hash_to_block.get(h) is a
    pool.check_invariants()


def test_caching_disabled_registers_nothing():
    pool = BlockPool(4, enable_caching=False)
    (a,) = pool.get_new_blocks(1)
    assert not pool.cache_block(a, hash_block_tokens(NONE_HASH, [5] * 16))
    assert a.block_hash is None


def test_uncache_and_reset():
    pool = BlockPool(6)
    blocks = pool.get_new_blocks(3)
    hs = [hash_block_tokens(NONE_HASH, [i] * 16) for i in range(3)]
    for blk, h in zip(blocks, hs):
        pool.cache_block(blk, h)
    pool.free_blocks([blocks[0]])
    pool.uncache_block(blocks[0])
    assert pool.cached_block_hash_to_block.get(hs[0]) is None
    # An uncached free block is evicted first.
    assert next(iter(pool.free_queue)) == blocks[0].block_id
    assert pool.reset_prefix_cache() == 2
    assert all(b.block_hash is None for b in pool.blocks)
    assert not pool.cached_block_hash_to_block
    assert [b.ref_cnt for b in blocks] == [0, 1, 1]  # ownership untouched
    pool.check_invariants()
