"""The engine's start-up heap is frozen out of the cyclic garbage collector's reach (llm_engine.
freeze_startup_heap), and an engine dropped in a reference cycle is still freed: when the next
engine starts."""
from __future__ import annotations

import gc
import weakref

from jaxvllm import LLM, SamplingParams

CONFIG = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=64,
              hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=1,
              num_key_value_heads=1, max_position_embeddings=128)


def _llm() -> LLM:
    from converters import load_model
    params = load_model(CONFIG, load_format="dummy", dtype="float32", load_tokenizer=False).params
    return LLM.from_params(params, CONFIG, dtype="float32", max_model_len=64, max_num_seqs=4,
                           max_num_batched_tokens=32, num_gpu_blocks_override=32)


def test_startup_heap_is_frozen_and_a_dropped_engine_is_freed_by_the_next():
    first = _llm()
    assert gc.get_freeze_count() > 1000  # the modules, JAX's objects, the block pool
    first.generate([{"prompt_token_ids": [3, 4, 5]}], SamplingParams(max_tokens=2), use_tqdm=False)
    runner = weakref.ref(first.llm_engine.runner)
    first.llm_engine.cycle = first  # a reference cycle: refcounting alone never frees it
    del first
    gc.collect()
    assert runner() is not None  # frozen: a plain collection does not reach it
    second = _llm()
    assert runner() is None  # collected when the next engine started
    out = second.generate([{"prompt_token_ids": [3, 4, 5]}], SamplingParams(max_tokens=2),
                          use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 2
