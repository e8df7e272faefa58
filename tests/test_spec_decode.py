"""Speculative decoding by prompt lookup: the proposer, the configuration, the sampler's verification
of guesses (distribution kept), and the engine (greedy output token for token the same as without
it; scheduler-level behaviour is in test_scheduler.py)."""
from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvllm.config import EngineArgs
from jaxvllm.spec_decode import NgramIndex, SpeculativeConfig
from jaxvllm.worker.sampler import sampling_mode
from test_sampler import (FILTER_CASES, V, _case_tensors, fixed_logits, np_filter, np_softmax,
                          sample_scored)


# ---- the proposer --------------------------------------------------------------------------------
@pytest.mark.parametrize("tokens, lo, hi, k, want", [
    ([1, 2, 3, 4, 1, 2, 3], 2, 2, 2, [4, 1]),             # [2, 3] at 1: what followed it
    ([1, 2, 3, 4, 1, 2, 3, 5, 6], 2, 2, 2, []),           # [5, 6] never occurred before
    ([1, 2, 3, 4, 1, 2, 3], 1, 3, 3, [4, 1, 2]),          # the longest suffix, [1, 2, 3]
    ([9, 3, 7, 1, 3, 8, 2, 3], 1, 3, 2, [7, 1]),          # [3] thrice: the earliest occurrence
    ([5, 6, 7, 0, 6, 7, 1, 5, 6, 7], 2, 3, 2, [0, 6]),    # [5, 6, 7] beats the later [6, 7]
    ([1, 2, 1, 2, 1, 2], 2, 2, 5, [1, 2, 1, 2]),          # fewer than k follow
    ([4, 4, 4], 1, 1, 3, [4, 4]),                         # overlapping with the suffix
    ([1, 2, 3], 1, 4, 2, []),                             # nothing repeats
    ([7], 1, 1, 2, []),
])
def test_propose(tokens, lo, hi, k, want):
    index = NgramIndex(lo, hi)
    index.extend(tokens)
    assert index.propose(k) == want == _scan(tokens, lo, hi, k)


def _scan(tokens, lo, hi, k):
    """The rule, by brute force: the earliest earlier occurrence of the longest suffix."""
    for n in range(min(hi, len(tokens) - 1), lo - 1, -1):
        for start in range(len(tokens) - n):
            if tokens[start:start + n] == tokens[len(tokens) - n:]:
                return tokens[start + n:start + n + k]
    return []


def test_the_index_kept_up_to_date_agrees_with_a_scan():
    rng = np.random.default_rng(0)
    for _ in range(300):
        lo = int(rng.integers(1, 4))
        hi, k = int(rng.integers(lo, 6)), int(rng.integers(0, 5))
        index, tokens = NgramIndex(lo, hi), []
        for _ in range(int(rng.integers(1, 8))):  # appended a few tokens at a time
            new = rng.integers(0, 4, int(rng.integers(1, 9))).tolist()
            tokens += new
            index.extend(new)
            assert index.propose(k) == _scan(tokens, lo, hi, k), (tokens, lo, hi, k)


def test_propose_caps_at_the_limit():
    cfg = SpeculativeConfig(num_speculative_tokens=3, prompt_lookup_max=2, prompt_lookup_min=1)
    index = cfg.index()
    index.extend([1, 2, 3, 4, 5, 1, 2])
    assert cfg.propose(index, limit=10) == [3, 4, 5]
    assert cfg.propose(index, limit=1) == [3]
    assert cfg.propose(index, limit=0) == []


# ---- configuration -------------------------------------------------------------------------------
def test_config_defaults_follow_vllm():
    assert EngineArgs().speculative is None
    cfg = EngineArgs(speculative_config={"method": "ngram", "num_speculative_tokens": 5,
                                         "prompt_lookup_max": 4}).speculative
    assert (cfg.num_speculative_tokens, cfg.prompt_lookup_min, cfg.prompt_lookup_max) == (5, 4, 4)
    cfg = EngineArgs(speculative_config={"num_speculative_tokens": 2}).speculative
    assert (cfg.method, cfg.prompt_lookup_min, cfg.prompt_lookup_max) == ("ngram", 5, 5)


@pytest.mark.parametrize("bad, exc, match", [
    ({"num_speculative_tokens": 0}, ValueError, r"num_speculative_tokens must be a positive int"),
    ({"num_speculative_tokens": True}, ValueError, r"num_speculative_tokens must be a positive int"),
    ({"method": "ngram"}, ValueError, r"num_speculative_tokens is required"),
    ({"method": "eagle", "num_speculative_tokens": 2}, ValueError, r"method must be one of"),
    ({"num_speculative_tokens": 2, "draft_tensor_parallel_size": 1}, ValueError,
     r"unsupported key\(s\) \['draft_tensor_parallel_size'\]"),
    ({"num_speculative_tokens": 2, "prompt_lookup_min": 4, "prompt_lookup_max": 2}, ValueError,
     r"prompt_lookup_min \(4\) must not exceed prompt_lookup_max \(2\)"),
    ({"num_speculative_tokens": 2, "prompt_lookup_min": "3"}, ValueError, r"prompt_lookup_min must"),
    ("ngram", TypeError, r"speculative_config must be a dict"),
])
def test_bad_config_is_refused_by_name(bad, exc, match):
    with pytest.raises(exc, match=match):
        EngineArgs(speculative_config=bad)


def test_cli_takes_json():
    parser = argparse.ArgumentParser()
    EngineArgs.add_cli_args(parser)
    args = parser.parse_args(["--speculative-config", '{"method": "ngram", "num_speculative_tokens": 3}'])
    assert EngineArgs.from_cli_args(args).speculative.num_speculative_tokens == 3
    for bad in ("{not json", "[1, 2]"):
        with pytest.raises(SystemExit):
            parser.parse_args(["--speculative-config", bad])


# ---- the sampler's verification ------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _jit_sample(mode):
    return jax.jit(functools.partial(sample_scored, mode=mode, num_logprobs=1))


def _guessed(case, guess, n=4000, seed=11):
    logits = np.repeat(fixed_logits(1, seed=seed, scale=1.0), n, axis=0)
    t = _case_tensors(case, r=n)
    t.seeds[:] = 1234
    t.steps[:] = np.arange(n)
    t.draft_ids = np.full(n, guess, np.int32)
    out = _jit_sample(sampling_mode(t.temperature, t.top_k, t.top_p))(logits, t)
    ref = np_softmax(np_filter(logits[0], case.get("temp", 1.0), case.get("min_p", 0.0),
                               case.get("top_k", 0), case.get("top_p", 1.0)))
    return np.asarray(out.token_ids), np.asarray(out.accepted), ref, out


@pytest.mark.parametrize("case", [FILTER_CASES[i] for i in (0, 2, 4, 7, 11, 12)])
@pytest.mark.parametrize("which", ["likeliest", "middling", "filtered out"])
def test_a_verified_row_keeps_the_target_distribution(case, which):
    """Rejection sampling of a certain guess: the guess is kept with probability p(guess), and
    the row's token, kept guess or redrawn, is distributed as p (temperature, top-k, top-p, min-p
    applied) whichever token was guessed."""
    ref = _guessed(case, 0)[2]
    order = np.argsort(-ref, kind="stable")
    guess = int({"likeliest": order[0], "middling": order[2], "filtered out": order[-1]}[which])
    toks, kept, ref, _ = _guessed(case, guess)
    n = len(toks)
    assert (ref[toks] > 0).all(), "sampled a filtered-out token"
    assert (toks[kept] == guess).all()
    p = ref[guess]
    assert abs(kept.mean() - p) < 5 * np.sqrt(p * (1 - p) / n) + 1e-9, (kept.mean(), p)
    obs = np.bincount(toks, minlength=V)
    m = ref * n > 0
    if m.sum() == 1:
        assert obs[m][0] == n
        return
    exp = ref[m] * n
    chi2 = float(((obs[m] - exp) ** 2 / exp).sum())
    df = int(m.sum()) - 1
    assert chi2 < df + 6 * np.sqrt(2 * df) + 10, (chi2, df, obs, ref * n)


def test_greedy_rows_keep_a_guess_that_is_the_argmax():
    logits = fixed_logits(4, seed=3)
    best = logits.argmax(-1)
    t = _case_tensors(dict(temp=0.0), r=4)
    t.draft_ids = np.array([best[0], (best[1] + 1) % V, -1, best[3]], np.int32)
    for mode in ("greedy", "random"):  # greedy rows inside a random batch too
        out = _jit_sample(mode)(logits, t)
        assert np.asarray(out.token_ids).tolist() == best.tolist()
        assert np.asarray(out.accepted).tolist() == [True, False, False, True]


def test_rows_without_a_guess_sample_as_without_speculation():
    logits = fixed_logits(8, seed=5)
    t = _case_tensors(dict(temp=0.9, top_k=6), r=8)
    t.seeds[:] = np.arange(8)
    t.steps[:] = 3
    plain = _jit_sample("random_sort")(logits, t)
    t.draft_ids = np.full(8, -1, np.int32)
    spec = _jit_sample("random_sort")(logits, t)
    np.testing.assert_array_equal(np.asarray(plain.token_ids), np.asarray(spec.token_ids))
    np.testing.assert_array_equal(np.asarray(plain.logprob), np.asarray(spec.logprob))
    assert not np.asarray(spec.accepted).any()


def test_a_step_batch_gives_each_guess_a_row_of_its_own():
    """The host side of a verification step: the guesses follow the request's last token, each
    token of it has a logits row, and each row samples the next output position (its own random
    stream, as that token would have without guessing) with the request's knobs."""
    from jaxvllm.core.outputs import CachedRequestData, NewRequestData, SchedulerOutput
    from jaxvllm.sampling_params import SamplingParams
    from jaxvllm.worker.input_batch import InputBatch
    from jaxvllm.worker.token_table import TokenTable
    batch = InputBatch(block_size=4, max_blocks_per_seq=8, token_buckets=(16,), max_num_seqs=4,
                       rng_seed=0, token_table=TokenTable(4, 32), num_speculative_tokens=3)
    a = SamplingParams(temperature=0.7, seed=5, max_tokens=10)
    b = SamplingParams(temperature=0.0, max_tokens=10)
    first = SchedulerOutput([NewRequestData("a", [1, 2, 3], [7, 8], a, [1, 2], 0),
                             NewRequestData("b", [4, 5], [], b, [3], 0)], [], {"a": 5, "b": 2}, 7)
    batch.update(first)
    batch.build(first)
    for rid, tok in (("a", 9), ("b", 6)):  # as collect() appends them
        batch.requests[rid].token_ids.append(tok)
        batch.requests[rid].num_inflight -= 1
    second = SchedulerOutput([], [CachedRequestData("a", [], 5), CachedRequestData("b", [], 2)],
                             {"a": 4, "b": 1}, 5, scheduled_spec_decode_tokens={"a": [10, 11, 12]})
    batch.update(second)
    step = batch.build(second)
    rows = batch.sampling_inputs(step)
    assert step.token_ids[:5].tolist() == [9, 10, 11, 12, 6]
    assert step.positions[:5].tolist() == [5, 6, 7, 8, 2]
    assert step.logits_indices[:5].tolist() == [0, 1, 2, 3, 4]
    assert step.row_starts.tolist() == [0, 4] and step.num_drafts.tolist() == [3, 0]
    assert rows.ints[5][:5].tolist() == [10, 11, 12, -1, -1]         # the guess each row checks
    assert rows.ints[2][:5].tolist() == [3, 4, 5, 6, 1]              # the output position
    assert rows.ints[1][:4].tolist() == [5] * 4                      # a's seed
    np.testing.assert_allclose(rows.temperature[:5], [0.7] * 4 + [0.0])


def test_min_tokens_masks_each_guess_row_by_its_own_position():
    """A request's rows sample consecutive output positions: min_tokens keeps masking its stop ids
    on the rows before it is reached only."""
    from jaxvllm.core.outputs import CachedRequestData, NewRequestData, SchedulerOutput
    from jaxvllm.sampling_params import SamplingParams
    from jaxvllm.worker.input_batch import InputBatch
    from jaxvllm.worker.token_table import TokenTable
    batch = InputBatch(block_size=4, max_blocks_per_seq=8, token_buckets=(16,), max_num_seqs=4,
                       rng_seed=0, token_table=TokenTable(4, 32), num_speculative_tokens=3)
    sp = SamplingParams(temperature=0.0, min_tokens=5, stop_token_ids=[3], max_tokens=10)
    first = SchedulerOutput([NewRequestData("a", [1, 2, 3], [7, 8], sp, [1, 2], 0)], [], {"a": 5}, 5)
    batch.update(first)
    batch.build(first)
    batch.requests["a"].token_ids.append(9)
    batch.requests["a"].num_inflight -= 1
    second = SchedulerOutput([], [CachedRequestData("a", [], 5)], {"a": 4}, 4,
                             scheduled_spec_decode_tokens={"a": [10, 11, 12]})
    batch.update(second)
    rows = batch.sampling_inputs(batch.build(second))
    assert rows.ints[2][:4].tolist() == [3, 4, 5, 6]   # output positions 3..6
    assert rows.ints[3][:4].tolist() == [1, 1, 0, 0]   # min_tokens 5: masking before position 5


# ---- the engine ----------------------------------------------------------------------------------
VOCAB = 64
CONFIG = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=VOCAB,
              hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
              num_key_value_heads=1, max_position_embeddings=256)
SPEC = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3,
        "prompt_lookup_min": 1}


@pytest.fixture(scope="module")
def params():
    """Random weights: nearly flat logits, whose greedy output falls into loops prompt lookup
    guesses well."""
    from converters import load_model
    return load_model(CONFIG, load_format="dummy", dtype="float32", load_tokenizer=False).params


@pytest.fixture(scope="module")
def peaked_params(params):
    """Scaled so that the likeliest next token has p ~ 0.6: sampled guesses are kept often."""
    return jax.tree.map(lambda x: x * 6, params)


def _engine(params, speculative_config, **kw):
    from jaxvllm import LLM
    kw = dict(dict(max_num_seqs=8, max_num_batched_tokens=64), **kw)
    return LLM.from_params(params, CONFIG, speculative_config=speculative_config, dtype="float32",
                           max_model_len=256, num_gpu_blocks_override=160, **kw)


def _prompts(count, seed=0):
    """Prompts that repeat a random phrase, so that prompt lookup has something to find."""
    rng = np.random.default_rng(seed)
    return [{"prompt_token_ids": (rng.integers(3, VOCAB, rng.integers(3, 7)).tolist() * 6)[
        :int(rng.integers(8, 30))]} for _ in range(count)]


def test_greedy_output_is_the_same_token_for_token(params):
    """Batch-invariant mode, so verifying guesses k + 1 at a time gives bitwise the logits of one
    at a time: tokens, logprobs and finish reasons equal plain decoding's. The batch mixes
    requests guesses may skip (penalties, min_tokens) or not (logit_bias, stop tokens, logprobs,
    n = 2, prompt logprobs)."""
    from jaxvllm import SamplingParams
    g = dict(temperature=0.0, max_tokens=40, ignore_eos=True)
    prompts = _prompts(8)
    kinds = [SamplingParams(**g, logprobs=2), SamplingParams(**g),
             SamplingParams(**g, repetition_penalty=1.3), SamplingParams(**g, logit_bias={5: 3.0}),
             SamplingParams(**g, n=2, prompt_logprobs=1), SamplingParams(**{**g, "max_tokens": 7}),
             SamplingParams(**g, min_tokens=4, stop_token_ids=[7]), SamplingParams(**g, logprobs=0)]
    results = {}
    for spec in (None, SPEC):
        llm = _engine(params, spec, batch_invariant=True)
        results[spec is None] = llm.generate(prompts, kinds, use_tqdm=False)
        stats = llm.llm_engine.get_stats().spec_decode
    assert stats.num_draft_tokens > stats.num_accepted_tokens > 50, stats
    assert_same_outputs(results[True], results[False])


def assert_same_outputs(plain: list, guessed: list) -> None:
    """Every output of `guessed` (RequestOutputs) as `plain`'s: tokens, finish reasons,
    logprobs and prompt logprobs."""
    for p, g in zip(plain, guessed, strict=True):
        assert len(p.outputs) == len(g.outputs)
        for a, b in zip(p.outputs, g.outputs):
            assert a.token_ids == b.token_ids and a.finish_reason == b.finish_reason
            assert a.cumulative_logprob == b.cumulative_logprob
            assert a.logprobs == b.logprobs
        assert p.prompt_logprobs == g.prompt_logprobs


def assert_same_distribution(a: np.ndarray, b: np.ndarray, vocab: int) -> None:
    """Two-sample chi-square per output position of two equal-sized [samples, positions] token
    arrays (a loose bound: 6 standard deviations of the statistic)."""
    for pos in range(a.shape[1]):
        x, y = np.bincount(a[:, pos], minlength=vocab), np.bincount(b[:, pos], minlength=vocab)
        m = (x + y) > 0
        chi2 = float((((x - y) ** 2)[m] / (x + y)[m]).sum())
        df = int(m.sum()) - 1
        assert chi2 < df + 6 * np.sqrt(2 * df) + 10, (pos, chi2, df)


def test_token_masks_land_on_their_rows_beside_guesses(params):
    """Requests with a token mask (allowed_token_ids) or logit_bias beside requests without:
    their masks and biases go to their own rows, which guesses shift (greedy tokens as without
    guessing, every token allowed)."""
    from jaxvllm import SamplingParams
    g = dict(temperature=0.0, max_tokens=24, ignore_eos=True)
    allowed = list(range(10, 30))
    kinds = [SamplingParams(**g), SamplingParams(**g, allowed_token_ids=allowed), SamplingParams(**g),
             SamplingParams(**g, allowed_token_ids=allowed[::3]), SamplingParams(**g),
             SamplingParams(**g, logit_bias={7: 5.0})]
    plain, guessed, stats = _tokens_plain_and_guessed(params, _prompts(6, seed=4), kinds)
    assert guessed == plain
    assert all(t in allowed for t in guessed[1]) and all(t in allowed[::3] for t in guessed[3])
    assert stats.num_accepted_tokens > 0


def _tokens_plain_and_guessed(params, prompts, kinds) -> tuple:
    """Each request's greedy tokens without and with guessing (batch-invariant mode), and the
    guessing engine's speculation counts."""
    outs = {}
    for spec in (None, SPEC):
        llm = _engine(params, spec, batch_invariant=True)
        outs[spec is None] = [o.outputs[0].token_ids for o in llm.generate(prompts, kinds,
                                                                           use_tqdm=False)]
    return outs[True], outs[False], llm.llm_engine.get_stats().spec_decode


def test_requests_with_allowed_token_ids_guess_too(params):
    """allowed_token_ids requests guess (every guess row masked): the same greedy tokens as
    without guessing, guesses kept, and the mask holds."""
    from jaxvllm import SamplingParams
    g = dict(temperature=0.0, max_tokens=30, ignore_eos=True)
    prompts = _prompts(6, seed=7)
    plain = _engine(params, None, batch_invariant=True)
    first = [o.outputs[0].token_ids for o in plain.generate(prompts, SamplingParams(**g),
                                                            use_tqdm=False)]
    # What each greedy output used (the mask leaves it room to loop), less its 10th token.
    allowed = [sorted(set(t) - {t[9]}) for t in first]
    kinds = [SamplingParams(**g, allowed_token_ids=a) for a in allowed]
    plain, guessed, stats = _tokens_plain_and_guessed(params, prompts, kinds)
    assert guessed == plain
    assert stats.num_accepted_tokens > 10
    for t, a, f in zip(guessed, allowed, first):
        assert set(t) <= set(a) and t != f


def test_a_stop_token_among_kept_guesses_ends_the_output_there(params):
    from jaxvllm import SamplingParams
    prompts = _prompts(6, seed=1)
    plain = _engine(params, None, batch_invariant=True)
    guessed = _engine(params, SPEC, batch_invariant=True)
    base = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    first = plain.generate(prompts, base, use_tqdm=False)
    # Each request's 12th token as its stop token: it ends there (or earlier where it appeared).
    kinds = [SamplingParams(temperature=0.0, max_tokens=30, stop_token_ids=[o.outputs[0].token_ids[11]])
             for o in first]
    a = plain.generate(prompts, kinds, use_tqdm=False)
    b = guessed.generate(prompts, kinds, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in a] == [o.outputs[0].token_ids for o in b]
    assert all(o.outputs[0].finish_reason == "stop" for o in b)
    assert guessed.llm_engine.get_stats().spec_decode.num_accepted_tokens > 0


def _own_text(llm, seeds):
    """Prompts of the model's own greedy text after each seed prompt, which guesses taken from
    them often predict (a random model does not continue a prompt's repeats)."""
    from jaxvllm import SamplingParams
    outs = llm.generate(seeds, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True),
                        use_tqdm=False)
    return [{"prompt_token_ids": s["prompt_token_ids"] + o.outputs[0].token_ids}
            for s, o in zip(seeds, outs)]


def test_seeded_sampling_is_reproducible_in_any_batch(peaked_params):
    from jaxvllm import SamplingParams
    llm = _engine(peaked_params, SPEC)
    prompts = _own_text(llm, _prompts(6, seed=2))
    sp = [SamplingParams(temperature=0.8, top_k=20, seed=100 + i, max_tokens=24, ignore_eos=True)
          for i in range(6)]
    together = llm.generate(prompts, sp, use_tqdm=False)
    alone = [llm.generate([p], s, use_tqdm=False)[0] for p, s in zip(prompts[:2], sp[:2])]
    assert [o.outputs[0].token_ids for o in together[:2]] == [o.outputs[0].token_ids for o in alone]
    assert llm.llm_engine.get_stats().spec_decode.num_accepted_tokens > 0


@pytest.mark.parametrize("penalties", [{}, dict(presence_penalty=0.6, frequency_penalty=0.4,
                                                repetition_penalty=1.2)])
def test_sampled_tokens_keep_their_distribution(peaked_params, penalties):
    """The engine end to end at temperature 1 on a 64-token vocabulary: each of the first output
    positions has the same distribution with and without guesses (two-sample chi-square over
    480 seeded samples each, different seeds on each side), penalties too (each row counts the
    guesses before it)."""
    from jaxvllm import SamplingParams
    n, positions = 480, 5
    samples = {}
    for spec in (None, SPEC):
        llm = _engine(peaked_params, spec, max_num_seqs=64, max_num_batched_tokens=256)
        if spec is None:
            prompt = _own_text(llm, [{"prompt_token_ids": [5, 9, 14]}])[0]
        outs = llm.generate([prompt] * n, [SamplingParams(temperature=1.0, seed=i + (spec is None) * n,
                                                          max_tokens=positions, ignore_eos=True,
                                                          **penalties)
                                           for i in range(n)], use_tqdm=False)
        samples[spec is None] = np.array([o.outputs[0].token_ids for o in outs])
        if spec is not None:
            kept = llm.llm_engine.get_stats().spec_decode.num_accepted_tokens
            assert kept > (50 if penalties else 100)  # penalties make the repeats less likely
    assert_same_distribution(samples[True], samples[False], VOCAB)


def _first_rows(draft_ids):
    first, out = 0, []
    for r in range(len(draft_ids)):
        if r and draft_ids[r - 1] < 0:
            first = r
        out.append(first)
    return out


def test_guess_rows_count_the_guesses_before_them():
    """count_guesses and counted_rows against a loop over random batches: a request's rows are its
    guesses (>= 0) then one without (-1); a row's token bits count its request's earlier guesses,
    and its token is output when every earlier guess of its request was kept."""
    from jaxvllm.worker.sampler import COUNT_UNIT, count_guesses, counted_rows
    rng = np.random.default_rng(0)
    for _ in range(20):
        draft = np.concatenate([np.r_[rng.integers(0, V, int(rng.integers(0, 4))), -1]
                                for _ in range(int(rng.integers(1, 6)))]).astype(np.int32)
        accepted = (draft >= 0) & (rng.random(len(draft)) < 0.6)
        bits = rng.integers(0, 3, (len(draft), V)).astype(np.int32) * COUNT_UNIT
        want_bits, want_counted = bits.copy(), np.ones(len(draft), bool)
        for r, first in enumerate(_first_rows(draft)):
            for src in range(first, r):
                want_bits[r, draft[src]] += COUNT_UNIT
                want_counted[r] &= accepted[src]
        np.testing.assert_array_equal(np.asarray(count_guesses(jnp.asarray(bits), draft, 3)),
                                      want_bits)
        np.testing.assert_array_equal(np.asarray(counted_rows(draft, accepted)), want_counted)


def test_requests_with_penalties_guess_too(peaked_params):
    """Penalties and min_tokens (token bits) with guesses: each row counts the guesses before it
    (its own min_tokens too), and only output tokens are counted after the step; greedy tokens
    and logprobs as without guessing. Prompts of the model's own text, so that its guesses are
    often right; stop ids its continuations start with, masked for the first 8 tokens."""
    from jaxvllm import SamplingParams
    g = dict(temperature=0.0, max_tokens=30, ignore_eos=True)
    llm = _engine(peaked_params, None, batch_invariant=True)
    prompts = _own_text(llm, _prompts(6, seed=6))
    first = llm.generate(prompts, SamplingParams(**g), use_tqdm=False)
    stops = sorted({t for o in first for t in o.outputs[0].token_ids[:3]})
    kinds = [SamplingParams(**g, frequency_penalty=0.3), SamplingParams(**g, presence_penalty=0.5),
             SamplingParams(**g, repetition_penalty=1.3),
             SamplingParams(**g, min_tokens=8, stop_token_ids=stops),
             SamplingParams(**g, repetition_penalty=1.1, frequency_penalty=0.2, logprobs=1),
             SamplingParams(**g, min_tokens=12, stop_token_ids=stops[::2])]
    outs = {}
    for spec in (None, SPEC):
        llm = _engine(peaked_params, spec, batch_invariant=True)
        outs[spec is None] = llm.generate(prompts, kinds, use_tqdm=False)
    assert [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in outs[False]] == \
        [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in outs[True]]
    assert llm.llm_engine.get_stats().spec_decode.num_accepted_tokens > 10


def test_the_warm_up_covers_verification_steps(params):
    """A warmed-up speculative engine compiles nothing while serving: the sampler's variants take
    the guess rows (a bucket's logits rows are max_num_seqs x (1 + k), capped by the bucket: 8 and
    32 here)."""
    from jaxvllm import SamplingParams
    from jaxvllm.worker import compile_watch
    llm = _engine(params, SPEC, enforce_eager=False, token_buckets=(8, 64))
    mark = compile_watch.mark()
    g = dict(max_tokens=20, ignore_eos=True)
    llm.generate(_prompts(8, seed=3), [
        SamplingParams(temperature=0, **g), SamplingParams(temperature=0.7, **g, logprobs=3),
        SamplingParams(temperature=0.9, top_k=5, **g), SamplingParams(temperature=1.0, top_p=0.8, **g),
        SamplingParams(temperature=0.8, **g, presence_penalty=0.5), SamplingParams(temperature=0, **g),
        SamplingParams(temperature=0.6, seed=3, **g), SamplingParams(temperature=0, logit_bias={3: 1.0}, **g)],
        use_tqdm=False)
    assert llm.llm_engine.get_stats().spec_decode.num_draft_tokens > 0
    assert compile_watch.since(mark) == []
