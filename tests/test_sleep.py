"""Sleep mode (LLM.sleep / wake_up, vLLM's names): the engine's device memory given back between
generate calls and brought back without compiling anything again, on the default model."""
from __future__ import annotations

import gc

import jax
import numpy as np
import pytest

from jaxvllm import LLM, SamplingParams

# Longer than two KV blocks (16 tokens): their full blocks enter the prefix cache.
PROMPTS = ["The capital of France is Paris, the capital of Germany is Berlin, the capital of "
           "Italy is Rome, and the capital of Spain is", "def fibonacci(n):\n    "]


def _live_bytes() -> int:
    """Bytes of the live arrays in device memory (a sleeping engine's host copies are in pinned
    host memory: on a GPU not the device's, on the CPU backend the same RAM)."""
    gc.collect()
    return sum(a.nbytes for a in jax.live_arrays() if a.sharding.memory_kind == "device")


def _generate(llm: LLM) -> list[list[int]]:
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=6), use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def test_sleep_frees_the_cache_and_weights_and_wake_up_compiles_nothing():
    llm = LLM(dtype="float32", max_model_len=128, max_num_seqs=4, max_num_batched_tokens=64,
              num_gpu_blocks_override=64, enforce_eager=True, token_buckets=(8, 64),
              enable_prefix_caching=True)
    engine = llm.llm_engine
    runner = engine.runner
    want = _generate(llm)
    weights = sum(a.nbytes for a in jax.tree.leaves(runner.params))
    cache = sum(a.nbytes for a in jax.tree.leaves(runner.kv_cache))
    host_weights = jax.tree.map(lambda a: np.array(a, copy=True), runner.params)
    compiled = runner._step._cache_size()
    before = _live_bytes()

    llm.sleep(level=1)  # the cache freed, the weights moved to the host
    assert llm.is_sleeping()
    assert before - _live_bytes() >= weights + cache
    with pytest.raises(RuntimeError, match="wake_up"):
        llm.generate(PROMPTS, SamplingParams(max_tokens=2), use_tqdm=False)
    llm.wake_up(tags=["kv_cache"])
    assert llm.is_sleeping()  # the weights are still on the host
    llm.wake_up()
    assert not llm.is_sleeping()
    # Same outputs, and the prefix cache was emptied with the cache it indexed (a stale hit on
    # the zeroed blocks would change them).
    assert _generate(llm) == want
    assert runner._step._cache_size() == compiled

    llm.sleep(level=2)  # both dropped: new weights come with update_weights after waking them
    assert before - _live_bytes() >= weights + cache
    with pytest.raises(RuntimeError, match="wake_up"):
        llm.update_weights(host_weights)
    llm.wake_up(tags=["weights"])
    assert all(not np.asarray(a).any() for a in jax.tree.leaves(runner.params))  # zeros
    llm.update_weights(host_weights)
    llm.wake_up(tags=["kv_cache"])
    assert _generate(llm) == want
    assert runner._step._cache_size() == compiled

    for bad in ([], ["optimizer"]):
        with pytest.raises(ValueError, match="tags"):
            llm.wake_up(tags=bad)
    with pytest.raises(ValueError, match="level"):
        llm.sleep(level=3)
