"""The Flax NNX face of the engine's models (models/flax_module.py): one model definition and one set
of arrays for training and sampling. The module's log-probabilities equal LLM.score's for each
family, the engine serves the module's own arrays, and optax steps on the module pushed with
update_weights change what the engine generates, with nothing compiled again."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from converters import load_model
from jaxvllm import LLM, SamplingParams
from jaxvllm.models.flax_module import CausalLM, token_logprobs
from jaxvllm.models.layers import INVARIANT_COMPILER_OPTIONS

ENGINE = dict(max_model_len=128, max_num_seqs=4, max_num_batched_tokens=32,
              num_gpu_blocks_override=64, enforce_eager=True, token_buckets=(8, 32))
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            max_position_embeddings=256)
CONFIGS = {
    "llama": dict(TINY, architectures=["LlamaForCausalLM"], model_type="llama"),
    # Local layers with a window shorter than the sequences, soft caps on both logits.
    "gemma2": dict(TINY, architectures=["Gemma2ForCausalLM"], model_type="gemma2",
                   sliding_window=8, query_pre_attn_scalar=16, attn_logit_softcapping=50.0,
                   final_logit_softcapping=30.0),
    "qwen2_moe": dict(TINY, architectures=["Qwen2MoeForCausalLM"], model_type="qwen2_moe",
                      num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=64),
}


def _module_and_llm(config: dict, batch_invariant: bool = False,
                    dtype: str = "float32") -> tuple[CausalLM, LLM]:
    loaded = load_model(config, load_format="dummy", dtype=dtype, load_tokenizer=False)
    module = CausalLM(loaded.params, loaded.config, batch_invariant)
    return module, LLM.from_params(nnx.state(module), config, batch_invariant=batch_invariant,
                                   **ENGINE)


def _padded(seqs: list[list[int]], left: bool = False) -> tuple[jax.Array, jax.Array]:
    """Right- (or left-) padded ids and positions (-1 on padding)."""
    width = max(map(len, seqs))
    ids = np.zeros((len(seqs), width), np.int32)
    pos = np.full((len(seqs), width), -1, np.int32)
    for i, s in enumerate(seqs):
        at = slice(width - len(s), width) if left else slice(0, len(s))
        ids[i, at], pos[i, at] = s, np.arange(len(s))
    return jnp.asarray(ids), jnp.asarray(pos)


def _check_against_score(module: CausalLM, llm: LLM, seqs: list[list[int]], tol: float,
                         left_padded: bool = False) -> None:
    """tol 0: bitwise."""
    ids, pos = _padded(seqs, left_padded)
    invariant = module.config.batch_invariant
    got = np.asarray(jax.jit(lambda i, p: token_logprobs(module(i, p), i, invariant),
                             compiler_options=INVARIANT_COMPILER_OPTIONS if invariant else None
                             )(ids, pos))
    want = llm.score([s[:1] for s in seqs], [s[1:] for s in seqs])
    for row, p, w in zip(got, np.asarray(pos)[:, 1:], want):
        row = row[p > 0]  # the logprob of each real token after the first
        if tol:
            np.testing.assert_allclose(row, w, atol=tol, rtol=tol)
        else:
            np.testing.assert_array_equal(row, w)


@pytest.mark.parametrize("family, batch_invariant, dtype", [
    ("llama", False, "float32"), ("gemma2", False, "float32"), ("qwen2_moe", False, "float32"),
    ("llama", True, "float32"), ("gemma2", True, "float32"), ("llama", True, "bfloat16")])
def test_module_logprobs_equal_engine_score(family, batch_invariant, dtype):
    """Two sequences of different lengths in one padded batch (right-padded, and in batch-invariant
    mode left-padded too: the module computes a token at its position, not at its index); the
    engine serves the module's own arrays (not copies). Batch-invariant: bitwise the same (bf16 too,
    the module's forward compiled with INVARIANT_COMPILER_OPTIONS, as the engine's programs are)."""
    module, llm = _module_and_llm(CONFIGS[family], batch_invariant, dtype)
    assert llm.llm_engine.runner.params["layers"][1]["q"] is module.layers[1]["q"][...]
    rng = np.random.default_rng(1)
    seqs = [rng.integers(1, 256, 21).tolist(), rng.integers(1, 256, 13).tolist()]
    _check_against_score(module, llm, seqs, 0 if batch_invariant else 1e-5)
    if batch_invariant:
        _check_against_score(module, llm, seqs, 0, left_padded=True)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_batch_invariant_module_on_the_gpu_kernel_path(family, monkeypatch):
    """On a GPU the batch-invariant engine attends with its kernel's invariant launch, and the
    module's forward calls the same kernel (each token a sequence of its own; gradients from the
    reference's chunks). Both take that path here, the kernel in interpret mode: the module's
    logprobs equal score()'s bitwise, and its gradients are the CPU path's up to rounding."""
    import sys

    from jaxvllm.models import flax_module
    rpa = sys.modules["pallas_kernels.ragged_paged_attention"]
    rng = np.random.default_rng(2)
    seqs = [rng.integers(1, 256, 21).tolist(), rng.integers(1, 256, 13).tolist()]
    ids, pos = _padded(seqs, left=True)

    def grads(module: CausalLM) -> list[np.ndarray]:
        loss = lambda m: -jnp.sum(jnp.where(pos[:, 1:] > 0,  # noqa: E731
                                            token_logprobs(m(ids, pos), ids, True), 0.0))
        return [np.asarray(g) for g in jax.tree.leaves(nnx.grad(loss)(module))]

    jax.clear_caches()  # traces of the CPU path (same shapes, same static arguments) go
    try:
        with monkeypatch.context() as patch:
            patch.setattr(rpa, "uses_kernel", lambda head_dim: True)
            patch.setattr(flax_module, "uses_kernel", lambda head_dim: True)
            module, llm = _module_and_llm(CONFIGS[family], True)
            _check_against_score(module, llm, seqs, 0, left_padded=True)
            on_kernel = grads(module)
        jax.clear_caches()
        reference = grads(module)
    finally:
        jax.clear_caches()
    assert len(on_kernel) == len(reference) > 0
    for a, b in zip(on_kernel, reference):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)


def test_module_from_an_engine_config_stays_differentiable():
    """An engine's ModelConfig turns its decode step's Pallas kernels on (pallas_gemms, on GPUs);
    a module built from it runs XLA's ops, which have gradients: a sequence short enough for the
    decode buckets (8 tokens) gives the gradients of the module built from the HF config."""
    import dataclasses
    loaded = load_model(CONFIGS["llama"], load_format="dummy", dtype="float32",
                        load_tokenizer=False)
    ids, pos = _padded([list(range(3, 11))])

    def grads(config) -> list[np.ndarray]:
        module = CausalLM(loaded.params, config)
        loss = lambda m: -jnp.sum(token_logprobs(m(ids, pos), ids))  # noqa: E731
        return [np.asarray(g) for g in jax.tree.leaves(nnx.grad(loss)(module))]

    engine_config = dataclasses.replace(loaded.config, pallas_gemms=True)
    assert not CausalLM(loaded.params, engine_config).config.pallas_gemms
    for a, b in zip(grads(engine_config), grads(loaded.config)):
        np.testing.assert_array_equal(a, b)


def test_batch_invariant_module_refuses_experts():
    loaded = load_model(CONFIGS["qwen2_moe"], load_format="dummy", dtype="float32",
                        load_tokenizer=False)
    with pytest.raises(ValueError, match="batch_invariant"):
        CausalLM(loaded.params, loaded.config, batch_invariant=True)


def test_optax_steps_pushed_with_update_weights():
    """SFT steps on one sequence until the module has learnt it; pushed into the engine, greedy
    decoding from its first token reproduces it, the engine's scores are the module's, nothing
    compiles again, and arrays the trainer still holds from before (a reference policy) live on."""
    module, llm = _module_and_llm(CONFIGS["llama"])
    seq = np.random.default_rng(2).integers(1, 256, 16).tolist()
    ids = jnp.asarray([seq])
    greedy = SamplingParams(temperature=0, max_tokens=len(seq) - 1, ignore_eos=True)
    before = llm.generate([{"prompt_token_ids": seq[:1]}], greedy, use_tqdm=False)
    assert before[0].outputs[0].token_ids != seq[1:]
    _check_against_score(module, llm, [seq], 1e-5)
    compiled = llm.llm_engine.runner._step._cache_size()
    reference = jax.tree.map(lambda a: a, nnx.state(module))
    optimizer = nnx.Optimizer(module, optax.adam(3e-3), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, ids):
        loss, grads = nnx.value_and_grad(lambda m: -token_logprobs(m(ids), ids).mean())(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(train_step(module, optimizer, ids)) for _ in range(60)]
    assert losses[-1] < 0.1 < losses[0]
    llm.update_weights(nnx.state(module))
    # Taken as they are: the engine serves the trainer's new arrays and wrote into none (donating
    # the old ones would delete what the trainer holds; CPU buffers are never donated, so the
    # arrays' identity shows it here).
    assert llm.llm_engine.runner.params["layers"][1]["q"] is module.layers[1]["q"][...]
    after = llm.generate([{"prompt_token_ids": seq[:1]}], greedy, use_tqdm=False)
    assert after[0].outputs[0].token_ids == seq[1:]
    _check_against_score(module, llm, [seq], 1e-5)
    assert llm.llm_engine.runner._step._cache_size() == compiled
    assert not any(a.is_deleted() for a in jax.tree.leaves(reference))
    float(module(ids).sum())  # the module's arrays too


def test_quantized_params_are_refused():
    loaded = load_model(CONFIGS["llama"], load_format="dummy", dtype="float32", load_tokenizer=False)
    from jaxvllm.models.quant import quantize_params
    with pytest.raises(ValueError, match=r"layers.*quantized"):
        CausalLM(quantize_params(loaded.params, "fp8"), loaded.config)


def test_rl_loop_example_learns():
    """examples/rl_loop.py: the reward rises over its rounds, and generate's logprobs are the
    trainer's for the same tokens, bitwise (batch-invariant engine and module)."""
    import os
    import re
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, os.path.join(root, "examples", "rl_loop.py"),
                           "--rounds", "6"], capture_output=True, text=True, timeout=600,
                          cwd=root, env=dict(os.environ, PYTHONPATH=root))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rounds = re.findall(r"mean reward ([0-9.]+) .* trainer logprob\| ([0-9.e+-]+)", proc.stdout)
    assert len(rounds) == 6, proc.stdout
    rewards, gaps = [float(r) for r, _ in rounds], [float(g) for _, g in rounds]
    assert rewards[-1] > rewards[0] + 0.1 and max(gaps) == 0
