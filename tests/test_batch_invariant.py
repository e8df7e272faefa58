"""Batch-invariant mode (`LLM(batch_invariant=True)`) on the default model: a request's tokens and
logprobs are bitwise the same alone, beside other requests (other buckets, prefills mixed with
decodes), with its prompt chunked, and with its prefix from the cache; score() returns bitwise the
logprobs generate() reported."""
from __future__ import annotations

import numpy as np
import pytest

from jaxvllm import LLM, SamplingParams

TARGET = ("The capital of France is Paris, the capital of Germany is Berlin, the capital of Italy "
          "is Rome, the capital of Spain is Madrid, and the capital of Portugal is")
# Beside it: short prompts, and a long one whose chunks fill the steps in which the target decodes
# (alone it decodes in 8-token steps, here in 64-token ones: XLA's CPU GEMMs sum a float32 row in
# another order at 8 rows than at 64).
OTHERS = ["def fibonacci(n):\n    ", "Once upon a time", "Hello",
          " ".join(f"{i} squared is {i * i}." for i in range(20))]


@pytest.fixture(scope="module")
def llm():
    return LLM(dtype="float32", batch_invariant=True, max_model_len=256, max_num_seqs=8,
               max_num_batched_tokens=64, num_gpu_blocks_override=96, enforce_eager=True,
               token_buckets=(8, 16, 32, 64), enable_prefix_caching=True)


def _run(llm: LLM, prompts: list[str], sp: SamplingParams):
    out = llm.generate(prompts, sp, use_tqdm=False)[0]
    c = out.outputs[0]
    prompt = out.prompt_logprobs and [e[t].logprob for e, t in
                                      zip(out.prompt_logprobs[1:], out.prompt_token_ids[1:])]
    return (c.token_ids, [e[t].logprob for e, t in zip(c.logprobs, c.token_ids)], prompt,
            out.num_cached_tokens)


@pytest.mark.parametrize("sp", [
    SamplingParams(temperature=0, max_tokens=6, logprobs=0, prompt_logprobs=0),
    SamplingParams(temperature=1.0, top_p=0.9, seed=7, max_tokens=6, logprobs=0,
                   prompt_logprobs=0)], ids=["greedy", "seeded"])
def test_a_request_is_bitwise_the_same_in_any_batch(llm, sp):
    """Prompt logprobs bypass the prefix cache (as in vLLM), so the cached run asks for none."""
    llm.reset_prefix_cache()
    alone = _run(llm, [TARGET], sp)
    batched = _run(llm, [TARGET] + OTHERS, sp)
    assert batched[:3] == alone[:3]
    no_prompt = sp.clone()
    no_prompt.prompt_logprobs = None
    llm.reset_prefix_cache()
    assert _run(llm, [TARGET], no_prompt)[3] == 0
    cached = _run(llm, [TARGET], no_prompt)  # its full blocks from the prefix cache now
    assert cached[3] > 0 and cached[:2] == alone[:2]


def test_score_matches_generate_logprobs(llm):
    """score() of the generated tokens against generate()'s logprobs, and of the prompt against
    its prompt logprobs while other requests share the steps, however the sequence is split into
    chunks: bitwise (a token decoded in an 8-row step and the same token scored among 256 rows)."""
    sp = SamplingParams(temperature=0, max_tokens=12, logprobs=0, prompt_logprobs=0)
    ids = llm.get_tokenizer().encode(TARGET)
    tokens, logprobs, prompt_logprobs, _ = _run(llm, [TARGET], sp)
    scored = llm.score([ids], [tokens])[0]
    np.testing.assert_array_equal(scored, np.array(logprobs, np.float32))
    split = llm.score([ids + tokens[:5]], [tokens[5:]])[0]
    np.testing.assert_array_equal(split, scored[5:])
    scored = llm.score([ids[:1], "Hello", "def f(x):"], [ids[1:], " world", " return x"])[0]
    np.testing.assert_array_equal(scored, np.array(prompt_logprobs, np.float32))


def test_unsupported_combinations_are_refused():
    from jaxvllm.config import EngineArgs
    with pytest.raises(ValueError, match="batch_invariant"):
        EngineArgs(batch_invariant=True, quantization="fp8")
    with pytest.raises(ValueError, match="batch_invariant"):
        EngineArgs(batch_invariant=True, tensor_parallel_size=2)


@pytest.mark.parametrize("w_transposed", [False, True])
def test_invariant_gemm_kernel_rows_do_not_depend_on_the_batch(w_transposed):
    """The GPU's batch-invariant GEMM (pallas_kernels/invariant_gemm.py, interpret mode here): x
    times the weight (float64 reference), and each row bitwise the same at any number of rows
    (one tile, a masked part tile, several tiles), K split into slices."""
    import jax
    import jax.numpy as jnp

    from pallas_kernels.invariant_gemm import Tiles, invariant_matmul, splits_for
    k, n, rows = 1024, 128, Tiles().rows
    assert 1 < splits_for(k, n) < k // 64  # slices of several steps, added in order
    x = jax.random.normal(jax.random.key(0), (2 * rows + 5, k), jnp.bfloat16)
    w = jax.random.normal(jax.random.key(1), (n, k) if w_transposed else (k, n), jnp.bfloat16)
    full = np.asarray(invariant_matmul(x, w, w_transposed=w_transposed, interpret=True))
    w64 = np.asarray(w, np.float64)
    exact = np.asarray(x, np.float64) @ (w64.T if w_transposed else w64)
    np.testing.assert_allclose(full, exact, rtol=1e-5, atol=1e-4)
    for m in (1, 5, rows, rows + 3):
        part = np.asarray(invariant_matmul(x[:m], w, w_transposed=w_transposed, interpret=True))
        np.testing.assert_array_equal(part, full[:m])


def test_invariant_gemm_kernel_refuses_what_it_cannot_tile():
    import jax.numpy as jnp

    from pallas_kernels.invariant_gemm import invariant_matmul
    with pytest.raises(ValueError, match="invariant_matmul"):
        invariant_matmul(jnp.ones((4, 96)), jnp.ones((96, 128)), interpret=True)  # K % 64
    with pytest.raises(ValueError, match="invariant_matmul"):
        invariant_matmul(jnp.ones((4, 128)), jnp.ones((128, 100)), interpret=True)  # N % 64


@pytest.mark.gpu
def test_gpu_invariant_gemm_kernel_is_bitwise_across_batches():
    """Compiled for the GPU at an 8B layer's shapes: every row bitwise the same at 1 to 256 rows,
    and within bf16 products' float32 sums of the float64 result."""
    import jax
    import jax.numpy as jnp

    from pallas_kernels.invariant_gemm import invariant_matmul
    for k, n, transposed in [(4096, 6144, False), (14336, 4096, False), (4096, 2048, True)]:
        x = jax.random.normal(jax.random.key(k), (256, k), jnp.bfloat16)
        w = jax.random.normal(jax.random.key(n), (n, k) if transposed else (k, n),
                              jnp.bfloat16) * k ** -0.5
        mm = jax.jit(invariant_matmul, static_argnames="w_transposed")
        full = np.asarray(mm(x, w, w_transposed=transposed))
        for m in (1, 7, 16, 100):
            np.testing.assert_array_equal(np.asarray(mm(x[:m], w, w_transposed=transposed)),
                                          full[:m])
        w64 = np.asarray(w, np.float64)
        exact = np.asarray(x, np.float64) @ (w64.T if transposed else w64)
        assert np.abs(full - exact).max() < 1e-3 * np.abs(exact).max()
