"""Tests for the on-device sampler against numpy references (vLLM v1 semantics)."""
from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvllm.worker import sampler as S
from jaxvllm.worker.sampler import (SamplingTensors, prompt_logprobs, sample, sampling_mode,
                                    token_logprobs, topk_bound_for)

V = 24


class Sampled(NamedTuple):
    token_ids: jax.Array
    accepted: Optional[jax.Array]
    logprob: jax.Array
    rank: jax.Array
    topk_ids: jax.Array
    topk_logprobs: jax.Array


def sample_scored(logits, t, *, mode, num_logprobs=0, topk_bound=0, raw_logits=None):
    """The runner's two programs in one: `sample`, then `token_logprobs` of its tokens under the
    raw logits."""
    out = sample(logits, t, mode=mode, topk_bound=topk_bound, raw_logits=raw_logits)
    lp = token_logprobs(logits if raw_logits is None else raw_logits, out.token_ids, num_logprobs)
    return Sampled(out.token_ids, out.accepted, *lp)


def _jsample(mode, num_logprobs=0, topk_bound=0):
    return jax.jit(functools.partial(sample_scored, mode=mode, num_logprobs=num_logprobs,
                                     topk_bound=topk_bound))


@functools.lru_cache(maxsize=None)
def _jit_sample(mode, num_logprobs=0, topk_bound=0):
    return _jsample(mode, num_logprobs, topk_bound)


@functools.lru_cache(maxsize=None)
def _jit_process(mode, topk_bound=0):
    return jax.jit(lambda l, t: S._process(l, t, mode, topk_bound)[1:])


def make_t(r, v=0, **kw) -> SamplingTensors:
    """Neutral tensors for r rows (token bits over a vocabulary of v when v > 0), then `kw`."""
    t = SamplingTensors(
        temperature=np.zeros(r, np.float32), top_k=np.zeros(r, np.int32),
        top_p=np.ones(r, np.float32), min_p=np.zeros(r, np.float32),
        presence_penalty=np.zeros(r, np.float32), frequency_penalty=np.zeros(r, np.float32),
        repetition_penalty=np.ones(r, np.float32), seeds=np.zeros(r, np.uint32),
        steps=np.zeros(r, np.int32), min_tokens_active=np.zeros(r, np.bool_),
        token_bits=np.zeros((r, v), np.int32))
    for k, v in kw.items():
        cur = getattr(t, k)
        setattr(t, k, np.broadcast_to(np.asarray(v, cur.dtype), cur.shape).copy())
    return t


def fixed_logits(r=1, v=V, seed=0, scale=2.0):
    return (np.random.default_rng(seed).standard_normal((r, v)) * scale).astype(np.float32)


# ------------------------------------------------------------------ numpy references

def np_log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def np_softmax(x):
    return np.exp(np_log_softmax(x))


def np_penalize(x, tokens, is_out, rep, freq, pres):
    x = np.array(x, np.float64)
    v = x.shape[-1]
    seen = np.zeros(v, bool)
    counts = np.zeros(v)
    for tok, o in zip(tokens, is_out):
        if tok < 0:
            continue
        seen[tok] = True
        counts[tok] += bool(o)
    x = np.where(seen, np.where(x > 0, x / rep, x * rep), x)
    return x - freq * counts - pres * (counts > 0)


def np_filter(x, temp=1.0, min_p=0.0, top_k=0, top_p=1.0):
    """Processed logits for one row, vLLM v1 style (prob-space min_p, ascending-sort top_p)."""
    x = np.array(x, np.float64) / temp
    if min_p > 0:
        p = np_softmax(x)
        x = np.where(p < min_p * p.max(), -np.inf, x)
    if top_k > 0:
        thr = np.sort(x)[::-1][min(top_k, len(x)) - 1]
        x = np.where(x < thr, -np.inf, x)
    if top_p < 1.0:
        order = np.argsort(x, kind="stable")
        ps = np_softmax(x[order])
        cs = np.cumsum(ps)
        drop = cs <= 1 - top_p
        drop[-1] = False
        x = x.copy()
        x[order[drop]] = -np.inf
    return x


# ------------------------------------------------------------------ masks / filters

FILTER_CASES = [
    dict(temp=1.0),
    dict(temp=0.5),
    dict(temp=2.0),
    dict(temp=1.0, top_k=1),
    dict(temp=1.0, top_k=5),
    dict(temp=0.7, top_k=V + 10),
    dict(temp=1.0, top_p=0.5),
    dict(temp=1.0, top_p=0.9),
    dict(temp=1.0, top_p=1e-6),
    dict(temp=1.0, min_p=0.1),
    dict(temp=0.8, min_p=0.05),
    dict(temp=1.0, top_k=8, top_p=0.6),
    dict(temp=1.5, top_k=10, top_p=0.8, min_p=0.02),
    dict(temp=0.6, top_k=3, min_p=0.3),
]


def _case_tensors(case, r=1):
    return make_t(r, temperature=case.get("temp", 1.0), top_k=case.get("top_k", 0),
                  top_p=case.get("top_p", 1.0), min_p=case.get("min_p", 0.0))


@pytest.mark.parametrize("case", FILTER_CASES)
def test_filter_masks_match_numpy(case):
    logits = fixed_logits(1, seed=3)
    t = _case_tensors(case)
    mode = sampling_mode(t.temperature, t.top_k, t.top_p)
    x, _ = _jit_process(mode)(logits, t)
    x = np.asarray(x)[0]
    ref = np_filter(logits[0], case.get("temp", 1.0), case.get("min_p", 0.0),
                    case.get("top_k", 0), case.get("top_p", 1.0))
    np.testing.assert_array_equal(np.isfinite(x), np.isfinite(ref))
    np.testing.assert_allclose(np_softmax(x), np_softmax(ref), atol=1e-6)


def test_topk_bound_matches_full_sort():
    logits = fixed_logits(6, v=300, seed=5)
    t = make_t(6, temperature=[1.0, 0.5, 0.0, 1.2, 1.0, 0.9], top_k=[1, 7, 0, 32, 0, 20],
               top_p=[1.0, 0.8, 1.0, 0.5, 1.0, 0.95], min_p=[0, 0, 0, 0, 0.1, 0.01],
               seeds=np.arange(6), steps=3)
    assert topk_bound_for(t.temperature, t.top_k, t.top_p) == 64
    xa, _ = _jit_process("random_sort")(logits, t)
    xb, _ = _jit_process("random_sort", 32)(logits, t)
    np.testing.assert_array_equal(np.asarray(xa), np.asarray(xb))
    a = _jit_sample("random_sort")(logits, t)
    b = _jit_sample("random_sort", 0, 32)(logits, t)
    np.testing.assert_array_equal(np.asarray(a.token_ids), np.asarray(b.token_ids))


@pytest.mark.parametrize("case", FILTER_CASES[1:] + [dict(temp=1.0)])
def test_empirical_distribution(case):
    n = 4000
    logits = np.repeat(fixed_logits(1, seed=11, scale=1.0), n, axis=0)
    t = _case_tensors(case, r=n)
    t.seeds[:] = 1234
    t.steps[:] = np.arange(n)
    mode = sampling_mode(t.temperature, t.top_k, t.top_p)
    out = _jit_sample(mode)(logits, t)
    toks = np.asarray(out.token_ids)
    ref = np_softmax(np_filter(logits[0], case.get("temp", 1.0), case.get("min_p", 0.0),
                               case.get("top_k", 0), case.get("top_p", 1.0)))
    allowed = ref > 0
    assert allowed[toks].all(), "sampled a filtered-out token"
    obs = np.bincount(toks, minlength=V)
    exp = ref * n
    m = exp > 0
    if m.sum() == 1:
        assert obs[m][0] == n
        return
    chi2 = float(((obs[m] - exp[m]) ** 2 / exp[m]).sum())
    df = int(m.sum()) - 1
    assert chi2 < df + 6 * np.sqrt(2 * df) + 10, (chi2, df, obs, exp)


# ------------------------------------------------------------------ penalties / min_tokens

PEN_CASES = [
    dict(rep=1.5, freq=0.0, pres=0.0),
    dict(rep=0.7, freq=0.0, pres=0.0),
    dict(rep=1.0, freq=0.6, pres=0.0),
    dict(rep=1.0, freq=-0.5, pres=0.0),
    dict(rep=1.0, freq=0.0, pres=1.2),
    dict(rep=1.3, freq=0.4, pres=-0.8),
]


@pytest.mark.parametrize("case", PEN_CASES)
def test_penalties_match_numpy(case):
    r, l = 3, 10
    logits = fixed_logits(r, seed=7)
    rng = np.random.default_rng(1)
    toks = rng.integers(0, 8, size=(r, l)).astype(np.int32)  # repeats guaranteed
    toks[1, 6:] = -1  # padding
    toks[2, :] = -1
    is_out = np.zeros((r, l), bool)
    is_out[:, 4:] = True  # first 4 are prompt tokens
    t = make_t(r, V, temperature=0.0, repetition_penalty=case["rep"],
               frequency_penalty=case["freq"], presence_penalty=case["pres"])
    for i in range(r):
        t.token_bits[i] = S.token_bits(V, toks[i, :4][toks[i, :4] >= 0],
                                       toks[i, 4:][toks[i, 4:] >= 0])
    x, greedy = _jit_process("greedy")(logits, t)
    for i in range(r):
        ref = np_penalize(logits[i], toks[i], is_out[i], case["rep"], case["freq"], case["pres"])
        np.testing.assert_allclose(np.asarray(x)[i], ref, rtol=1e-5, atol=1e-5)
        assert int(greedy[i]) == int(np.argmax(ref))
    np.testing.assert_array_equal(np.asarray(x)[2], logits[2])  # all padding: untouched
    out = _jit_sample("greedy")(logits, t)
    np.testing.assert_array_equal(np.asarray(out.token_ids), np.asarray(greedy))


def test_penalty_changes_greedy_choice():
    logits = np.zeros((1, V), np.float32)
    logits[0, 5] = 2.0
    logits[0, 6] = 1.5
    t = make_t(1, V, temperature=0.0, repetition_penalty=2.0)
    t.token_bits[0] = S.token_bits(V, [5])
    out = _jit_sample("greedy")(logits, t)
    assert int(out.token_ids[0]) == 6
    # logprobs stay raw
    assert int(out.rank[0]) == 2
    np.testing.assert_allclose(float(out.logprob[0]), np_log_softmax(logits[0])[6], atol=1e-5)
    # ties: as vLLM, the rank counts every token at least as likely (greedy picks index 0 here)
    tied = np.zeros((1, V), np.float32)
    tied[0, :2] = 2.0
    out = _jit_sample("greedy")(tied, make_t(1, V, temperature=0.0))
    assert int(out.token_ids[0]) == 0 and int(out.rank[0]) == 2


def test_min_tokens_masks_stop_ids():
    logits = fixed_logits(3, seed=2)
    eos = np.argmax(logits, -1)
    stop = [[eos[0], np.argsort(logits[0])[-2]], [eos[1]], [eos[2]]]  # row 0: second best too
    # A prompt token that is also a stop id is masked all the same.
    t = make_t(3, V, temperature=0.0, min_tokens_active=[True, True, False])
    for i in range(3):
        t.token_bits[i] = S.token_bits(V, [eos[i]], stop_ids=stop[i])
    out = _jit_sample("greedy")(logits, t)
    toks = np.asarray(out.token_ids)
    assert toks[0] == np.argsort(logits[0])[-3]
    assert toks[1] == np.argsort(logits[1])[-2]
    assert toks[2] == eos[2]
    # random rows never pick masked ids
    n = 500
    lg = np.zeros((n, V), np.float32)
    lg[:, 3] = 5.0
    t = make_t(n, V, temperature=1.0, min_tokens_active=True, seeds=9)
    t.steps[:] = np.arange(n)
    t.token_bits[:] = S.token_bits(V, [], stop_ids=[3, V + 5])  # an id beyond V is ignored
    toks = np.asarray(_jit_sample("random")(lg, t).token_ids)
    assert not (toks == 3).any()
    t.min_tokens_active[:] = False
    toks = np.asarray(_jit_sample("random")(lg, t).token_ids)
    assert (toks == 3).mean() > 0.8


# ------------------------------------------------------------------ greedy / mixed

def test_greedy_is_argmax():
    logits = fixed_logits(8, v=1000, seed=4)
    out = _jit_sample("greedy")(logits, make_t(8))
    np.testing.assert_array_equal(np.asarray(out.token_ids), np.argmax(logits, -1))


@pytest.mark.parametrize("mode", ["random", "random_sort"])
def test_mixed_greedy_and_random_rows(mode):
    r = 64
    logits = fixed_logits(r, v=50, seed=8, scale=0.5)  # flat: random rows rarely hit argmax
    temp = np.where(np.arange(r) % 2 == 0, 0.0, 1.0).astype(np.float32)
    t = make_t(r, temperature=temp, top_k=np.where(temp > 0, 40, 0), top_p=0.95,
               seeds=np.arange(r))
    out = _jit_sample(mode)(logits, t)
    toks = np.asarray(out.token_ids)
    am = np.argmax(logits, -1)
    np.testing.assert_array_equal(toks[::2], am[::2])
    assert (toks[1::2] != am[1::2]).sum() > 10


def test_sampling_mode_helper():
    assert sampling_mode([0.0, 0.0], [5, 0], [0.5, 1.0]) == "greedy"
    assert sampling_mode([0.0, 1.0], [5, 0], [0.5, 1.0]) == "random"
    assert sampling_mode([0.0, 1.0], [0, 3], [1.0, 1.0]) == "random_sort"
    assert sampling_mode([1.0], [0], [0.9]) == "random_sort"
    assert topk_bound_for([1.0, 1.0], [0, 3], [1.0, 1.0]) == 16
    assert topk_bound_for([1.0, 1.0], [0, 50], [1.0, 0.5]) == 64
    assert topk_bound_for([1.0], [0], [0.9]) == 0
    assert topk_bound_for([1.0], [65], [1.0]) == 0
    assert topk_bound_for([0.0], [0], [0.9]) == 16


# ------------------------------------------------------------------ seeded reproducibility

def test_seed_reproducibility_and_independence():
    v = 1000
    base = fixed_logits(1, v=v, seed=21, scale=0.3)
    params = dict(temperature=1.0, top_k=200, top_p=0.9, min_p=0.0)

    def run(logits, seeds, steps, **kw):
        r = logits.shape[0]
        t = make_t(r, **{**params, **kw})
        t.seeds[:] = seeds
        t.steps[:] = steps
        return np.asarray(_jit_sample("random_sort")(logits, t).token_ids)

    # identical rows in one batch -> identical tokens
    toks = run(np.repeat(base, 8, 0), 77, 5)
    assert (toks == toks[0]).all()
    # same (seed, step) in a different batch position with different neighbours
    others = fixed_logits(8, v=v, seed=22)
    mixed = others.copy()
    mixed[5] = base[0]
    seeds = np.arange(100, 108)
    seeds[5] = 77
    toks2 = run(mixed, seeds, np.array([0, 9, 3, 1, 2, 5, 7, 8]),
                temperature=np.array([0.5, 1, 1, 0, 1.3, 1, 1, 1], np.float32))
    assert toks2[5] == toks[0]
    # alone, repeated call
    assert run(base, 77, 5)[0] == toks[0]
    # different steps / seeds -> different draws
    by_step = run(np.repeat(base, 64, 0), 77, np.arange(64))
    assert len(set(by_step.tolist())) > 20
    by_seed = run(np.repeat(base, 64, 0), np.arange(64), 5)
    assert len(set(by_seed.tolist())) > 20


def test_int32_and_uint32_seeds_agree():
    logits = np.repeat(fixed_logits(1, v=500, seed=1, scale=0.2), 4, 0)
    t = make_t(4, temperature=1.0)
    t.seeds = np.array([1, 2, 3, 2**31 - 1], np.uint32)
    t.steps[:] = [0, 1, 2, 3]
    a = np.asarray(_jit_sample("random")(logits, t).token_ids)
    t2 = dataclasses.replace(t, seeds=t.seeds.astype(np.int32))
    b = np.asarray(_jsample("random")(logits, t2).token_ids)
    np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------ logprobs

@pytest.mark.parametrize("mode,k", [("greedy", 0), ("greedy", 5), ("random", 3), ("random_sort", 20)])
def test_logprobs_raw(mode, k):
    r, v = 6, 300
    logits = fixed_logits(r, v=v, seed=13)
    t = make_t(r, v, temperature=0.0 if mode == "greedy" else 1.3, top_k=50, top_p=0.9,
               repetition_penalty=1.8, frequency_penalty=0.5, seeds=np.arange(r), steps=2)
    for i in range(r):
        t.token_bits[i] = S.token_bits(v, [], output_ids=np.argsort(logits[i])[-4:])
    out = _jit_sample(mode, k)(logits, t)
    toks = np.asarray(out.token_ids)
    lp = np_log_softmax(logits)
    np.testing.assert_allclose(np.asarray(out.logprob), lp[np.arange(r), toks], atol=1e-5)
    ranks = (lp >= lp[np.arange(r), toks][:, None]).sum(-1)
    np.testing.assert_array_equal(np.asarray(out.rank), ranks)
    assert out.topk_ids.shape == (r, k) and out.topk_logprobs.shape == (r, k)
    assert out.token_ids.dtype == jnp.int32 and out.rank.dtype == jnp.int32
    if k:
        ref_ids = np.argsort(-lp, -1, kind="stable")[:, :k]
        np.testing.assert_array_equal(np.asarray(out.topk_ids), ref_ids)
        np.testing.assert_allclose(np.asarray(out.topk_logprobs),
                                   np.take_along_axis(lp, ref_ids, -1), atol=1e-5)
    if mode == "greedy":
        assert (ranks > 1).any()  # penalties moved the choice, logprobs stayed raw


@pytest.mark.parametrize("k", [0, 4])
def test_prompt_logprobs(k):
    n, v = 9, 200
    logits = fixed_logits(n, v=v, seed=17)
    tgt = np.random.default_rng(0).integers(0, v, n).astype(np.int32)
    lp_, rank, ids, vals = jax.jit(functools.partial(prompt_logprobs, num_logprobs=k))(logits, tgt)
    lp = np_log_softmax(logits)
    np.testing.assert_allclose(np.asarray(lp_), lp[np.arange(n), tgt], atol=1e-5)
    np.testing.assert_array_equal(np.asarray(rank), (lp >= lp[np.arange(n), tgt][:, None]).sum(-1))
    assert ids.shape == (n, k) and vals.shape == (n, k)
    if k:
        ref_ids = np.argsort(-lp, -1)[:, :k]
        np.testing.assert_array_equal(np.asarray(ids), ref_ids)
        np.testing.assert_allclose(np.asarray(vals), np.take_along_axis(lp, ref_ids, -1), atol=1e-5)


@pytest.mark.parametrize("k", [5, 20, 64])
def test_two_stage_top_k_exact(k):
    v = 20000  # large enough for the chunked path when k > 16
    x = fixed_logits(3, v=v, seed=k)
    x[1, 7000:] = -np.inf
    x[2, :] = -np.inf
    x[2, 19990:] = np.arange(10)  # fewer than k finite values
    vals, ids = jax.jit(lambda a: S._top_k(a, k))(x)
    ref_vals, _ = jax.lax.top_k(x, k)
    np.testing.assert_array_equal(np.asarray(vals), np.asarray(ref_vals))
    ids = np.asarray(ids)
    assert ((ids >= 0) & (ids < v)).all()
    np.testing.assert_array_equal(np.take_along_axis(x, ids, -1), np.asarray(ref_vals))
    np.testing.assert_array_equal(ids[:2], np.argsort(-x[:2], -1, kind="stable")[:, :k])
    # the bounded top-k/top-p path agrees with the full sort at this width
    t = make_t(3, temperature=1.0, top_k=[k, k // 2, k], top_p=[1.0, 0.7, 0.9], seeds=[1, 2, 3])
    xa, _ = _jit_process("random_sort")(x, t)
    xb, _ = _jit_process("random_sort", k)(x, t)
    np.testing.assert_array_equal(np.asarray(xa), np.asarray(xb))


def test_bf16_logits():
    logits = fixed_logits(4, v=128, seed=3).astype(jnp.bfloat16)
    out = _jsample("greedy", 2)(logits, make_t(4))
    np.testing.assert_array_equal(np.asarray(out.token_ids),
                                  np.argmax(np.asarray(logits, np.float32), -1))
    assert out.logprob.dtype == jnp.float32


# ------------------------------------------------------------------ -inf rows / NaN safety

@pytest.mark.parametrize("mode", ["greedy", "random", "random_sort"])
def test_all_masked_rows_no_nan(mode):
    v = 8
    logits = fixed_logits(3, v=v, seed=1)
    logits[2, :] = -np.inf  # raw row all -inf
    t = make_t(3, v, temperature=0.0 if mode == "greedy" else 1.0, top_k=2, top_p=0.5,
               min_p=0.2, min_tokens_active=[True, False, True], seeds=[1, 2, 3])
    t.token_bits[:] = S.token_bits(v, [], stop_ids=np.arange(v))  # row 0: every token masked
    out = _jit_sample(mode, 3)(logits, t)
    toks = np.asarray(out.token_ids)
    assert toks[0] == np.argmax(logits[0])  # fallback: raw argmax
    assert 0 <= toks[2] < v
    for a in (out.logprob, out.topk_logprobs):
        a = np.asarray(a)
        assert not np.isnan(a).any()
    assert np.isneginf(np.asarray(out.logprob)[2])
    np.testing.assert_allclose(np.asarray(out.logprob)[:2],
                               np_log_softmax(logits[:2])[np.arange(2), toks[:2]], atol=1e-5)


def test_invalid_mode():
    with pytest.raises(ValueError, match="mode"):
        sample(fixed_logits(1), make_t(1), mode="beam")


def test_jitted_sample_on_device_tensors_matches_numpy():
    """`sample` jitted as the runner does (static mode, SamplingTensors as a pytree of
    device arrays), rows cycling through the top-k/top-p/min-p filter cases: each sampled token is one
    the numpy filter keeps, greedy rows are the argmax, and the logprobs are numpy's raw
    log-softmax."""
    cases = [c for c in FILTER_CASES if set(c) & {"top_k", "top_p", "min_p"}] + [dict(temp=0.0)]
    r = 32 * len(cases)
    row_cases = [cases[i % len(cases)] for i in range(r)]
    logits = fixed_logits(r, seed=21, scale=1.0)  # flat enough that filters matter
    t = make_t(r, temperature=[c.get("temp", 1.0) for c in row_cases],
               top_k=[c.get("top_k", 0) for c in row_cases],
               top_p=[c.get("top_p", 1.0) for c in row_cases],
               min_p=[c.get("min_p", 0.0) for c in row_cases], seeds=np.arange(r), steps=5)
    tj = jax.tree_util.tree_map(jnp.asarray, t)
    assert isinstance(tj, SamplingTensors)
    out = _jit_sample("random_sort", 2)(jnp.asarray(logits), tj)
    toks = np.asarray(out.token_ids)
    for i, c in enumerate(row_cases):
        if c["temp"] == 0.0:
            assert toks[i] == np.argmax(logits[i]), i
        else:
            kept = np.isfinite(np_filter(logits[i], c["temp"], c.get("min_p", 0.0),
                                         c.get("top_k", 0), c.get("top_p", 1.0)))
            assert kept[toks[i]], (i, c, toks[i], np.flatnonzero(kept))
    random_rows = [i for i, c in enumerate(row_cases) if c["temp"] > 0 and c.get("top_k") != 1]
    assert (toks[random_rows] != np.argmax(logits[random_rows], -1)).any()  # it does sample
    lp = np_log_softmax(logits)
    np.testing.assert_allclose(np.asarray(out.logprob), lp[np.arange(r), toks], atol=1e-5)
    ref_ids = np.argsort(-lp, -1, kind="stable")[:, :2]
    np.testing.assert_array_equal(np.asarray(out.topk_ids), ref_ids)
    np.testing.assert_allclose(np.asarray(out.topk_logprobs), np.take_along_axis(lp, ref_ids, -1),
                               atol=1e-5)


@pytest.mark.parametrize("field, value", [("stop", [f"s{i}" for i in range(65)]),
                                          ("stop_token_ids", list(range(65)))])
def test_stop_lists_are_capped(field, value):
    """At most MAX_STOP stop strings and stop ids per request (both cost per step); the cap itself
    is allowed."""
    from jaxvllm.sampling_params import MAX_STOP, SamplingParams
    with pytest.raises(ValueError, match=rf"^{field} may hold at most {MAX_STOP} "):
        SamplingParams(**{field: value})
    SamplingParams(**{field: value[:MAX_STOP]})


@pytest.mark.parametrize("mode", ["greedy", "random", "random_sort"])
def test_token_bits_applied_apart_equal_token_bits_inside(mode):
    """The runner applies token bits in a program of its own (apply_token_bits), then samples the
    processed logits with the raw ones beside them: the same tokens, logprobs and ranks as one call
    with the bits inside."""
    r, v = 6, 300
    logits = fixed_logits(r, v=v, seed=5)
    t = make_t(r, v, temperature=0.0 if mode == "greedy" else 0.9, top_k=40, top_p=0.8,
               repetition_penalty=1.5, frequency_penalty=0.7, presence_penalty=-0.4,
               min_tokens_active=[True, False] * 3, seeds=np.arange(r), steps=3)
    for i in range(r):
        top = np.argsort(logits[i])[::-1]
        t.token_bits[i] = S.token_bits(v, top[:3], top[2:6], stop_ids=top[6:8])
    whole = _jit_sample(mode, 3)(logits, t)
    processed = jax.jit(S.apply_token_bits)(logits, t)
    apart = jax.jit(functools.partial(sample_scored, mode=mode, num_logprobs=3))(
        processed, dataclasses.replace(t, token_bits=np.zeros((r, 0), np.int32)), raw_logits=logits)
    for a, b in zip(whole, apart):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(whole.token_ids),  # the bits do change the choice
                              np.asarray(_jit_sample(mode, 3)(logits, make_t(
                                  r, v, temperature=t.temperature, top_k=40, top_p=0.8,
                                  seeds=np.arange(r), steps=3)).token_ids))
