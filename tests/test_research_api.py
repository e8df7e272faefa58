"""The JAX research API: LLM.from_params, update_weights in place, score, generate_arrays."""
from __future__ import annotations

import gc

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from hf_builders import tiny_config, tiny_model
from jaxvllm import LLM, SamplingParams

ENGINE = dict(max_model_len=128, max_num_seqs=4, max_num_batched_tokens=32,
              num_gpu_blocks_override=40, enforce_eager=True, token_buckets=(8, 32), dtype="float32")
PROMPTS = [[5, 17, 42, 99, 3], [7, 8, 9], [200, 201, 202, 203, 204, 205, 206]]
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=0)


@pytest.fixture(scope="module")
def hf():
    return tiny_model(tiny_config(), matrix_scale=5.0)


def _count_traces():
    events = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda name, *_a, **_k: events.append(name) if name.endswith("jaxpr_trace_duration") else None)
    return events


def _live_bytes() -> int:
    gc.collect()
    return sum(a.nbytes for a in jax.live_arrays() if not a.is_deleted())


def test_from_params_hf_names_match_hf(hf):
    llm = LLM.from_params({k: v.numpy() for k, v in hf.state_dict().items()}, hf.config, **ENGINE)
    out = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY, use_tqdm=False)
    for p, o in zip(PROMPTS, out):
        ids = torch.tensor([p])
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                          min_new_tokens=8, do_sample=False)[0, len(p):].tolist()
        assert o.outputs[0].token_ids == ref


def test_update_weights_loop_matches_fresh_engine(hf):
    base = LLM.from_params({k: v.numpy() for k, v in hf.state_dict().items()}, hf.config, **ENGINE)
    llm = LLM.from_params(base.llm_engine.runner.params, hf.config, **ENGINE)
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    traces = _count_traces()
    live = []
    params = jax.tree.map(jnp.copy, base.llm_engine.runner.params)
    for rnd in range(4):
        key = jax.random.PRNGKey(rnd)
        leaves, tree = jax.tree.flatten(params)
        keys = jax.random.split(key, len(leaves))
        params = jax.tree.unflatten(tree, [x + 0.3 * jnp.std(x) * jax.random.normal(k, x.shape, x.dtype)
                                           for x, k in zip(leaves, keys)])
        n_before = len(traces)
        llm.update_weights(params)
        got = llm.generate_arrays(prompts, GREEDY)
        if rnd >= 1:  # the first round may compile the in-place copy; later rounds compile nothing
            assert len(traces) == n_before, traces[n_before:]
        live.append(_live_bytes())
        fresh = LLM.from_params(params, hf.config, **ENGINE)
        want = fresh.generate_arrays(prompts, GREEDY)
        del fresh
        np.testing.assert_array_equal(got.token_ids, want.token_ids)
        np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-5)
        assert got.lengths.tolist() == [8, 8, 8] and got.prompt_index.tolist() == [0, 1, 2]
    assert max(live[1:]) <= live[1] * 1.01  # device memory does not grow round over round


def test_update_weights_validates(hf):
    llm = LLM.from_params({k: v.numpy() for k, v in hf.state_dict().items()}, hf.config, **ENGINE)
    params = llm.llm_engine.runner.params
    bad = dict(params, embed=jnp.zeros((10, 64), jnp.float32))
    with pytest.raises(ValueError, match=r"embed.*shape"):
        llm.update_weights(bad)
    bad = dict(params, final_norm=params["final_norm"].astype(jnp.bfloat16))
    with pytest.raises(ValueError, match=r"final_norm.*dtype"):
        llm.update_weights(bad)
    bad = {k: v for k, v in params.items() if k != "final_norm"}
    with pytest.raises(ValueError):
        llm.update_weights(bad)


def test_score_matches_log_softmax(hf):
    from test_models import run_sequence
    llm = LLM.from_params({k: v.numpy() for k, v in hf.state_dict().items()}, hf.config, **ENGINE)
    prompts = [[1, 2, 3, 4], [9, 8]]
    conts = [[10, 11, 12], [50, 60, 70, 80, 90]]
    scores = llm.score(prompts, conts)
    loaded = llm.llm_engine.loaded
    for p, c, s in zip(prompts, conts, scores):
        logits = run_sequence(loaded.params, loaded.config, np.asarray(p + c))
        ref = np.asarray(jax.nn.log_softmax(logits, -1))
        want = [ref[len(p) - 1 + j, t] for j, t in enumerate(c)]
        np.testing.assert_allclose(s, want, atol=1e-4)
    with pytest.raises(ValueError, match="continuations"):
        llm.score([[1]], [[2], [3]])


def test_generation_config_sets_sampling_defaults(hf):
    """As vLLM (generation_config="auto"): without sampling_params, generate uses the model's
    generation_config.json defaults; keys at transformers' defaults set nothing."""
    from jaxvllm.engine.llm_engine import generation_sampling_defaults
    assert generation_sampling_defaults({"temperature": 0.6, "top_p": 0.9, "top_k": 50, "do_sample": True,
                                         "eos_token_id": 2, "max_new_tokens": 6}) == \
        {"temperature": 0.6, "top_p": 0.9, "max_tokens": 6}
    with pytest.raises(ValueError, match="generation_config.json: top_p"):
        generation_sampling_defaults({"top_p": 0.0})
    params = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    llm = LLM.from_params(params, hf.config, generation_config={"top_k": 1, "max_new_tokens": 6}, **ENGINE)
    sp = llm.get_default_sampling_params()
    assert sp.top_k == 1 and sp.temperature == 1.0 and sp.max_tokens == 6
    outs = [llm.generate(PROMPTS[0], use_tqdm=False)[0].outputs[0].token_ids for _ in range(3)]
    greedy = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=6), use_tqdm=False)
    assert outs[0] == outs[1] == outs[2] == greedy[0].outputs[0].token_ids  # top_k=1 is greedy

