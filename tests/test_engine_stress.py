"""Randomized engine stress test on a tiny random Llama (float32, CPU): requests arrive and are
aborted between steps while async scheduling overlaps the steps, under a KV cache small enough to
preempt, with prefix sharing, n > 1, seeded and unseeded sampling, greedy, min_tokens, stop ids,
ignore_eos, logprobs, prompt logprobs and penalties (their token-table rows written at admission and
again after preemption, updated on the device); ids of ended requests are used again, also while the old request's last step is
still on the device.

Checked: the stream of outputs (cumulative, monotone, nothing after finish or abort), each finished
request's finish reason and token count, that the engine, scheduler, KV cache and runner end empty,
and that greedy and seeded requests give exactly what they give alone with synchronous steps."""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import pytest

from jaxvllm import LLM, SamplingParams

VOCAB = 256
MAX_MODEL_LEN = 128
EOS = 2  # LlamaConfig's default eos_token_id, written to generation_config.json
NUM_BLOCKS = 14


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    from hf_builders import tiny_config, tiny_model
    # larger weights: peaked, position-dependent logits (greedy not stuck)
    model = tiny_model(tiny_config(vocab_size=VOCAB), matrix_scale=5.0)
    path = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(path)
    return LLM(model=str(path), dtype="float32", max_model_len=MAX_MODEL_LEN, max_num_seqs=6,
               max_num_batched_tokens=32, num_gpu_blocks_override=NUM_BLOCKS, enforce_eager=True,
               token_buckets=(8, 16, 32), disable_log_stats=True)


@dataclass
class Tracked:
    rid: str
    prompt: list[int]
    params: SamplingParams
    stops: set[int]                      # ids that end it (after min_tokens)
    tokens: list[list[int]] = field(default_factory=list)   # per child, latest output
    reasons: list[Optional[str]] = field(default_factory=list)
    finished: bool = False
    aborted: bool = False
    reused_inflight: bool = False        # its id's previous request was in the step in flight

    @property
    def exact(self) -> bool:
        """Reproducible alone: greedy or seeded."""
        return self.params.temperature == 0.0 or self.params.seed is not None


def _make_prompt(rng: random.Random, prefixes: list[list[int]]) -> list[int]:
    if rng.random() < 0.5:
        base = rng.choice(prefixes)
        cut = rng.randint(1, len(base))
        prompt = base[:cut] + [rng.randrange(VOCAB) for _ in range(rng.randint(0, 12))]
    else:
        prompt = [rng.randrange(VOCAB) for _ in range(rng.randint(1, 60))]
    return prompt


def _make_params(rng: random.Random, prompt_len: int, penalize: bool,
                 favorites: list[int]) -> SamplingParams:
    max_tokens = rng.randint(1, min(40, MAX_MODEL_LEN - prompt_len))
    kw: dict = {"max_tokens": max_tokens}
    kind = rng.random()
    if kind < 0.35:
        kw["temperature"] = 0.0
    else:
        kw["temperature"] = rng.choice([0.7, 1.0, 1.3])
        if rng.random() < 0.7:
            kw["seed"] = rng.randrange(1 << 40)
        if rng.random() < 0.3:
            kw["top_k"] = 20  # one static top-k bound: few sampler variants to compile
        if rng.random() < 0.4:
            kw["n"] = rng.randint(2, 3)
    if rng.random() < 0.5:
        kw["ignore_eos"] = True
    if rng.random() < 0.5:
        # Always eight ids (one array width: few sampler variants), some of them tokens the model
        # often produces, so that stops are common.
        ids = rng.sample(favorites, rng.randint(0, 3))
        kw["stop_token_ids"] = ids + rng.sample([i for i in range(3, VOCAB) if i not in ids], 8 - len(ids))
    if rng.random() < 0.4:
        kw["min_tokens"] = rng.randint(0, max_tokens)
    if rng.random() < 0.1:
        kw["logprobs"] = 1
    if rng.random() < 0.06:
        kw["prompt_logprobs"] = 1  # scored prompt chunks (no prefix hits), also after preemption
    if penalize:
        kw.update(presence_penalty=0.5, repetition_penalty=1.3)
    return SamplingParams(**kw)


@pytest.fixture(scope="module")
def favorites(llm) -> list[int]:
    """The tokens the model samples most often (stop ids drawn from them end requests early)."""
    rng = random.Random(1234)
    prompts = [{"prompt_token_ids": [rng.randrange(VOCAB) for _ in range(8)]} for _ in range(6)]
    outs = llm.generate(prompts, SamplingParams(temperature=1.0, seed=rng.randrange(1 << 30),
                                                max_tokens=24, ignore_eos=True), use_tqdm=False)
    counts = np.bincount([t for o in outs for t in o.outputs[0].token_ids], minlength=VOCAB)
    counts[:3] = 0
    return [int(i) for i in np.argsort(-counts, kind="stable")[:12]]


def _stop_set(params: SamplingParams) -> set[int]:
    s = set(params.stop_token_ids or ())
    if not params.ignore_eos:
        s.add(EOS)
    return s


def _check_child(t: Tracked, toks: list[int], reason: Optional[str]) -> None:
    p = t.params
    assert len(toks) <= p.max_tokens, (t.rid, toks)
    assert all(0 <= x < VOCAB for x in toks)
    # Stop ids are masked before min_tokens and end the request after: none before the last token.
    assert not any(x in t.stops for x in toks[:-1]), (t.rid, toks, t.stops)
    if toks and toks[-1] in t.stops:
        assert len(toks) >= p.min_tokens, (t.rid, toks)
    if reason == "length":
        assert len(toks) == p.max_tokens, (t.rid, toks)
        assert toks[-1] not in t.stops
    elif reason == "stop":
        assert toks and toks[-1] in t.stops and len(toks) >= max(1, p.min_tokens), (t.rid, toks)
    else:
        assert reason is None, (t.rid, reason)


def _observe(tracked: dict[str, Tracked], outs) -> None:
    # (A step that turns synchronous collects two steps' samples: a request may appear twice.)
    for out in outs:
        rid = out.request_id
        assert rid in tracked, f"output for {rid}, which had finished or been aborted"
        t = tracked[rid]
        assert not t.aborted, f"output for aborted request {rid}"
        assert not t.finished, f"output for {rid} after it finished"
        assert out.prompt_token_ids == t.prompt
        assert len(out.outputs) == t.params.n
        for c in out.outputs:
            old, old_reason = t.tokens[c.index], t.reasons[c.index]
            assert c.token_ids[:len(old)] == old, f"{rid}[{c.index}]: output not cumulative"
            if old_reason is not None:
                assert c.token_ids == old and c.finish_reason == old_reason, \
                    f"{rid}[{c.index}] changed after finishing"
            _check_child(t, c.token_ids, c.finish_reason)
            t.tokens[c.index], t.reasons[c.index] = list(c.token_ids), c.finish_reason
            if t.params.logprobs is not None:
                assert len(c.logprobs) == len(c.token_ids)
                assert all(tok in lp for tok, lp in zip(c.token_ids, c.logprobs))
        assert out.finished == all(r is not None for r in t.reasons)
        t.finished = out.finished
        if t.params.prompt_logprobs is not None:
            plp = out.prompt_logprobs
            assert plp[0] is None and len(plp) <= len(t.prompt)
            assert all(tok in lp for tok, lp in zip(t.prompt[1:], plp[1:])), rid
            if out.finished:
                assert len(plp) == len(t.prompt), (rid, len(plp), len(t.prompt))


def _inflight_parents(engine) -> list[str]:
    if not engine._inflight:
        return []
    so = engine._inflight[-1][0]
    return sorted({engine._child_to_parent[cid][0].request_id
                   for cid in so.num_scheduled_tokens if cid in engine._child_to_parent})


def _run_alone(engine, rid: str, prompt: list[int], params: SamplingParams):
    engine.add_request(rid, {"prompt_token_ids": prompt}, params)
    final = None
    for _ in range(10_000):
        for out in engine.step():
            if out.finished:
                final = out
        if not engine.has_unfinished_requests():
            break
    assert final is not None
    return [(c.token_ids, c.finish_reason) for c in final.outputs]


def _assert_engine_idle(engine) -> None:
    assert not engine.has_unfinished_requests()
    engine.step()  # lets the runner drop the states of requests that finished in the last step
    sched = engine.scheduler
    assert not engine._inflight
    assert not sched._finished_req_ids
    assert not sched.has_unfinished_requests() and not sched.running and len(sched.waiting) == 0
    sched.check_invariants()
    kv = sched.kv_cache_manager
    assert kv.num_free_blocks == kv.num_blocks - 1
    assert not kv.req_to_blocks
    assert not engine._parents and not engine._child_to_parent
    ib = engine.runner.input_batch
    assert not ib.requests, sorted(ib.requests)
    assert ib.token_table.num_free == ib.token_table.num_slots  # every penalty row given back


@pytest.mark.parametrize("seed", range(4))
def test_engine_stress(llm, favorites, seed):
    engine = llm.llm_engine
    try:
        _stress(engine, seed, favorites)
    finally:  # leave the shared engine usable for the next seed, even after a failure
        engine.args.async_scheduling = True
        engine.abort_request(list(engine._parents))
        engine.step()


def _stress(engine, seed: int, favorites: list[int]) -> None:
    assert engine.args.async_scheduling
    assert engine.scheduler.kv_cache_manager.num_blocks == NUM_BLOCKS
    rng = random.Random(seed)
    prefixes = [[rng.randrange(VOCAB) for _ in range(rng.randint(20, 50))] for _ in range(3)]
    tracked: dict[str, Tracked] = {}
    alive: list[str] = []
    reusable: list[str] = []   # ids of finished or aborted requests: may be used again
    num_requests = 150
    added = aborted_inflight = reused_inflight = 0
    child_ids: dict[str, set[str]] = {}  # request id -> the engine's internal ids of its samples
    preemptions0 = engine.scheduler.num_preemptions
    hits0 = engine.scheduler.kv_cache_manager.prefix_cache_hits

    def hot_ids() -> list[str]:
        if not engine._inflight:
            return []
        scheduled = set(engine._inflight[-1][0].num_scheduled_tokens)
        return [r for r in reusable if scheduled & child_ids[r]]

    def add(reuse: bool) -> str:
        nonlocal added, reused_inflight
        prompt = _make_prompt(rng, prefixes)
        params = _make_params(rng, len(prompt), rng.random() < 0.25, favorites)
        # Ids of ended requests may be used again, above all ("reuse") while the step still on the
        # device holds the old request (its late sample must not reach the new one). Such requests
        # are made reproducible and never aborted, so that the exactness check sees them.
        hot = hot_ids()
        hot_reuse = reuse and bool(hot)
        if hot_reuse:
            rid = rng.choice(hot)
            reusable.remove(rid)
            reused_inflight += 1
            if params.temperature > 0 and params.seed is None:
                params.seed = rng.randrange(1 << 40)
        elif reusable and rng.random() < 0.05:
            rid = reusable.pop(rng.randrange(len(reusable)))
        else:
            rid = f"s{seed}-{added}"
        added += 1
        engine.add_request(rid, {"prompt_token_ids": prompt}, params)
        child_ids[rid] = {c.request_id for c in engine._parents[rid].children}
        tracked[rid] = Tracked(rid, prompt, params, _stop_set(params),
                               [[] for _ in range(params.n)], [None] * params.n,
                               reused_inflight=hot_reuse)
        alive.append(rid)
        return rid

    def abort(rid: str) -> None:
        engine.abort_request(rid)
        tracked[rid].aborted = True
        end(rid)

    def end(rid: str) -> None:
        alive.remove(rid)
        reusable.append(rid)
        history.append(tracked.pop(rid))

    history: list[Tracked] = []
    for step in range(5000):
        # Between two steps: arrivals and aborts in random order.
        # Arrivals in bursts, while the queue is not too long (so that they go on all along).
        burst = rng.choice([0, 0, 0, 1, 1, 2, 4]) if len(alive) < rng.randint(3, 14) else 0
        actions = ["add"] * burst
        if rng.random() < 0.08:
            actions.append("abort")
        if rng.random() < 0.5:
            actions.append("reuse")
        rng.shuffle(actions)
        for action in actions:
            if (action == "add" and added < num_requests) or (action == "reuse" and hot_ids()):
                rid = add(action == "reuse")
                if not tracked[rid].reused_inflight and rng.random() < 0.04:
                    abort(rid)  # aborted right after being added
            elif action == "abort" and alive:
                others = [r for r in alive if not tracked[r].reused_inflight]
                inflight = [r for r in _inflight_parents(engine) if r in others]
                if inflight and rng.random() < 0.7:
                    abort(rng.choice(inflight))
                    aborted_inflight += 1
                elif others:
                    abort(rng.choice(others))
        if rng.random() < 0.05:
            engine.scheduler.check_invariants()
        _observe(tracked, engine.step())
        for rid in [r for r in alive if tracked[r].finished]:
            end(rid)
        if added >= num_requests and not alive:
            break
    assert not alive and not tracked, f"requests that never finished: {alive}"
    _assert_engine_idle(engine)
    assert engine.scheduler.num_preemptions > preemptions0, "the cache never ran short"
    assert engine.scheduler.kv_cache_manager.prefix_cache_hits > hits0, "no prefix was shared"
    assert aborted_inflight > 0 and reused_inflight > 0
    reused = [t for t in history if t.reused_inflight]
    assert reused and all(t.exact and not t.aborted for t in reused)

    # Every finished request: the right reason, and (greedy or seeded) the tokens it gets alone
    # with synchronous steps.
    done = [t for t in history if not t.aborted]
    reasons = {r for t in done for r in t.reasons}
    assert reasons <= {"stop", "length"} and reasons == {"stop", "length"}, reasons
    assert any(t.params.n > 1 for t in done) and any(t.params.has_penalties for t in history)
    engine.args.async_scheduling = False
    try:
        for i, t in enumerate(t for t in done if t.exact):
            alone = _run_alone(engine, f"alone-{seed}-{i}", t.prompt, t.params)
            assert alone == list(zip(t.tokens, t.reasons)), (t.rid, t.params)
    finally:
        engine.args.async_scheduling = True
    _assert_engine_idle(engine)
