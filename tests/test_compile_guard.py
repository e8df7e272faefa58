"""Nothing compiles after the warm-up: the real engine (embedded SmolLM2, float32, CPU), warmed up,
serves every kind of request a user can send (each sampler variant, logprob widths, prompt
logprobs, penalties, min_tokens, n > 1, seeds, stop strings, structured outputs, logit_bias,
allowed_token_ids, chunked prefill, batches of every request bucket), and JAX lowers no program
meanwhile. A compile while serving stalls every stream, so the runner also warns when one
happens."""
from __future__ import annotations

import logging

import jax
import numpy as np
import pytest

from jaxvllm import LLM, SamplingParams, StructuredOutputsParams
from jaxvllm.worker import compile_watch

LONG = "A long prompt about rivers and the cities that grew on their banks, " * 6  # > 32 tokens


@pytest.fixture(scope="module")
def llm():
    # Request buckets 8 and 16 (max_num_seqs 16): two sampler row counts.
    llm = LLM(dtype="float32", max_model_len=256, max_num_seqs=16, max_num_batched_tokens=32,
              token_buckets=(8, 16, 32), num_gpu_blocks_override=96, max_logprobs=8,
              enforce_eager=False)  # the server's default on a GPU; on a CPU it is asked for
    assert llm.llm_engine.compile_seconds > 0
    return llm


def _tiny_llama() -> tuple[dict, dict]:
    """A random one-layer Llama's params and HF config, for LLM.from_params."""
    from converters import load_model
    config = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128,
                  hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1, max_position_embeddings=128)
    return load_model(config, load_format="dummy", dtype="float32", load_tokenizer=False).params, config


def _kinds() -> list[SamplingParams]:
    g = dict(max_tokens=4, ignore_eos=True)
    return [
        SamplingParams(temperature=0.0, **g),
        SamplingParams(temperature=0.8, seed=1, **g),
        SamplingParams(temperature=0.8, top_k=5, **g),           # top-k bound 16
        SamplingParams(temperature=0.8, top_k=40, **g),          # top-k bound 64
        SamplingParams(temperature=0.8, top_k=100, **g),         # full sort
        SamplingParams(temperature=0.8, top_p=0.9, **g),         # full sort
        SamplingParams(temperature=0.8, min_p=0.1, **g),
        SamplingParams(temperature=0.0, logprobs=0, **g),
        SamplingParams(temperature=0.7, logprobs=3, top_p=0.5, **g),
        SamplingParams(temperature=0.0, prompt_logprobs=0, **g),
        SamplingParams(temperature=0.0, prompt_logprobs=5, logprobs=8, **g),
        SamplingParams(temperature=0.0, repetition_penalty=1.3, presence_penalty=0.5,
                       frequency_penalty=0.4, **g),
        SamplingParams(temperature=1.0, frequency_penalty=1.0, n=3, seed=4, **g),
        SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=list(range(60)), max_tokens=4),
        SamplingParams(temperature=0.0, stop=["the", "\n"], max_tokens=4),
        SamplingParams(temperature=0.0, max_tokens=4,
                       structured_outputs=StructuredOutputsParams(regex="[a-z ]+")),
        SamplingParams(temperature=0.9, seed=3, repetition_penalty=1.2, max_tokens=4,
                       structured_outputs=StructuredOutputsParams(json_object=True)),
        SamplingParams(temperature=0.0, max_tokens=4, logit_bias={5: 3.0, 9: -100.0}),
        SamplingParams(temperature=0.8, seed=2, max_tokens=4, allowed_token_ids=[5, 9, 300]),
    ]


def test_serving_compiles_nothing_after_warm_up(llm, caplog):
    mark = compile_watch.mark()
    kinds = _kinds()
    with caplog.at_level(logging.WARNING, logger="jaxvllm.worker.model_runner"):
        for i, sp in enumerate(kinds):  # each kind alone: a batch of one row
            llm.generate([f"Question {i}: what is a river?"], sp, use_tqdm=False)
        # Mixed batches of every size up to max_num_seqs, with long (chunked) prompts.
        for size in (2, 5, 9, 16):
            prompts = [(LONG if j % 3 == 0 else "") + f"Say {j} things." for j in range(size)]
            llm.generate(prompts, [kinds[j % len(kinds)] for j in range(size)], use_tqdm=False)
    assert compile_watch.since(mark) == []
    assert not [r for r in caplog.records if "compiled while serving" in r.getMessage()]


def test_a_compile_while_serving_is_logged(llm, caplog):
    """A lowering between steps (here a stray jit in the same process) is reported by the next step."""
    jax.jit(lambda x: x * 3 + 1)(np.arange(7))
    with caplog.at_level(logging.WARNING, logger="jaxvllm.worker.model_runner"):
        llm.generate(["Hello"], SamplingParams(temperature=0.0, max_tokens=2), use_tqdm=False)
    msgs = [r.getMessage() for r in caplog.records if "compiled while serving" in r.getMessage()]
    assert len(msgs) == 1 and "1 program(s)" in msgs[0] and "jit(<lambda>)" in msgs[0], msgs


def test_an_engine_used_under_a_jax_context_compiles_nothing_after_warm_up(caplog):
    """JAX's context managers are thread-local and the runner launches steps on a thread of its
    own: an engine built and used under `jax.default_matmul_precision` must launch under it too,
    or every step program would be traced again (and on the GPU computed at another precision)."""
    with jax.default_matmul_precision("highest"):
        llm = LLM.from_params(*_tiny_llama(), max_model_len=128, max_num_seqs=8,
                              max_num_batched_tokens=16, token_buckets=(8, 16),
                              num_gpu_blocks_override=32, max_logprobs=2, enforce_eager=False)
        mark = compile_watch.mark()
        with caplog.at_level(logging.WARNING, logger="jaxvllm.worker.model_runner"):
            llm.generate([{"prompt_token_ids": [5, 6, 7]}, {"prompt_token_ids": list(range(40))}],
                         SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)
    assert compile_watch.since(mark) == []
    assert not [r for r in caplog.records if "compiled while serving" in r.getMessage()]


def test_a_cpu_engine_compiles_on_first_use_unless_asked():
    """enforce_eager's default: on a CPU nothing compiles at start-up (a user's first `jaxvllm
    serve` there would wait minutes for buckets it may never use)."""
    llm = LLM.from_params(*_tiny_llama(), max_model_len=64, max_num_seqs=2,
                          num_gpu_blocks_override=8, max_num_batched_tokens=8, token_buckets=(8,))
    assert llm.llm_engine.compile_seconds == 0
    mark = compile_watch.mark()
    llm.generate([{"prompt_token_ids": [1, 2, 3]}], SamplingParams(max_tokens=2), use_tqdm=False)
    assert compile_watch.since(mark)  # compiled on first use
