"""The engine end to end on the embedded SmolLM2 (float32, CPU): greedy equals HF transformers;
batching, chunked prefill, preemption and prefix caching never change greedy tokens; sampling
semantics; stop conditions; errors."""
from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import time

import jax
import numpy as np
import pytest
import torch

from jaxvllm import LLM, SamplingParams
from jaxvllm.core.scheduler import Scheduler
from jaxvllm.engine.async_llm_engine import AsyncLLMEngine, EngineDeadError

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village,",
    "def fibonacci(n):",
    "The three primary colors are",
]


@pytest.fixture(scope="module")
def llm():
    return LLM(dtype="float32", max_model_len=256, max_num_seqs=8, max_num_batched_tokens=64,
               num_gpu_blocks_override=96, enforce_eager=True, token_buckets=(8, 16, 32, 64))


@pytest.fixture
def scheduler_config(llm):
    """Swap the scheduler for one test (scheduling policy is host-side: no recompilation). An idle
    step first hands the runner the requests the outgoing scheduler finished since its last step,
    so the runner releases their rows (a new scheduler would never report them)."""
    engine = llm.llm_engine
    original = engine.scheduler
    base = original.config

    def use(**changes):
        engine.step()
        engine.scheduler = Scheduler(dataclasses.replace(base, **changes))
        return engine.scheduler

    yield use
    engine.step()
    engine.scheduler = original


def greedy(max_tokens=12, **kw):
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)


def token_ids(outs):
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def reference_tokens(llm, hf_default_model):
    """HF transformers' greedy continuation of each prompt (same GGUF, float32)."""
    hf = hf_default_model
    tok = llm.get_tokenizer()
    refs = []
    for p in PROMPTS:
        ids = torch.tensor([tok.encode(p)])
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                              do_sample=False, min_new_tokens=12)
        refs.append(out[0, ids.shape[1]:].tolist())
    return refs


def test_greedy_matches_hf_batched(llm, reference_tokens):
    outs = llm.generate(PROMPTS, greedy(), use_tqdm=False)
    assert token_ids(outs) == reference_tokens
    for o in outs:
        assert o.finished and o.outputs[0].finish_reason == "length"
        assert o.outputs[0].text == llm.get_tokenizer().decode(o.outputs[0].token_ids,
                                                               skip_special_tokens=True)


def test_alone_equals_batched(llm, reference_tokens):
    for prompt, ref in zip(PROMPTS[:2], reference_tokens):
        assert token_ids(llm.generate(prompt, greedy(), use_tqdm=False)) == [ref]


def test_chunked_prefill_same_tokens(llm, reference_tokens, scheduler_config):
    sched = scheduler_config(max_num_batched_tokens=8, max_num_seqs=4)
    outs = llm.generate(PROMPTS, greedy(), use_tqdm=False)
    assert token_ids(outs) == reference_tokens
    assert not sched.has_unfinished_requests()


def test_preemption_same_tokens(llm, reference_tokens, scheduler_config):
    # 4 requests of ~20 tokens in 5 usable blocks of 16: they cannot all run at once.
    sched = scheduler_config(num_blocks=6, enable_prefix_caching=False)
    outs = llm.generate(PROMPTS, greedy(), use_tqdm=False)
    assert token_ids(outs) == reference_tokens
    assert sched.stats.num_preemptions > 0
    assert all(len(t) == 12 for t in token_ids(outs))


def test_prefix_caching_on_off_same_tokens(llm, scheduler_config):
    shared = "You are a helpful assistant. Answer briefly and precisely. " * 3
    prompts = [shared + q for q in ("What is red?", "What is blue?", "Name a fruit.")]
    results = {}
    for caching in (False, True):
        sched = scheduler_config(enable_prefix_caching=caching)
        llm.generate(prompts[:1], greedy(4), use_tqdm=False)  # warms the cache when enabled
        outs = llm.generate(prompts, greedy(), use_tqdm=False)
        results[caching] = token_ids(outs)
        hits = sched.stats.prefix_cache_hits
        assert (hits > 0) == caching
        if caching:
            assert max(o.num_cached_tokens for o in outs) >= 16
    assert results[True] == results[False]


def test_seeded_sampling_reproducible(llm):
    sp = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=1234, max_tokens=10)
    a = llm.generate([PROMPTS[0], PROMPTS[0], PROMPTS[1]], sp, use_tqdm=False)
    b = llm.generate(PROMPTS[0], sp, use_tqdm=False)
    assert a[0].outputs[0].token_ids == a[1].outputs[0].token_ids == b[0].outputs[0].token_ids
    other = llm.generate(PROMPTS[0], dataclasses.replace(sp, seed=99), use_tqdm=False)
    assert other[0].outputs[0].token_ids != a[0].outputs[0].token_ids


def test_n_greater_than_one(llm):
    sp = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=8, ignore_eos=True)
    out = llm.generate(PROMPTS[1], sp, use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 8 for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1  # distinct samples
    again = llm.generate(PROMPTS[1], sp, use_tqdm=False)[0]
    assert [c.token_ids for c in again.outputs] == [c.token_ids for c in out.outputs]


def _full_logprobs(llm, ids):
    """log_softmax of the model's logits at every position (reference via the model test path)."""
    from test_models import run_sequence
    loaded = llm.llm_engine.loaded
    logits = run_sequence(loaded.params, loaded.config, np.asarray(ids))
    return np.asarray(jax.nn.log_softmax(logits, axis=-1))


def test_logprobs_match_log_softmax(llm):
    sp = SamplingParams(temperature=0.8, seed=3, max_tokens=6, logprobs=3, prompt_logprobs=2,
                        ignore_eos=True)
    out = llm.generate(PROMPTS[2], sp, use_tqdm=False)[0]
    comp = out.outputs[0]
    assert len(comp.logprobs) == len(comp.token_ids) == 6
    ref = _full_logprobs(llm, out.prompt_token_ids + comp.token_ids)
    n_prompt = len(out.prompt_token_ids)
    total = 0.0
    for j, (tok, entry) in enumerate(zip(comp.token_ids, comp.logprobs)):
        row = ref[n_prompt - 1 + j]
        assert tok in entry and 3 <= len(entry) <= 4
        assert entry[tok].logprob == pytest.approx(row[tok], abs=1e-3)
        assert entry[tok].rank == int((row > row[tok]).sum()) + 1
        top = np.argsort(-row)[:3]
        for r, t in enumerate(top):
            assert entry[int(t)].logprob == pytest.approx(row[t], abs=1e-3)
        total += entry[tok].logprob
    assert comp.cumulative_logprob == pytest.approx(total, abs=1e-3)
    # prompt logprobs: None for the first token, then the logprob of each actual prompt token.
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == n_prompt
    for i in range(1, n_prompt):
        tok = out.prompt_token_ids[i]
        assert out.prompt_logprobs[i][tok].logprob == pytest.approx(ref[i - 1][tok], abs=1e-3)


def test_prompt_logprobs_in_several_row_chunks(llm, monkeypatch):
    """Prompt tokens scored 8 rows per call: two requests in one batch, 30+ prompt tokens between
    them, different k, each matches log_softmax at every position."""
    monkeypatch.setattr(llm.llm_engine.runner, "score_rows", 8)
    long_prompt = " ".join(PROMPTS)
    outs = llm.generate([long_prompt, PROMPTS[1]],
                        [SamplingParams(max_tokens=1, prompt_logprobs=1),
                         SamplingParams(max_tokens=1, prompt_logprobs=3)], use_tqdm=False)
    assert len(outs[0].prompt_token_ids) > 3 * 8
    for out, k in zip(outs, (1, 3)):
        ids = out.prompt_token_ids
        ref = _full_logprobs(llm, ids)
        assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(ids)
        for i in range(1, len(ids)):
            entry = out.prompt_logprobs[i]
            assert ids[i] in entry and k <= len(entry) <= k + 1
            assert entry[ids[i]].logprob == pytest.approx(ref[i - 1][ids[i]], abs=1e-3)
            assert entry[ids[i]].rank == int((ref[i - 1] > ref[i - 1][ids[i]]).sum()) + 1


def test_stop_strings_and_stop_ids(llm):
    base = llm.generate(PROMPTS[1], greedy(16), use_tqdm=False)[0].outputs[0]
    words = re.findall(r"[A-Za-z]{3,}", base.text)
    stop = words[len(words) // 2]
    cut = base.text.index(stop)
    out = llm.generate(PROMPTS[1], greedy(16, stop=[stop]), use_tqdm=False)[0].outputs[0]
    assert out.text == base.text[:cut] and out.finish_reason == "stop" and out.stop_reason == stop
    out = llm.generate(PROMPTS[1], greedy(16, stop=stop, include_stop_str_in_output=True),
                       use_tqdm=False)[0].outputs[0]
    assert out.text == base.text[:cut + len(stop)]
    # As vLLM, stop strings also wait for min_tokens: text within the first min_tokens tokens is
    # never searched, so here the output runs to max_tokens.
    out = llm.generate(PROMPTS[1], greedy(16, stop=[stop], min_tokens=16), use_tqdm=False)[0].outputs[0]
    assert out.token_ids == base.token_ids and out.text == base.text and out.finish_reason == "length"
    stop_id = base.token_ids[4]
    first = base.token_ids.index(stop_id)
    out = llm.generate(PROMPTS[1], greedy(16, stop_token_ids=[stop_id]), use_tqdm=False)[0].outputs[0]
    assert out.token_ids == base.token_ids[:first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_id
    # min_tokens masks stop ids until reached
    out = llm.generate(PROMPTS[1], greedy(16, stop_token_ids=[base.token_ids[0]], min_tokens=3),
                       use_tqdm=False)[0].outputs[0]
    assert out.token_ids[0] != base.token_ids[0] and len(out.token_ids) >= 3


def test_eos_stops_without_ignore_eos(llm):
    """Greedy "Say hi." chat ends with EOS well before max_tokens: without ignore_eos the request
    stops right at the EOS (finish_reason "stop", EOS the last token, no stop_reason); with
    ignore_eos the same greedy tokens run past it to max_tokens (finish_reason "length")."""
    msgs = [{"role": "user", "content": "Say hi."}]
    max_tokens = 64
    engine = llm.llm_engine
    eos = {engine.eos_token_id} | engine.preparer.extra_eos_ids
    free = llm.chat(msgs, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True),
                    use_tqdm=False)[0].outputs[0]
    assert free.finish_reason == "length" and len(free.token_ids) == max_tokens
    first_eos = next((i for i, t in enumerate(free.token_ids) if t in eos), None)
    # The case this test needs: greedy decoding reaches EOS with room to spare.
    assert first_eos is not None and first_eos < max_tokens // 2, free.token_ids

    chat = llm.chat(msgs, SamplingParams(temperature=0, max_tokens=max_tokens), use_tqdm=False)[0]
    comp = chat.outputs[0]
    # The prompt is the rendered chat text, tokenized as transformers' apply_chat_template does.
    tok = llm.get_tokenizer()
    assert chat.prompt == tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert chat.prompt_token_ids == list(tok.apply_chat_template(msgs, add_generation_prompt=True,
                                                                  return_dict=False))
    assert comp.finish_reason == "stop" and comp.stop_reason is None
    assert comp.token_ids == free.token_ids[:first_eos + 1]  # up to and including the EOS
    assert comp.text == tok.decode(free.token_ids[:first_eos], skip_special_tokens=True)


@pytest.mark.parametrize("kwargs, field", [
    ({"temperature": -1.0}, "temperature"), ({"top_p": 0.0}, "top_p"), ({"top_k": 1.5}, "top_k"),
    ({"max_tokens": 0}, "max_tokens"), ({"n": 0}, "n"), ({"min_p": 2.0}, "min_p"),
    ({"presence_penalty": 3.0}, "presence_penalty"), ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"logprobs": -1}, "logprobs"), ({"stop": [""]}, "stop"), ({"min_tokens": 20, "max_tokens": 5}, "min_tokens"),
    ({"top_k": "5"}, "top_k"), ({"top_k": [5]}, "top_k"), ({"stop": 5}, "stop"), ({"stop": {"a": 1}}, "stop"),
    ({"stop_token_ids": 5}, "stop_token_ids"), ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"ignore_eos": "no"}, "ignore_eos"), ({"skip_special_tokens": 0}, "skip_special_tokens"),
    ({"include_stop_str_in_output": None}, "include_stop_str_in_output"), ({"top_k": -2}, "top_k"),
    ({"n": 2, "best_of": 3}, "best_of"), ({"n": "2"}, "n"), ({"temperature": "a"}, "temperature"),
])
def test_invalid_sampling_params(kwargs, field):
    # ValueError for wrong types too, as vLLM's SamplingParams does.
    with pytest.raises(ValueError, match=f"^{field}"):
        SamplingParams(**kwargs)


def test_stop_strings_first_in_list_wins(llm):
    """As vLLM: when several stop strings occur in the new text, the first in the list wins."""
    from jaxvllm.engine.detokenizer import IncrementalDetokenizer
    tok = llm.get_tokenizer()
    ids = tok.encode(" Paris is", add_special_tokens=False)
    d = IncrementalDetokenizer(tok, SamplingParams(stop=["ar", " P"]), tok.encode("Hello"))
    assert d.update(ids, len(ids)) and d.stop_reason == "ar" and d.text == " P"


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_text_decoded_once_at_the_end_is_the_streams(llm, skip_special_tokens):
    """A FINAL_ONLY request without stop strings is decoded in one call when its text is read:
    the text the stream gives token by token, for random ids in random chunks (byte tokens that
    leave characters incomplete, at the end too, and special tokens)."""
    from jaxvllm.engine.detokenizer import IncrementalDetokenizer
    from jaxvllm.sampling_params import RequestOutputKind
    tok = llm.get_tokenizer()
    rng = np.random.default_rng(0)
    deferred = 0
    for _ in range(300):
        prompt = rng.integers(0, len(tok), 6).tolist()
        out = rng.integers(0, len(tok), int(rng.integers(1, 40))).tolist()
        out += rng.integers(0, 400, int(rng.integers(0, 4))).tolist()  # low ids: bytes, specials
        kw = dict(skip_special_tokens=skip_special_tokens)
        once = IncrementalDetokenizer(tok, SamplingParams(**kw, output_kind=RequestOutputKind.FINAL_ONLY),
                                      prompt)
        stream = IncrementalDetokenizer(tok, SamplingParams(**kw), prompt)
        deferred += once._deferred is not None
        i = 0
        while i < len(out):
            n = int(rng.integers(1, 4))
            for d in (once, stream):
                assert not d.update(out[i:i + n], i + n)
            i += n
        assert once.text == stream.text == once.output_text(True), (prompt, out)
    assert deferred > 250


def test_eos_is_masked_by_min_tokens_even_with_ignore_eos(llm):
    engine = llm.llm_engine
    parent = engine.prepare_request("eos-mask", "hi", SamplingParams(ignore_eos=True, min_tokens=2))
    assert engine.eos_token_id in parent.params.all_stop_token_ids  # masked below min_tokens
    out = llm.generate("hi", SamplingParams(temperature=0, ignore_eos=True, min_tokens=2, max_tokens=6),
                       use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 6 and out.finish_reason == "length"  # and it never stops


def test_sampling_params_vllm_meanings():
    assert SamplingParams(seed=-1).seed is None
    assert SamplingParams(top_k=-1).top_k == SamplingParams(top_k=0).top_k == 0
    assert SamplingParams(repetition_penalty=3.0).repetition_penalty == 3.0  # any value > 0
    assert SamplingParams(n=3).best_of == 3
    with pytest.raises(TypeError):
        SamplingParams(1, 0.7)  # keyword-only: positional order is not part of the API


def test_tokenizer_loaded_beside_compile_is_the_models(llm, tmp_path):
    """The engine loads the tokenizer on a thread while it compiles: same tokenizer as load_model's,
    and a tokenizer that cannot load still fails the engine's construction with the path named."""
    from converters import WeightLoadError, load_model
    ref = load_model(None, load_tokenizer=True, cache_dir=None).tokenizer
    assert llm.get_tokenizer().encode(PROMPTS[1]) == ref.encode(PROMPTS[1])
    assert llm.llm_engine.eos_token_id == ref.eos_token_id
    with pytest.raises(WeightLoadError, match=re.escape(str(tmp_path))):
        LLM(dtype="float32", max_model_len=64, num_gpu_blocks_override=16, enforce_eager=True,
            tokenizer=str(tmp_path))


def test_overlong_prompt_rejected_others_unharmed(llm):
    engine = llm.llm_engine
    engine.add_request("ok-1", PROMPTS[0], greedy(5))
    with pytest.raises(ValueError, match="max_model_len"):
        engine.add_request("too-long", list(range(10, 300)), greedy(5))
    engine.add_request("ok-2", PROMPTS[1], greedy(5))
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    assert set(done) == {"ok-1", "ok-2"}
    assert all(len(o.outputs[0].token_ids) == 5 for o in done.values())
    with pytest.raises(ValueError, match="max_logprobs"):
        llm.generate(PROMPTS[0], SamplingParams(logprobs=50), use_tqdm=False)


@pytest.mark.parametrize("call, error, match", [
    (lambda llm: llm.generate(5), TypeError, "prompts"),
    (lambda llm: llm.generate(None), TypeError, "prompts"),
    (lambda llm: llm.generate({"prompt_token_ids": 5}), TypeError, "prompt_token_ids"),
    (lambda llm: llm.generate(["hi"], [{"temperature": 0}]), TypeError, "sampling_params"),
    (lambda llm: llm.generate(["hi"], {"temperature": 0}), TypeError, "sampling_params"),
    (lambda llm: llm.generate("hi \ud800"), ValueError, "prompt is not valid Unicode"),
    (lambda llm: llm.generate("hi", greedy(3, stop_token_ids=[49152])), ValueError, "stop_token_ids"),
    (lambda llm: llm.score([""], ["Paris"]), ValueError, r"prompts\[0\] is empty"),
    (lambda llm: llm.score([[]], [[7042]]), ValueError, r"prompts\[0\] is empty"),
    (lambda llm: llm.score(["a"], [5]), TypeError, r"continuations\[0\]"),
    (lambda llm: llm.chat(None), TypeError, "messages"),
    (lambda llm: llm.chat([{"content": "hi"}]), ValueError, r"messages\[0\]\.role"),
    (lambda llm: llm.chat([{"role": "user"}]), ValueError, r"messages\[0\]\.content"),
    (lambda llm: llm.chat([{"role": "user", "content": 5}]), ValueError, r"messages\[0\]\.content"),
    (lambda llm: llm.chat([{"role": "wizard", "content": "hi"}]), ValueError, "role"),
    (lambda llm: llm.chat([[{"role": "user", "content": "a"}], [{"role": "user", "content": "\udfff"}]]),
     ValueError, r"messages\[1\]\[0\]\.content"),
], ids=lambda v: "" if callable(v) or isinstance(v, type) else v)
def test_bad_offline_input_named_engine_unharmed(llm, call, error, match):
    with pytest.raises(error, match=match):
        call(llm)
    assert not llm.llm_engine.has_unfinished_requests()
    assert len(llm.generate("The", greedy(2), use_tqdm=False)[0].outputs[0].token_ids) == 2


def test_per_request_counts_compile_no_new_sampler_variants(llm):
    """A request's logprobs k (one top-k width in the logprobs program, sliced on the host) and
    its count of stop ids under min_tokens (bucketed) reuse the compiled programs: new values
    compile neither a sampler nor a logprobs variant."""
    engine = llm.llm_engine
    sample, logprobs = engine.runner._sample, engine.runner._token_logprobs
    eos = engine.preparer.extra_eos_ids | {engine.eos_token_id}  # masked with the stop ids
    ids = [t for t in range(5, 20) if t not in eos]

    def run(**kw):
        return llm.generate(PROMPTS[0], greedy(3, **kw), use_tqdm=False)[0].outputs[0]

    run(logprobs=1)
    run(stop_token_ids=ids[:5 - len(eos)], min_tokens=2)  # 5 masked ids
    compiled = sample._cache_size(), logprobs._cache_size()
    out = run(logprobs=5)
    run(logprobs=2)
    run(stop_token_ids=ids[:8 - len(eos)], min_tokens=2)  # 8: the same power-of-two bucket
    assert (sample._cache_size(), logprobs._cache_size()) == compiled
    # each request still gets its own k: the chosen token plus its top 5 (which may include it)
    assert all(5 <= len(entry) <= 6 for entry in out.logprobs)
    assert all(list(entry)[0] == t for entry, t in zip(out.logprobs, out.token_ids))


def test_logprobs_run_only_for_batches_that_ask(llm, monkeypatch):
    """Logprobs are a program of their own after the sampler, launched for a step only where one
    of its requests asks for them (logprobs=0 too: the chosen token's logprob and rank)."""
    runner = llm.llm_engine.runner
    real, calls = runner._token_logprobs, []
    monkeypatch.setattr(runner, "_token_logprobs", lambda *a: calls.append(a) or real(*a))
    plain = llm.generate(PROMPTS[0], greedy(3), use_tqdm=False)[0].outputs[0]
    assert calls == [] and plain.logprobs is None
    out = llm.generate(PROMPTS[0], greedy(3, logprobs=0), use_tqdm=False)[0].outputs[0]
    assert len(calls) >= 3 and out.token_ids == plain.token_ids
    assert [list(entry) for entry in out.logprobs] == [[t] for t in out.token_ids]
    assert all(entry[t].rank == 1 for entry, t in zip(out.logprobs, out.token_ids))  # greedy


def test_failed_admission_leaves_no_orphans(llm, monkeypatch):
    """A batch whose second request fails to enter the scheduler aborts the first one: the next,
    unrelated call runs alone and returns its own result."""
    engine = llm.llm_engine
    admit, calls = engine.admit_request, []

    def flaky(parent):
        calls.append(parent.request_id)
        if len(calls) == 2:
            raise RuntimeError("admission failed")
        admit(parent)

    monkeypatch.setattr(engine, "admit_request", flaky)
    with pytest.raises(RuntimeError, match="admission failed"):
        llm.generate(PROMPTS[:3], greedy(3), use_tqdm=False)
    monkeypatch.undo()
    assert not engine.has_unfinished_requests() and engine.scheduler.stats.num_running == 0
    outs = llm.generate(PROMPTS[0], greedy(3), use_tqdm=False)
    assert len(outs) == 1 and len(outs[0].outputs[0].token_ids) == 3


def test_cache_smaller_than_max_model_len_refused_at_startup():
    with pytest.raises(ValueError, match=r"max_model_len \(256\) needs 16 KV-cache blocks.*only 7"):
        LLM(dtype="float32", max_model_len=256, num_gpu_blocks_override=8, enforce_eager=True,
            max_num_seqs=8, max_num_batched_tokens=8, token_buckets=(8,))


def test_max_tokens_past_max_model_len_is_capped_offline(llm):
    """As vLLM's offline API: generation stops at max_model_len with finish_reason "length"."""
    prompt = list(range(100, 340))  # 240 tokens; max_model_len 256
    outs = llm.generate([prompt, prompt], [greedy(100), SamplingParams(max_tokens=None, min_tokens=10 ** 6,
                                                                        temperature=0)], use_tqdm=False)
    for out in outs:
        comp = out.outputs[0]
        assert len(out.prompt_token_ids) + len(comp.token_ids) == 256 and comp.finish_reason == "length"


def test_kv_cache_donated_in_place(llm):
    runner = llm.llm_engine.runner
    t = runner.token_buckets[0]
    b = runner._dummy_batch(t)
    text = runner._step_for(t).lower(runner.params, runner.kv_cache,
                                     *runner._device_inputs(b)).compile().as_text()
    header = text.splitlines()[0]
    aliased = re.findall(r"\{(\d+)\}: \((\d+), \{[^}]*\}, may-alias\)", header)
    cache_leaves = 2 * runner.cfg.num_layers
    assert len(aliased) >= cache_leaves, header[:500]
    old = runner.kv_cache[0][0]
    llm.generate(PROMPTS[0], greedy(2), use_tqdm=False)
    assert old.is_deleted()  # the step consumed (donated) the buffer instead of copying it


def test_async_engine_streams_and_aborts(llm):
    engine = AsyncLLMEngine(llm.llm_engine)

    async def main():
        await engine.start()
        seen = []
        async for out in engine.generate(PROMPTS[0], greedy(6), "s1"):
            seen.append(len(out.outputs[0].token_ids))
        assert seen[-1] == 6 and seen == sorted(seen) and out.finished
        # abandon a stream after its first output: the request is aborted and blocks freed
        gen = engine.generate(PROMPTS[1], greedy(200), "s2")
        await gen.__anext__()
        await gen.aclose()
        for _ in range(100):
            await asyncio.sleep(0.05)
            if not llm.llm_engine.has_unfinished_requests():
                break
        assert not llm.llm_engine.has_unfinished_requests()
        with pytest.raises(ValueError):
            async for _ in engine.generate("", greedy(3), "s3"):
                pass
        # Values past int32 are refused or normalized before they reach the step thread.
        with pytest.raises(ValueError, match="stop_token_ids"):
            async for _ in engine.generate("hi", greedy(3, stop_token_ids=[2 ** 31], min_tokens=1), "s4"):
                pass
        async for out in engine.generate("hi", SamplingParams(top_k=2 ** 31, max_tokens=3), "s5"):
            pass
        assert out.finished and len(out.outputs[0].token_ids) == 3
        await engine.shutdown()

    asyncio.run(main())
    assert llm.llm_engine.scheduler.stats.num_running == 0


def test_async_engine_slow_consumer_gets_newest_output(llm):
    """Outputs are cumulative: a consumer slower than the steps receives the newest one (not a
    backlog of every step's copy), and still the finished output with every token. The consumer
    takes three steps' time per output, measured here: a fixed pause was shorter than a step on a
    loaded machine, and nothing was skipped."""
    t0 = time.perf_counter()
    expected = llm.generate(PROMPTS[2], greedy(24), use_tqdm=False)[0].outputs[0].token_ids
    pause = max(0.25, 3 * (time.perf_counter() - t0) / 24)
    engine = AsyncLLMEngine(llm.llm_engine)

    async def main():
        await engine.start()
        got = []
        async for out in engine.generate(PROMPTS[2], greedy(24), "slow"):
            got.append(out)
            await asyncio.sleep(pause)
        await engine.shutdown()
        return got

    got = asyncio.run(main())
    assert got[-1].finished and got[-1].outputs[0].token_ids == expected
    assert len(got) < 24  # steps were skipped, not queued
    lengths = [len(o.outputs[0].token_ids) for o in got]
    assert lengths == sorted(lengths)


def test_async_engine_shutdown_ends_running_streams(llm):
    engine = AsyncLLMEngine(llm.llm_engine)

    async def main():
        await engine.start()
        gen = engine.generate(PROMPTS[0], greedy(200), "cut")
        await gen.__anext__()
        await engine.shutdown()
        with pytest.raises(EngineDeadError, match="shut down"):
            await asyncio.wait_for(gen.__anext__(), 10)
        with pytest.raises(EngineDeadError):
            await engine.generate(PROMPTS[0], greedy(2), "after").__anext__()

    asyncio.run(main())
    assert not llm.llm_engine.has_unfinished_requests()


def test_async_scheduling_equals_sync(llm, scheduler_config):
    """Overlapped steps (next step dispatched before the previous one's samples reach the host)
    give exactly the synchronous results, also under preemption, seeded sampling, n > 1 and stops."""
    engine = llm.llm_engine
    params = [greedy(12), SamplingParams(temperature=0.9, top_k=20, seed=5, max_tokens=10),
              SamplingParams(n=2, temperature=1.0, seed=11, max_tokens=9, ignore_eos=True),
              greedy(16, stop=[" the"], min_tokens=2)]
    results = {}
    for mode in (False, True):
        engine.args.async_scheduling = mode
        try:
            for blocks in (96, 6):  # plenty, then preemption
                scheduler_config(num_blocks=blocks)
                outs = llm.generate(PROMPTS, params, use_tqdm=False)
                results[mode, blocks] = [[(c.token_ids, c.text, c.finish_reason) for c in o.outputs]
                                         for o in outs]
        finally:
            engine.args.async_scheduling = True
    assert results[True, 96] == results[False, 96]
    assert results[True, 6] == results[False, 6] == results[True, 96]
    assert not engine._inflight


def test_periodic_stats_log(llm, caplog, monkeypatch):
    from jaxvllm.engine import llm_engine
    monkeypatch.setattr(llm_engine._StatsLogger, "INTERVAL_S", 0.0)
    with caplog.at_level("INFO", logger="jaxvllm.engine.llm_engine"):
        llm.generate(PROMPTS[0], greedy(3), use_tqdm=False)
    lines = [r.getMessage() for r in caplog.records if "generation throughput" in r.getMessage()]
    assert lines and "KV cache usage" in lines[-1]
    assert any(not l.startswith("prompt throughput 0.0") for l in lines)  # the prefill was counted
    llm.llm_engine.args.disable_log_stats = True
    try:
        caplog.clear()
        with caplog.at_level("INFO", logger="jaxvllm.engine.llm_engine"):
            llm.generate(PROMPTS[0], greedy(3), use_tqdm=False)
        assert not [r for r in caplog.records if "generation throughput" in r.getMessage()]
    finally:
        llm.llm_engine.args.disable_log_stats = False


def test_priority_scheduling_policy(llm, scheduler_config):
    """With the priority policy and room for one request at a time, the lower value runs first."""
    sched = scheduler_config(policy="priority", max_num_seqs=1)
    engine = llm.llm_engine
    engine.add_request("late-low", PROMPTS[0], greedy(3, priority=5))
    engine.add_request("urgent", PROMPTS[1], greedy(3, priority=-1))
    order = []
    while engine.has_unfinished_requests():
        order += [o.request_id for o in engine.step() if o.finished]
    assert order == ["urgent", "late-low"]
    assert sched.config.policy == "priority"
    with pytest.raises(ValueError, match="scheduling_policy"):
        from jaxvllm.config import EngineArgs
        EngineArgs(scheduling_policy="lifo")


def test_small_buckets_use_triton_gemms_unless_the_user_chose(llm, monkeypatch):
    from jaxvllm.config import EngineArgs
    from jaxvllm.engine import setup
    runner = llm.llm_engine.runner
    if runner.config.triton_gemm_max_tokens:  # the engine chose the GEMMs (no XLA_FLAGS setting)
        assert runner.config.triton_gemm_max_tokens == setup.TRITON_GEMM_MAX_TOKENS
        assert runner._step_for(runner.token_buckets[0]) is runner._step_triton_gemm
    assert runner._step_for(runner.token_buckets[-1]) is runner._step
    args = EngineArgs(model="unused", compilation_cache_dir="none")
    for user_flags, chose in (("--xla_gpu_enable_triton_gemm=true", False), ("", True)):
        monkeypatch.setenv("XLA_FLAGS", user_flags)
        monkeypatch.setattr(setup, "_ENGINE_CHOSE_GEMMS", False)
        setup.configure_jax(args)
        assert setup._ENGINE_CHOSE_GEMMS is chose


@pytest.mark.parametrize("user_flags, chose", [("", True),
                                               ("--xla_gpu_enable_triton_gemm=true", False)])
def test_a_replica_process_sees_the_flags_the_user_chose(monkeypatch, user_flags, chose):
    """A data-parallel replica (or the engine process behind a server) inherits the XLA_FLAGS its
    front's configure_jax set; its own configure_jax must still tell the user's from the engine's,
    or the engine's GEMM choice would pass for the user's and the small buckets lose their Triton
    GEMMs."""
    from jaxvllm.config import EngineArgs
    from jaxvllm.engine import setup
    monkeypatch.setenv("XLA_FLAGS", user_flags)
    for var in (setup._SET_XLA_FLAGS, setup._USER_XLA_FLAGS):
        monkeypatch.delenv(var, raising=False)
    args = EngineArgs(model="unused", compilation_cache_dir="none")
    for process in ("front", "replica"):  # the replica starts from the front's environment
        monkeypatch.setattr(setup, "_ENGINE_CHOSE_GEMMS", False)
        setup.configure_jax(args)
        assert setup._ENGINE_CHOSE_GEMMS is chose, process
        flags = os.environ["XLA_FLAGS"].split()
        assert len(flags) == len(set(flags)) and flags[:len(user_flags.split())] == user_flags.split()


@pytest.mark.parametrize("given, user_flags, weights, off", [
    (dict(), "", 4096, False),
    (dict(speculative_config={"method": "ngram", "num_speculative_tokens": 2}), "", 4096, True),
    (dict(async_scheduling=False), "", 4096, True),
    (dict(async_scheduling=False), "", 4095, False),
    (dict(async_scheduling=False, tensor_parallel_size=2), "", 4096, False),
    (dict(async_scheduling=False), "--xla_gpu_enable_command_buffer=FUSION", 4096, False),
])
def test_synchronous_engines_with_big_weights_step_without_command_buffers(
        monkeypatch, given, user_flags, weights, off):
    """An engine whose steps are launched onto an idle device (speculative verification, no async
    scheduling) compiles them without XLA's command buffers when a device reads at least
    COMMAND_BUFFERS_OFF_MIN_BYTES of weights a step (here 4096), unless the user's XLA_FLAGS
    decide them; XLA_FLAGS themselves are left as the user set them."""
    from jaxvllm.config import EngineArgs
    from jaxvllm.engine import setup
    monkeypatch.setenv("XLA_FLAGS", user_flags)
    for var in (setup._SET_XLA_FLAGS, setup._USER_XLA_FLAGS):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(setup, "_ENGINE_CHOSE_GEMMS", False)
    monkeypatch.setattr(setup, "COMMAND_BUFFERS_OFF_MIN_BYTES", 4096)
    args = EngineArgs(model="unused", compilation_cache_dir="none", **given)
    setup.configure_jax(args)
    assert "command_buffer=" not in os.environ["XLA_FLAGS"].replace(user_flags, "")
    params = {"a": np.zeros(weights // 2 - 1, np.uint8), "b": {"c": np.zeros(weights // 2 + 1, np.uint8)}}
    assert setup.step_command_buffers(args, params) is not off


def test_a_synchronous_engine_compiles_its_steps_without_command_buffers(monkeypatch, llm):
    """End to end: the setting reaches the runner's step programs, and the engine decodes as one
    with them."""
    from jaxvllm.engine import setup
    monkeypatch.setattr(setup, "COMMAND_BUFFERS_OFF_MIN_BYTES", 0)
    sync = LLM(dtype="float32", max_model_len=256, max_num_seqs=8, max_num_batched_tokens=64,
               num_gpu_blocks_override=96, enforce_eager=True, token_buckets=(8, 16, 32, 64),
               async_scheduling=False)
    runner = sync.llm_engine.runner
    assert runner.config.command_buffers is False
    assert runner.step_compiler_options == {"xla_gpu_enable_command_buffer": ""}
    assert llm.llm_engine.runner.step_compiler_options == {}
    params = SamplingParams(temperature=0, max_tokens=8)
    assert ([o.outputs[0].token_ids for o in sync.generate(PROMPTS[:2], params)]
            == [o.outputs[0].token_ids for o in llm.generate(PROMPTS[:2], params)])


def _drain(engine, prompts, params):
    for i, (p, sp) in enumerate(zip(prompts, params)):
        engine.add_request(f"k{i}", p, sp)
    outs: dict[str, list] = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            outs.setdefault(o.request_id, []).append(o)
    return outs


def test_output_kinds_delta_and_final_only_add_up_to_cumulative(llm):
    """DELTA outputs hold only what is new (text, tokens, logprobs, prompt logprobs) and add up to
    the cumulative outputs' last one; FINAL_ONLY gives that one alone. n=2, a stop string (its text
    is held back until it can be ruled out) and logprobs."""
    from jaxvllm.sampling_params import RequestOutputKind
    engine = llm.llm_engine
    prompts = ["The capital of France is", "Count: one, two, three,"]
    base = [SamplingParams(temperature=0.8, seed=3, n=2, max_tokens=20, logprobs=2,
                           prompt_logprobs=1, stop=[" Paris"]),
            SamplingParams(temperature=0.0, max_tokens=16, stop=[" six"], logprobs=0)]
    runs = {kind: _drain(engine, prompts, [dataclasses.replace(sp, output_kind=kind) for sp in base])
            for kind in RequestOutputKind}
    cumulative = runs[RequestOutputKind.CUMULATIVE]
    for rid, outs in runs[RequestOutputKind.DELTA].items():
        full = cumulative[rid][-1]
        assert len(outs) > 1 and outs[-1].finished and not any(o.finished for o in outs[:-1])
        merged = outs[0]
        for o in outs[1:]:
            assert o.prompt_logprobs in (None, [])           # sent with the first output only
            assert all(len(c.token_ids) <= 1 for c in o.outputs)  # one step's token
            merged.add(o)
        assert merged.prompt_logprobs == full.prompt_logprobs
        for m, f in zip(merged.outputs, full.outputs):
            assert (m.text, m.token_ids, m.logprobs, m.finish_reason, m.stop_reason) == \
                (f.text, f.token_ids, f.logprobs, f.finish_reason, f.stop_reason)
            assert m.cumulative_logprob == pytest.approx(f.cumulative_logprob)
    for rid, outs in runs[RequestOutputKind.FINAL_ONLY].items():
        assert len(outs) == 1 and outs[0].finished
        assert [c.text for c in outs[0].outputs] == [c.text for c in cumulative[rid][-1].outputs]


def test_a_slow_delta_consumer_gets_the_deltas_merged(llm):
    """AsyncLLMEngine: a stream consumer that falls behind receives fewer, merged DELTA outputs
    whose concatenation is the whole completion."""
    from jaxvllm.sampling_params import RequestOutputKind

    async def run():
        aengine = AsyncLLMEngine(llm.llm_engine)
        sp = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True,
                            output_kind=RequestOutputKind.DELTA)
        got = []
        async for out in aengine.generate("Once upon a time", sp, "slow"):
            if not got:  # several steps pass before the next read (>= 3 at a slow 1 s a step)
                await asyncio.sleep(3.0)
            got.append(out)
        await aengine.shutdown()
        return got

    got = asyncio.run(run())
    full = llm.generate(["Once upon a time"], greedy(24))[0].outputs[0]
    assert len(got) < 24 and got[-1].finished
    assert "".join(o.outputs[0].text for o in got) == full.text
    assert sum((o.outputs[0].token_ids for o in got), []) == full.token_ids


def test_steps_are_launched_off_the_engine_thread(llm, monkeypatch):
    """The step's programs are enqueued on the runner's launch thread (so the engine's host work
    overlaps the launch), with the GIL switch interval lowered so that thread is not kept waiting."""
    import sys
    import threading

    from jaxvllm.worker.model_runner import LAUNCH_SWITCH_INTERVAL_S
    runner = llm.llm_engine.runner
    real, threads = runner._sample, set()

    def sample(*args, **kw):
        threads.add(threading.current_thread().name)
        return real(*args, **kw)

    monkeypatch.setattr(runner, "_sample", sample)
    llm.generate(["Hello"], greedy(4))
    assert threads == {"jaxvllm-launch"}
    assert sys.getswitchinterval() <= LAUNCH_SWITCH_INTERVAL_S
