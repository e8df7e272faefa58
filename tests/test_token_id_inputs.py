"""Token ids as a JAX research stack hands them: lists of numpy ints, 1-D numpy and JAX arrays of
any integer dtype give what a list of Python ints gives, in generate, generate_arrays and score
(the embedded SmolLM2, greedy); bad ids are refused naming the field, and the engine stays usable."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jaxvllm import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=0)

# Each turns a list of Python ints into one of the accepted forms.
FORMS = {
    "numpy_int64": lambda ids: np.array(ids, np.int64),
    "numpy_int32": lambda ids: np.array(ids, np.int32),
    "numpy_uint16": lambda ids: np.array(ids, np.uint16),
    "numpy_int_list": lambda ids: [np.int64(t) for t in ids],
    "numpy_slice": lambda ids: np.array([0] + ids, np.int64)[1:],
    "jax_int32": lambda ids: jnp.array(ids, jnp.int32),
    "tuple": tuple,
}


@pytest.fixture(scope="module")
def llm():
    # test_engine.py's settings, so the compilation cache already holds these executables.
    return LLM(dtype="float32", max_model_len=256, max_num_seqs=8, max_num_batched_tokens=64,
               num_gpu_blocks_override=96, enforce_eager=True, token_buckets=(8, 16, 32, 64))


@pytest.fixture(scope="module")
def prompts(llm) -> list[list[int]]:
    tok = llm.get_tokenizer()
    return [tok.encode("The capital of France is"), tok.encode("def fibonacci(n):")]


@pytest.fixture(scope="module")
def reference(llm, prompts) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]


def _check_outputs(outs, prompts, reference) -> None:
    assert [o.outputs[0].token_ids for o in outs] == reference
    for o, p in zip(outs, prompts):
        assert o.prompt_token_ids == p
        assert all(type(t) is int for t in o.prompt_token_ids)  # converted, not numpy ints


@pytest.mark.parametrize("form", FORMS)
def test_generate_takes_arrays(llm, prompts, reference, form):
    to = FORMS[form]
    batch = llm.generate([to(p) for p in prompts], GREEDY, use_tqdm=False)
    _check_outputs(batch, prompts, reference)
    dicts = llm.generate([{"prompt_token_ids": to(p)} for p in prompts], GREEDY, use_tqdm=False)
    _check_outputs(dicts, prompts, reference)
    single = llm.generate(to(prompts[0]), GREEDY, use_tqdm=False)  # one prompt, not a batch of ids
    _check_outputs(single, prompts[:1], reference[:1])


def test_generate_arrays_takes_arrays(llm, prompts):
    want = llm.generate_arrays(prompts, GREEDY)
    got = llm.generate_arrays([np.array(prompts[0]), jnp.array(prompts[1])], GREEDY)
    np.testing.assert_array_equal(got.token_ids, want.token_ids)
    np.testing.assert_array_equal(got.logprobs, want.logprobs)
    np.testing.assert_array_equal(got.lengths, want.lengths)
    one = llm.generate_arrays({"prompt_token_ids": jnp.array(prompts[1])}, GREEDY)
    np.testing.assert_array_equal(one.token_ids, want.token_ids[1:])


def test_score_takes_arrays(llm, prompts, reference):
    want = llm.score(prompts, reference)
    assert all(np.isfinite(s).all() and len(s) == len(c) for s, c in zip(want, reference))
    got = llm.score([np.array(prompts[0]), jnp.array(prompts[1], jnp.int32)],
                    [[np.int32(t) for t in reference[0]], np.array(reference[1], np.uint32)])
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("call, error, match", [
    (lambda llm, v: llm.generate({"prompt_token_ids": np.array([1.0, 2.0])}), TypeError,
     r"prompt_token_ids must have an integer dtype, got float64"),
    (lambda llm, v: llm.generate({"prompt_token_ids": jnp.array([1.0])}), TypeError,
     "prompt_token_ids must have an integer dtype"),
    (lambda llm, v: llm.generate({"prompt_token_ids": np.array([True, False])}), TypeError,
     "prompt_token_ids must have an integer dtype, got bool"),
    (lambda llm, v: llm.generate({"prompt_token_ids": [5, True]}), TypeError,
     "prompt_token_ids must hold integers, got bool"),
    (lambda llm, v: llm.generate({"prompt_token_ids": [np.bool_(True)]}), TypeError,
     "prompt_token_ids must hold integers"),
    (lambda llm, v: llm.generate({"prompt_token_ids": [5, 6.0]}), TypeError,
     "prompt_token_ids must hold integers, got float"),
    (lambda llm, v: llm.generate({"prompt_token_ids": np.array([[5, 6], [7, 8]])}), ValueError,
     r"prompt_token_ids must be a 1-D array of token ids, got shape \(2, 2\)"),
    (lambda llm, v: llm.generate(np.ones((2, 3), np.int64)), ValueError, "prompt must be a 1-D array"),
    (lambda llm, v: llm.generate({"prompt_token_ids": np.int64(5)}), ValueError,
     "prompt_token_ids must be a 1-D array"),
    (lambda llm, v: llm.generate({"prompt_token_ids": np.array([], np.int64)}), ValueError,
     "prompt_token_ids is empty"),
    (lambda llm, v: llm.generate({"prompt_token_ids": jnp.zeros((0,), jnp.int32)}), ValueError,
     "prompt_token_ids is empty"),
    (lambda llm, v: llm.generate({"prompt_token_ids": np.array([5, v])}), ValueError,
     r"prompt_token_ids must be ids in \[0, \d+\); got \[\d+\]"),
    (lambda llm, v: llm.generate({"prompt_token_ids": [np.int64(v)]}), ValueError,
     r"prompt_token_ids must be ids in \[0, \d+\)"),
    (lambda llm, v: llm.generate({"prompt_token_ids": jnp.array([-1, 5])}), ValueError,
     r"prompt_token_ids must be ids in \[0, \d+\); got \[-1\]"),
    (lambda llm, v: llm.generate([[5, 6], np.array([5, v])]), ValueError, r"prompt must be ids in"),
    (lambda llm, v: llm.generate_arrays([np.array([5]), np.array([0.5])]), TypeError,
     "prompt must have an integer dtype"),
    (lambda llm, v: llm.score([np.array([1.5])], [[5]]), TypeError,
     r"prompts\[0\] must have an integer dtype"),
    (lambda llm, v: llm.score(["The"], [np.array([v])]), ValueError,
     r"continuations\[0\] must be ids in \[0, \d+\)"),
    (lambda llm, v: llm.score(["The"], [np.array([], np.int32)]), ValueError,
     r"continuations\[0\] is empty"),
    (lambda llm, v: llm.score([np.ones((1, 3), np.int32)], [[5]]), ValueError,
     r"prompts\[0\] must be a 1-D array"),
    (lambda llm, v: llm.score(["The"], [[5, True]]), TypeError,
     r"continuations\[0\] must hold integers, got bool"),
], ids=lambda v: "" if callable(v) or isinstance(v, type) else v)
def test_bad_token_ids_named_engine_unharmed(llm, call, error, match):
    with pytest.raises(error, match=match):
        call(llm, llm.llm_engine.model_config.vocab_size)
    assert not llm.llm_engine.has_unfinished_requests()
    assert len(llm.generate(np.array([504, 3575]), GREEDY, use_tqdm=False)[0].outputs[0].token_ids) == 6
