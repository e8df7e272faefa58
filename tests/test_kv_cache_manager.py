
from jaxvllm.core.kv_cache_manager import KVCacheManager, block_token_ids, ensure_block_hashes
from jaxvllm.core.request import Request
from jaxvllm.sampling_params import SamplingParams

BS = 16


def make_req(rid, tokens, salt=None, prompt_logprobs=None, max_tokens=16):
    sp = SamplingParams(max_tokens=max_tokens, prompt_logprobs=prompt_logprobs)
    return Request(rid, tokens, sp, eos_token_id=2, cache_salt=salt)


def admit(kv, req, num_tokens=None):
    """What the scheduler does for a waiting request: lookup, allocate, advance."""
    hits, num_hit = kv.get_computed_blocks(req)
    n = req.num_tokens - num_hit if num_tokens is None else num_tokens
    ids = kv.allocate_slots(req, n, hits, num_hit)
    assert ids is not None
    req.num_computed_tokens = num_hit + n
    kv.check_invariants()
    return num_hit


def test_on_demand_allocation_wastes_at_most_the_tail():
    kv = KVCacheManager(num_blocks=64, block_size=BS)
    req = make_req("a", list(range(100, 137)))  # 37 tokens
    admit(kv, req, num_tokens=20)
    assert len(kv.get_block_ids("a")) == 2
    new = kv.allocate_slots(req, 17)  # up to 37 tokens -> 3 blocks
    req.num_computed_tokens = 37
    assert len(new) == 1 and len(kv.get_block_ids("a")) == 3
    for _ in range(11):  # decode up to 48 tokens: no new block
        req.output_token_ids.append(5)
        assert kv.allocate_slots(req, 1) == []
        req.num_computed_tokens += 1
    req.output_token_ids.append(5)
    assert len(kv.allocate_slots(req, 1)) == 1  # token 49 opens block 4
    ids = kv.get_block_ids("a")
    assert 0 not in ids and len(set(ids)) == 4
    assert kv.num_used_blocks == 4 and kv.num_free_blocks == 63 - 4
    kv.free(req)
    assert kv.num_free_blocks == 63 and kv.usage == 0.0
    kv.check_invariants()


def test_allocate_returns_none_and_changes_nothing_when_full():
    kv = KVCacheManager(num_blocks=4, block_size=BS)  # 3 usable
    a = make_req("a", list(range(40)))
    admit(kv, a)
    b = make_req("b", list(range(1000, 1040)))
    hits, nh = kv.get_computed_blocks(b)
    assert kv.allocate_slots(b, 40, hits, nh) is None
    assert "b" not in kv.req_to_blocks and kv.num_free_blocks == 0
    kv.check_invariants()


def test_prefix_hits_for_shared_prefix_and_counters():
    kv = KVCacheManager(num_blocks=64, block_size=BS)
    shared = list(range(1000, 1040))  # 2 full blocks + 8
    a = make_req("a", shared + [1, 2, 3])
    assert admit(kv, a) == 0
    b = make_req("b", shared + [9, 9])
    assert admit(kv, b) == 32
    assert kv.get_block_ids("a")[:2] == kv.get_block_ids("b")[:2]
    assert kv.get_block_ids("a")[2] != kv.get_block_ids("b")[2]
    assert [blk.ref_cnt for blk in kv.get_blocks("b")[:2]] == [2, 2]
    assert kv.prefix_cache_queries == 43 + 42 and kv.prefix_cache_hits == 32
    # After both finish, their cached blocks remain reusable.
    kv.free(a)
    kv.free(b)
    c = make_req("c", shared + [7])
    assert admit(kv, c) == 32
    kv.check_invariants()


def test_last_prompt_token_always_computed():
    kv = KVCacheManager(num_blocks=64, block_size=BS)
    prompt = list(range(500, 532))  # exactly 2 blocks
    admit(kv, make_req("a", prompt))
    b = make_req("b", prompt)
    hits, nh = kv.get_computed_blocks(b)
    assert nh == 16 and len(hits) == 1  # not 32: the last token must be computed
    one_block = list(range(500, 516))
    c = make_req("c", one_block)
    assert kv.get_computed_blocks(c) == ([], 0)


def test_hash_chaining_same_block_different_parent_no_hit():
    kv = KVCacheManager(num_blocks=64, block_size=BS)
    admit(kv, make_req("a", [1] * 16 + [2] * 16 + [3]))
    b = make_req("b", [9] * 16 + [2] * 16 + [3])  # block 1 identical, parent differs
    assert kv.get_computed_blocks(b)[1] == 0
    a2 = make_req("a2", [1] * 16 + [2] * 16 + [3])
    ensure_block_hashes(a2, 2, BS)
    ensure_block_hashes(b, 2, BS)
    assert a2.block_hashes[1] != b.block_hashes[1]


def test_cache_salt_isolation():
    kv = KVCacheManager(num_blocks=64, block_size=BS)
    prompt = list(range(40))
    admit(kv, make_req("a", prompt, salt="tenant-1"))
    assert kv.get_computed_blocks(make_req("b", prompt, salt="tenant-2"))[1] == 0
    assert kv.get_computed_blocks(make_req("c", prompt))[1] == 0
    assert kv.get_computed_blocks(make_req("d", prompt, salt="tenant-1"))[1] == 32


def test_prompt_logprobs_requests_get_no_hits_but_their_blocks_are_shared():
    kv = KVCacheManager(num_blocks=64, block_size=BS)
    prompt = list(range(40))
    admit(kv, make_req("a", prompt))
    p = make_req("p", prompt, prompt_logprobs=1)
    assert admit(kv, p) == 0
    # Blocks computed by a prompt-logprobs request are still registered for others.
    kv2 = KVCacheManager(num_blocks=64, block_size=BS)
    admit(kv2, make_req("p", prompt, prompt_logprobs=0))
    assert kv2.get_computed_blocks(make_req("q", prompt))[1] == 32
    assert kv2.prefix_cache_queries == 0  # the prompt-logprobs request did not query


def test_prefix_caching_disabled():
    kv = KVCacheManager(num_blocks=64, block_size=BS, enable_prefix_caching=False)
    prompt = list(range(40))
    admit(kv, make_req("a", prompt))
    assert kv.get_computed_blocks(make_req("b", prompt)) == ([], 0)
    assert not kv.block_pool.cached_block_hash_to_block


def test_full_block_registered_at_allocation_same_step_sharing():
    kv = KVCacheManager(num_blocks=64, block_size=BS)
    prompt = list(range(100))
    a = make_req("a", prompt)
    admit(kv, a)  # allocation only: nothing has been "computed" yet
    assert len(kv.block_pool.cached_block_hash_to_block) == 6
    b = make_req("b", prompt)
    assert admit(kv, b) == 96
    assert kv.get_block_ids("b")[:6] == kv.get_block_ids("a")[:6]


def test_chunked_allocation_registers_blocks_as_they_fill():
    kv = KVCacheManager(num_blocks=64, block_size=BS)
    prompt = list(range(100))
    a = make_req("a", prompt)
    admit(kv, a, num_tokens=20)  # 1 full block
    assert len(kv.block_pool.cached_block_hash_to_block) == 1
    kv.allocate_slots(a, 30)     # 50 tokens -> 3 full blocks
    a.num_computed_tokens = 50
    assert len(kv.block_pool.cached_block_hash_to_block) == 3
    assert kv.get_computed_blocks(make_req("b", prompt))[1] == 48


def test_blocks_with_output_tokens_are_hashed():
    kv = KVCacheManager(num_blocks=64, block_size=BS)
    a = make_req("a", list(range(10)))
    admit(kv, a)
    for t in range(30):
        a.output_token_ids.append(1000 + t)
        kv.allocate_slots(a, 1)
        a.num_computed_tokens += 1
    # 40 known tokens, 39 computed -> 2 full blocks registered, spanning prompt and outputs.
    assert block_token_ids(a, 0, BS) == list(range(10)) + [1000 + t for t in range(6)]
    assert block_token_ids(a, 1, BS) == [1006 + t for t in range(16)]
    b = make_req("b", list(range(10)) + [1000 + t for t in range(30)])
    assert kv.get_computed_blocks(b)[1] == 32


def test_hits_on_free_blocks_count_against_free_space():
    kv = KVCacheManager(num_blocks=4, block_size=BS)  # 3 usable
    prompt = list(range(48))
    a = make_req("a", prompt)
    admit(kv, a)
    kv.free(a)
    assert kv.num_free_blocks == 3
    # b hits 2 free cached blocks and needs 1 more: exactly fits.
    b = make_req("b", prompt[:32] + [1])
    assert admit(kv, b) == 32
    assert kv.num_free_blocks == 0
    kv.check_invariants()
    kv.free(b)
    # c would hit 2 free blocks but needs 2 more new ones: 2 + 2 > 3 -> refused, nothing touched.
    c = make_req("c", prompt[:32] + list(range(900, 925)))
    hits, nh = kv.get_computed_blocks(c)
    assert nh == 32
    assert kv.allocate_slots(c, c.num_tokens - nh, hits, nh) is None
    assert all(h.ref_cnt == 0 for h in hits) and kv.num_free_blocks == 3
    kv.check_invariants()


def test_free_unregisters_blocks_of_a_rolled_back_step():
    kv = KVCacheManager(num_blocks=64, block_size=BS)
    prompt = list(range(64))
    a = make_req("a", prompt)
    admit(kv, a, num_tokens=16)      # block 0 computed
    kv.allocate_slots(a, 40)         # registers blocks 1, 2 for this step
    assert len(kv.block_pool.cached_block_hash_to_block) == 3
    # The step is rolled back before running: num_computed_tokens stays 16.
    kv.free(a)
    assert len(kv.block_pool.cached_block_hash_to_block) == 1
    assert kv.get_computed_blocks(make_req("b", prompt))[1] == 16
    kv.check_invariants()


def test_lru_eviction_prefers_tails_and_old_requests():
    kv = KVCacheManager(num_blocks=7, block_size=BS)  # 6 usable
    a = make_req("a", list(range(0, 48)) + [1])       # 3 full + partial = 4 blocks
    admit(kv, a)
    a_ids = kv.get_block_ids("a")
    kv.free(a)
    # Free queue now: a's unhashed partial block first, then never-used blocks 5, 6, then a's
    # cached blocks tail first (a2, a1, a0).
    assert list(kv.block_pool.free_queue) == [a_ids[3], 5, 6, a_ids[2], a_ids[1], a_ids[0]]
    b = make_req("b", list(range(1000, 1020)))        # 2 new blocks
    admit(kv, b)
    assert kv.get_block_ids("b") == [a_ids[3], 5]
    d = make_req("d", list(range(2000, 2020)))        # 2 more: evicts a's tail before its prefix
    admit(kv, d)
    assert kv.get_block_ids("d") == [6, a_ids[2]]
    c = make_req("c", list(range(0, 32)) + [5])
    assert kv.get_computed_blocks(c)[1] == 32         # a's prefix blocks survived


def test_reset_prefix_cache():
    kv = KVCacheManager(num_blocks=64, block_size=BS)
    prompt = list(range(40))
    a = make_req("a", prompt)
    admit(kv, a)
    done = make_req("done", list(range(500, 540)))
    admit(kv, done)
    kv.free(done)
    assert kv.reset_prefix_cache()
    assert kv.get_computed_blocks(make_req("b", prompt))[1] == 0
    assert kv.get_computed_blocks(make_req("c", list(range(500, 540))))[1] == 0
    # The running request keeps its blocks and can keep growing.
    assert len(kv.get_block_ids("a")) == 3
    a.output_token_ids.extend([1] * 10)
    assert kv.allocate_slots(a, 10) is not None
    kv.check_invariants()
    kv.free(a)
    assert kv.num_free_blocks == 63
