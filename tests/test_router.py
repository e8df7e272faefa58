"""The data-parallel router (jaxvllm/core/router.py), alone: pure Python, on real KV-cache managers."""
import pytest

from jaxvllm.core.kv_cache_manager import KVCacheManager
from jaxvllm.core.request import Request, lora_cache_salt
from jaxvllm.core.router import ReplicaState, Router, RouterConfig
from jaxvllm.sampling_params import SamplingParams

BS = 16
PREFIX = list(range(1000, 1000 + 3 * BS))  # three full blocks


def replica(held_prompt=None, load=0, usage=0.0, lora_id=0):
    """A replica state whose KV cache holds `held_prompt`'s full blocks (as a scheduler leaves them),
    computed under LoRA adapter `lora_id`."""
    kv = KVCacheManager(num_blocks=64, block_size=BS)
    if held_prompt is not None:
        req = Request("held", held_prompt, SamplingParams(max_tokens=4), eos_token_id=2,
                      cache_salt=lora_cache_salt(lora_id), lora_id=lora_id)
        assert kv.allocate_slots(req, len(held_prompt)) is not None
    return ReplicaState(num_unfinished=load, kv_cache_usage=usage,
                        cached_blocks=kv.block_pool.cached_block_hash_to_block), kv


def _hashes(prompt):
    return Router(RouterConfig(BS, 4)).block_hashes(prompt)


def route(states, prompt, margin=4):
    router = Router(RouterConfig(block_size=BS, overload_margin=margin))
    return router.route(router.block_hashes(prompt), states)


def test_least_loaded_without_prefix_then_kv_usage_then_index():
    other = list(range(5000, 5040))
    assert route([replica(load=3)[0], replica(load=1)[0], replica(load=2)[0]], other) == 1
    assert route([replica(load=1, usage=0.5)[0], replica(load=1, usage=0.2)[0]], other) == 1
    assert route([replica(load=1)[0], replica(load=1)[0]], other) == 0


def test_prefix_holder_wins_within_the_margin():
    holder, kv = replica(PREFIX + [7, 8], load=4)
    prompt = PREFIX + [9, 9, 9]
    assert route([replica(load=0)[0], holder], prompt, margin=4) == 1
    # The hashes the router matched are the ones the holder's KV-cache manager hits on admission.
    req = Request("new", prompt, SamplingParams(max_tokens=4), eos_token_id=2)
    assert kv.get_computed_blocks(req)[1] == 3 * BS


@pytest.mark.parametrize("held_under, asked_with, affine", [
    (1, 1, True), (1, 2, False), (1, 0, False), (0, 1, False), (0, 0, True)])
def test_affinity_is_per_lora_adapter(held_under, asked_with, affine):
    """A prefix computed under one adapter is another adapter's (or the base model's) miss: the
    router salts its hashes as the KV-cache manager does."""
    holder, kv = replica(PREFIX + [7, 8], load=2, lora_id=held_under)
    prompt = PREFIX + [9, 9, 9]
    router = Router(RouterConfig(block_size=BS, overload_margin=4))
    hashes = router.block_hashes(prompt, lora_cache_salt(asked_with))
    assert router.route(hashes, [replica(load=0)[0], holder]) == int(affine)
    req = Request("new", prompt, SamplingParams(max_tokens=4), eos_token_id=2,
                  cache_salt=lora_cache_salt(asked_with), lora_id=asked_with)
    assert kv.get_computed_blocks(req)[1] == 3 * BS * affine


def test_overloaded_holder_is_passed_over():
    holder = replica(PREFIX + [7, 8], load=5)[0]
    assert route([replica(load=0)[0], holder], PREFIX + [9], margin=4) == 0


def test_longest_held_prefix_wins():
    one_block = replica(PREFIX[:BS] + [1] * BS, load=0)[0]      # shares block 0 only
    three = replica(PREFIX + [1], load=2)[0]
    assert route([one_block, three], PREFIX + [9], margin=4) == 1
    assert Router.held_prefix_blocks(_hashes(PREFIX + [9]), [one_block, three]) == [1, 3]


def test_last_prompt_token_is_never_a_hit():
    """A prompt of exactly three blocks can hit two (its last token is always computed), as the
    KV-cache manager's lookup."""
    states = [replica(PREFIX + [1])[0]]
    assert Router.held_prefix_blocks(_hashes(PREFIX), states) == [2]
    assert Router.held_prefix_blocks(_hashes(PREFIX[:BS]), states) == [0]


def test_config_validation():
    with pytest.raises(ValueError, match="block_size"):
        RouterConfig(block_size=0, overload_margin=1)
    with pytest.raises(ValueError, match="overload_margin"):
        RouterConfig(block_size=16, overload_margin=-1)
    with pytest.raises(ValueError, match="no replicas"):
        route([], PREFIX)
