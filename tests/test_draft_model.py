"""Speculative decoding with a draft model (speculative_config method "draft_model"): greedy output
token for token the same as without it, whatever the draft (the target itself: every guess kept;
a noisy copy: some kept; another architecture and shape); sampled output keeping its
distribution; the warm-up covering the draft's programs; sleep/wake; configuration errors. The
prompt-lookup method and the sampler's verification are in test_spec_decode.py, the scheduler's
lookahead slots in test_scheduler.py."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hf_builders import save_word_tokenizer, tiny_config, tiny_model
from jaxvllm import LLM, SamplingParams
from jaxvllm.config import EngineArgs
from test_spec_decode import assert_same_distribution, assert_same_outputs

VOCAB = 64
K = 3
TARGET = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
# Matrices scaled so that the weights matter, and the LM head more: peaked logits (the likeliest
# next token has p ~ 0.5 on average), so that sampled guesses are kept often enough to test their
# distribution.
SCALE, HEAD_SCALE = 3.0, 8.0
NOISE = 0.1  # the noisy draft's, relative to each matrix's spread: ~60% of its guesses right


def _save(model, path) -> str:
    model.save_pretrained(path)
    save_word_tokenizer(path, VOCAB)
    return str(path)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """The target; a copy with noise on every matrix (guesses often right); a one-layer Qwen2 of
    another width (guesses mostly wrong: random weights)."""
    root = tmp_path_factory.mktemp("draft")
    target, noisy = (tiny_model(tiny_config("llama", **TARGET), matrix_scale=SCALE)
                     for _ in range(2))
    torch.manual_seed(1)
    with torch.no_grad():
        for m in (target, noisy):
            m.lm_head.weight.mul_(HEAD_SCALE)
        for p in noisy.parameters():
            if p.dim() > 1:
                p.add_(torch.randn_like(p) * p.std() * NOISE)
    small = tiny_model(tiny_config("qwen2", **dict(TARGET, hidden_size=32, intermediate_size=48,
                                                   num_hidden_layers=1, num_attention_heads=2,
                                                   num_key_value_heads=1)),
                       matrix_scale=SCALE, bias_std=0.2)
    return {name: _save(m, root / name) for name, m in
            (("target", target), ("noisy", noisy), ("small", small))}


def _llm(dirs, draft, **kw):
    spec = None if draft is None else {"model": dirs[draft], "num_speculative_tokens": K}
    kw = dict(dict(max_num_seqs=8, max_num_batched_tokens=64, num_gpu_blocks_override=160,
                   max_model_len=256), **kw)
    return LLM(dirs["target"], dtype="float32", speculative_config=spec, **kw)


def _prompts(count, seed=0):
    rng = np.random.default_rng(seed)
    return [{"prompt_token_ids": rng.integers(3, VOCAB, int(rng.integers(4, 40))).tolist()}
            for _ in range(count)]


GREEDY = dict(temperature=0.0, max_tokens=40, ignore_eos=True)


def test_config_takes_vllms_keys_and_infers_the_method():
    cfg = EngineArgs(speculative_config={"model": "/some/draft", "num_speculative_tokens": 3}).speculative
    assert (cfg.method, cfg.model, cfg.num_lookahead_tokens) == ("draft_model", "/some/draft", 3)
    cfg = EngineArgs(speculative_config={"method": "ngram", "num_speculative_tokens": 3}).speculative
    assert (cfg.model, cfg.num_lookahead_tokens) == (None, 0)
    assert EngineArgs(speculative_config={"model": "[ngram]", "num_speculative_tokens": 2,
                                          "prompt_lookup_max": 3}).speculative.method == "ngram"


@pytest.mark.parametrize("bad, match", [
    ({"method": "draft_model", "num_speculative_tokens": 2}, r"speculative_config.model .* is required"),
    ({"method": "draft_model", "model": "", "num_speculative_tokens": 2}, r"speculative_config.model"),
    ({"model": "/d", "num_speculative_tokens": 2, "prompt_lookup_max": 3},
     r"\['prompt_lookup_max'\] are for method 'ngram'"),
    ({"method": "ngram", "model": "/d", "num_speculative_tokens": 2},
     r"method 'ngram' takes none"),
    ({"model": "/d"}, r"num_speculative_tokens is required"),
])
def test_bad_draft_config_is_refused_by_name(bad, match):
    with pytest.raises(ValueError, match=match):
        EngineArgs(speculative_config=bad)


def test_a_draft_model_over_several_hosts_is_refused():
    """Under tensor parallelism on one host it runs (tests/test_data_parallel.py)."""
    with pytest.raises(ValueError, match="draft model is not supported with nnodes > 1"):
        EngineArgs(speculative_config={"model": "/d", "num_speculative_tokens": 2},
                   nnodes=2, dist_init_addr="h:1")


def test_a_draft_of_another_vocabulary_is_refused(tmp_path):
    """(Dummy weights for a dummy target: the draft is dummy too.)"""
    paths = {}
    for name, vocab in (("target", VOCAB), ("draft", VOCAB + 1000)):
        paths[name] = tmp_path / name / "config.json"
        paths[name].parent.mkdir()
        paths[name].write_text(json.dumps(dict(architectures=["LlamaForCausalLM"],
                                               model_type="llama", **dict(TARGET, vocab_size=vocab))))
    with pytest.raises(ValueError, match=r"speculative_config.model: the draft's vocabulary "
                                         r"\(1064 tokens\) is not the target's \(64\)"):
        LLM(str(paths["target"]), load_format="dummy", dtype="float32",
            speculative_config={"model": str(paths["draft"]), "num_speculative_tokens": 2})


def test_the_target_as_its_own_draft_guesses_every_token(dirs):
    """A draft identical to the target proposes exactly the target's greedy tokens, so every
    guess is kept (its K/V, positions and the token after the kept guesses all line up); in
    batch-invariant mode bitwise, so this cannot pass by luck. Prompts of one length: all the
    requests guess across a block boundary at once, into blocks allocated ahead for them."""
    rng = np.random.default_rng(1)
    prompts = [{"prompt_token_ids": rng.integers(3, VOCAB, 14).tolist()} for _ in range(8)]
    plain = _llm(dirs, None, batch_invariant=True).generate(prompts, SamplingParams(**GREEDY),
                                                            use_tqdm=False)
    llm = _llm(dirs, "target", batch_invariant=True)
    guessed = llm.generate(prompts, SamplingParams(**GREEDY), use_tqdm=False)
    stats = llm.llm_engine.get_stats().spec_decode
    assert [o.outputs[0].token_ids for o in plain] == [o.outputs[0].token_ids for o in guessed]
    assert stats.num_accepted_tokens == stats.num_draft_tokens > 8 * 25, stats


@pytest.mark.parametrize("draft", ["noisy", "small"])
def test_greedy_output_is_the_same_token_for_token(dirs, draft):
    """Batch-invariant mode, as in test_spec_decode.py: tokens, logprobs and finish reasons of
    plain decoding, for requests with logprobs, logit_bias, allowed_token_ids (a mask on every
    guess row), stop ids, n = 2 sharing a prompt's blocks, prompt logprobs, penalties and
    min_tokens, with few enough KV blocks that requests are preempted and recomputed."""
    g = dict(GREEDY)
    kinds = [SamplingParams(**g, logprobs=2),
             SamplingParams(**g, allowed_token_ids=list(range(3, VOCAB, 2))),
             SamplingParams(**g, repetition_penalty=1.3), SamplingParams(**g, logit_bias={5: 3.0}),
             SamplingParams(**g, n=2, prompt_logprobs=1), SamplingParams(**{**g, "max_tokens": 7}),
             SamplingParams(**g, min_tokens=4, stop_token_ids=[7]), SamplingParams(**g, logprobs=0)]
    prompts = _prompts(8, seed=2)
    results, stats = {}, {}
    for name in (None, draft):
        llm = _llm(dirs, name, batch_invariant=True, num_gpu_blocks_override=24)
        results[name] = llm.generate(prompts, kinds, use_tqdm=False)
        stats[name] = llm.llm_engine.get_stats()
    spec = stats[draft].spec_decode
    assert stats[draft].num_preemptions > 0
    if draft == "noisy":
        assert 0.3 * spec.num_draft_tokens < spec.num_accepted_tokens < spec.num_draft_tokens, spec
    else:
        assert spec.num_draft_tokens > 100, spec
    assert_same_outputs(results[None], results[draft])


def test_sampled_tokens_keep_their_distribution(dirs):
    """Temperature 1 on a 64-token vocabulary: each of the first output positions has the same
    distribution with and without the noisy draft (two-sample chi-square over 480 seeded samples
    each, different seeds on each side)."""
    n, positions = 480, 5
    prompt = _prompts(1, seed=3)[0]
    samples = {}
    for draft in (None, "noisy"):
        llm = _llm(dirs, draft, max_num_seqs=64, max_num_batched_tokens=256)
        outs = llm.generate([prompt] * n, [SamplingParams(temperature=1.0, max_tokens=positions,
                                                          seed=i + (draft is None) * n,
                                                          ignore_eos=True) for i in range(n)],
                            use_tqdm=False)
        samples[draft] = np.array([o.outputs[0].token_ids for o in outs])
        if draft is not None:
            assert llm.llm_engine.get_stats().spec_decode.num_accepted_tokens > 300
    assert_same_distribution(samples[None], samples["noisy"], VOCAB)


def test_the_warm_up_covers_the_draft(dirs):
    """Nothing compiles while serving: the draft's program for every bucket is built at start-up,
    for weights the engine placed (LLM(path)) and a caller's own (LLM.from_params)."""
    from converters import load_model
    from jaxvllm.worker import compile_watch
    params = load_model(dirs["target"], dtype="float32", cache_dir=None, load_tokenizer=False).params
    g = dict(max_tokens=12, ignore_eos=True)
    kinds = [SamplingParams(temperature=0, **g), SamplingParams(temperature=0.7, logprobs=2, **g),
             SamplingParams(temperature=0.9, top_p=0.8, **g), SamplingParams(temperature=0, **g)]
    spec = {"model": dirs["noisy"], "num_speculative_tokens": K}
    engines = (lambda: _llm(dirs, "noisy", enforce_eager=False, token_buckets=(8, 64)),
               lambda: LLM.from_params(params, json.load(open(f"{dirs['target']}/config.json")),
                                       speculative_config=spec, dtype="float32", max_model_len=256,
                                       max_num_seqs=8, max_num_batched_tokens=64,
                                       num_gpu_blocks_override=160, enforce_eager=False,
                                       token_buckets=(8, 64)))
    for make in engines:
        llm = make()
        mark = compile_watch.mark()
        llm.generate(_prompts(4, seed=4), kinds, use_tqdm=False)
        assert llm.llm_engine.get_stats().spec_decode.num_accepted_tokens > 0
        assert compile_watch.since(mark) == []


def test_sleep_and_wake_keep_the_draft(dirs):
    """sleep(level=2) drops the target's weights (update_weights refills them) but keeps the
    draft's, which nothing else would refill: after waking, the same tokens and guesses kept."""
    import jax
    llm = _llm(dirs, "noisy")
    prompts = _prompts(4, seed=5)
    sp = SamplingParams(**GREEDY)
    before = [o.outputs[0].token_ids for o in llm.generate(prompts, sp, use_tqdm=False)]
    weights = jax.device_get(llm.llm_engine.runner.params)
    kept = llm.llm_engine.get_stats().spec_decode.num_accepted_tokens
    llm.sleep(level=2)
    llm.wake_up()
    llm.update_weights(weights)
    after = [o.outputs[0].token_ids for o in llm.generate(prompts, sp, use_tqdm=False)]
    assert after == before
    assert llm.llm_engine.get_stats().spec_decode.num_accepted_tokens >= 2 * kept > 0
