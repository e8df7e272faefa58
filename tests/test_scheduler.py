"""Scheduler tests, driven by a fake model runner that simulates the paged KV cache.

Every cache slot the fake runner writes holds a digest of (cache salt, all tokens up to and including
that position). Before "attention" it checks that every position a request reads through its block
table holds exactly its own digest, so a wrong prefix-cache hit, a block freed while still in use, a
block owned twice, or a hit on K/V that is never computed is caught where it happens. With `guess`
it also makes speculative guesses, right and wrong: the K/V of a rejected guess is a digest of the
wrong token, so a step that reads it without computing it again fails the same check. With the
config's `num_lookahead_tokens` it writes junk where a draft model writes its guesses' K/V, in the
slots after a sampling step's tokens: they must be the request's own, allocated ahead.
"""
from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxvllm.core.outputs import ModelRunnerOutput, SchedulerOutput
from jaxvllm.core.request import Request, RequestStatus
from jaxvllm.core.scheduler import Scheduler, SchedulerConfig
from jaxvllm.sampling_params import SamplingParams

EOS = 2


def make_req(rid, prompt, max_tokens=8, salt=None, arrival=None, **kw):
    sp = SamplingParams(max_tokens=max_tokens, **kw)
    return Request(rid, prompt, sp, eos_token_id=EOS, arrival_time=arrival, cache_salt=salt)


class _State:
    __slots__ = ("tokens", "num_prompt", "blocks", "computed", "digests", "salt", "plp")

    def __init__(self, tokens, num_prompt, blocks, computed, salt, plp):
        self.tokens, self.num_prompt, self.blocks = tokens, num_prompt, blocks
        self.computed, self.salt, self.plp = computed, salt, plp
        self.digests: list[int] = []

    def digest(self, p):
        d = self.digests
        while len(d) <= p:
            prev = d[-1] if d else hash(("salt", self.salt))
            d.append(hash((prev, self.tokens[len(d)])))
        return d[p]

    def digests_with(self, guesses, end):
        """Digests of positions [0, end) of the known tokens followed by `guesses`."""
        known = min(end, len(self.tokens))
        out = [self.digest(p) for p in range(known)]
        for g in guesses[:end - known]:
            out.append(hash((out[-1] if out else hash(("salt", self.salt)), g)))
        return out


class FakeRunner:
    """Keeps its own per-request state from SchedulerOutput deltas (as the real runner does),
    writes/reads a simulated KV cache, samples from per-request plans (or a seeded RNG)."""

    def __init__(self, sched: Scheduler, plans=None, seed=0, vocab=40, check_prob=1.0,
                 guess=False):
        self.sched = sched
        self.bs = sched.config.block_size
        self.cache: dict[int, int] = {}
        self.states: dict[str, _State] = {}
        self.plans = plans if plans is not None else {}
        self.rng = random.Random(seed)
        self.vocab = vocab
        self.check_prob = check_prob
        self.guess = guess
        self.steps = 0

    def execute(self, so: SchedulerOutput) -> ModelRunnerOutput:
        self.steps += 1
        bs = self.bs
        assert not (so.finished_req_ids & set(so.num_scheduled_tokens))
        for rid in so.finished_req_ids | so.preempted_req_ids:
            self.states.pop(rid, None)
        for nr in so.new_reqs:
            assert nr.req_id not in self.states, f"{nr.req_id} sent as new twice"
            assert nr.num_computed_tokens % bs == 0
            req = self.sched.requests[nr.req_id]
            self.states[nr.req_id] = _State(
                list(nr.prompt_token_ids) + list(nr.output_token_ids), len(nr.prompt_token_ids),
                list(nr.block_ids), nr.num_computed_tokens, req.cache_salt,
                nr.sampling_params.prompt_logprobs is not None)
        for cr in so.cached_reqs:
            s = self.states[cr.req_id]
            assert s.computed == cr.num_computed_tokens, (cr, s.computed)
            s.blocks.extend(cr.new_block_ids)
        assert list(so.num_scheduled_tokens)[:len(so.cached_reqs)] == [c.req_id for c in so.cached_reqs]
        new_ids = {nr.req_id for nr in so.new_reqs}
        drafts = so.scheduled_spec_decode_tokens
        assert self.guess or not drafts
        # 1) write the K/V of every scheduled token (guesses: of the guessed tokens)
        for rid, n in so.num_scheduled_tokens.items():
            s = self.states[rid]
            assert n >= 1
            guesses = drafts.get(rid, [])
            start, end = s.computed, s.computed + n
            assert end <= len(s.tokens) + len(guesses), (rid, start, n, len(s.tokens))
            assert not guesses or end - len(guesses) == len(s.tokens)  # only after the last token
            assert len(s.blocks) * bs >= end, f"{rid}: {len(s.blocks)} blocks for {end} tokens"
            # (Blocks for guesses rejected earlier stay: up to 4 guesses a step, and a draft's.)
            ahead = self.sched.config.num_lookahead_tokens
            assert len(s.blocks) <= -(-(len(s.tokens) + 4 * self.guess + ahead) // bs), \
                f"{rid} holds more blocks than needed"
            assert 0 not in s.blocks
            digests = s.digests_with(guesses, end)
            for p in range(start, end):
                self.cache[s.blocks[p // bs] * bs + p % bs] = digests[p]
        # 2) "attention": every position read must hold this request's own K/V
        for rid, n in so.num_scheduled_tokens.items():
            s = self.states[rid]
            end = s.computed + n
            if rid in new_ids or self.rng.random() < self.check_prob:
                digests = s.digests_with(drafts.get(rid, []), end)
                for p in range(end):
                    slot = s.blocks[p // bs] * bs + p % bs
                    assert self.cache.get(slot) == digests[p], f"{rid}: bad K/V at position {p}"
        # 3) sample: the guesses the plan agrees with, then the plan's next token
        sampled, plps, lps, proposals = {}, {}, {}, {}
        for rid, n in so.num_scheduled_tokens.items():
            s = self.states[rid]
            guesses = drafts.get(rid, [])
            start, end = s.computed, s.computed + n
            s.computed = end
            if s.plp and start < s.num_prompt - 1:
                plps[rid] = list(range(start, min(end, s.num_prompt - 1)))
            if end - len(guesses) == len(s.tokens):
                k = len(s.tokens) - s.num_prompt
                plan = self.plans.get(rid)
                toks = []
                for g in guesses:
                    if g != plan[k + len(toks)]:
                        break
                    toks.append(g)
                toks.append(plan[k + len(toks)] if plan is not None
                            else self.rng.randrange(3, self.vocab))
                s.computed -= len(guesses) + 1 - len(toks)
                lps[rid] = [("lp", rid, len(s.tokens) + j + 1) for j in range(len(toks))]
                s.tokens.extend(toks)
                sampled[rid] = toks
                self._draft_writes(rid, s)
                if self.guess and plan is not None and self.rng.random() < 0.7:
                    # Up to 4 guesses, the plan's next tokens with one of them often wrong.
                    nxt = list(plan[k + len(toks):k + len(toks) + self.rng.randrange(1, 5)])
                    if nxt and self.rng.random() < 0.5:
                        nxt[self.rng.randrange(len(nxt))] = 1  # no plan holds token 1
                    if nxt:
                        proposals[rid] = nxt
        return ModelRunnerOutput(sampled_token_ids=sampled, logprobs=lps, prompt_logprobs=plps,
                                 spec_token_ids=proposals)

    def _draft_writes(self, rid, s):
        """A draft model's K/V of the new token and its guesses after it, up to max_model_len
        (junk: a later step computes what it keeps)."""
        bs, cfg = self.bs, self.sched.config
        end = min(s.computed + cfg.num_lookahead_tokens, cfg.max_model_len)
        assert len(s.blocks) * bs >= end, f"{rid}: {len(s.blocks)} blocks, guesses up to {end}"
        for p in range(s.computed, end):
            self.cache[s.blocks[p // bs] * bs + p % bs] = ("draft", rid, p)


def expected_output(req: Request, plan, max_model_len):
    sp = req.sampling_params
    stops = set(sp.stop_token_ids) | (set() if sp.ignore_eos else {EOS})
    out = []
    for tok in plan:
        out.append(tok)
        if len(out) >= sp.min_tokens and tok in stops:
            return out, "stop", (None if (tok == EOS and not sp.ignore_eos) else tok)
        if len(out) >= req.max_tokens or req.num_prompt_tokens + len(out) >= max_model_len:
            return out, "length", None
    raise AssertionError("plan too short")


class Driver:
    """Runs the scheduler with the fake runner, checking invariants and budgets every step."""

    def __init__(self, cfg: SchedulerConfig, seed=0, check_prob=1.0, guess=False):
        self.cfg = cfg
        self.sched = Scheduler(cfg)
        self.plans: dict[str, list[int]] = {}
        self.runner = FakeRunner(self.sched, self.plans, seed=seed, check_prob=check_prob,
                                 guess=guess)
        self.rng = random.Random(seed + 1)
        self.outputs: dict[str, list[int]] = {}
        self.finish: dict[str, tuple] = {}
        self.logprobs: dict[str, list] = {}
        self.prompt_lps: dict[str, list[int]] = {}
        self.cached: dict[str, int] = {}
        self.reqs: dict[str, Request] = {}
        self.aborted: set[str] = set()
        self.must_report: set[str] = set()
        self.history: list[SchedulerOutput] = []
        self.steps_with_preemption = 0

    def add(self, req: Request, plan=None) -> bool:
        try:
            self.sched.add_request(req)
        except ValueError:
            return False
        if plan is None:
            plan = [self.rng.randrange(3, 40) for _ in range(req.max_tokens)]
        self.plans[req.request_id] = plan
        self.reqs[req.request_id] = req
        self.outputs[req.request_id] = []
        return True

    def abort(self, rid, status=RequestStatus.FINISHED_ABORTED):
        done = self.sched.finish_requests([rid], status)
        if done:
            self.aborted.add(rid)
            self.must_report.add(rid)
        self.sched.check_invariants()

    def step(self):
        sched, cfg = self.sched, self.cfg
        decodes_before = [r.request_id for r in sched.running
                          if r.num_tokens - r.num_computed_tokens == 1]
        so = sched.schedule()
        self.history.append(so)
        sched.check_invariants(so)
        assert self.must_report <= so.finished_req_ids, self.must_report - so.finished_req_ids
        self.must_report = set()
        ns = so.num_scheduled_tokens
        assert so.total_num_scheduled_tokens == sum(ns.values()) <= cfg.max_num_batched_tokens
        assert len(ns) <= cfg.max_num_seqs
        assert all(sched.requests[r].status == RequestStatus.RUNNING for r in ns)
        if so.preempted_req_ids:
            self.steps_with_preemption += 1
            assert not so.new_reqs
            assert not (so.preempted_req_ids & set(ns))
        elif cfg.max_num_batched_tokens >= cfg.max_num_seqs:
            # Decodes are never starved (by prefills or anything else).
            missing = [r for r in decodes_before if r not in ns]
            assert not missing, missing
        ro = self.runner.execute(so)
        outs = sched.update_from_output(so, ro)
        sched.check_invariants()
        for o in outs:
            rid = o.req_id
            assert rid not in self.finish, f"output for finished {rid}"
            self.outputs[rid].extend(o.new_token_ids)
            if o.new_token_ids:
                n = self.reqs[rid].num_tokens - len(o.new_token_ids)
                assert o.new_logprobs == [("lp", rid, n + j + 1) for j in range(len(o.new_token_ids))]
            if o.new_prompt_logprobs is not None:
                self.prompt_lps.setdefault(rid, []).extend(o.new_prompt_logprobs)
            self.cached[rid] = o.num_cached_tokens
            if o.finished:
                self.finish[rid] = (o.finish_reason, o.stop_reason)
                self.must_report.add(rid)
        return so

    def run(self, max_steps=100_000):
        n = 0
        while self.sched.has_unfinished_requests():
            self.step()
            n += 1
            assert n < max_steps, "no progress"
        return n

    def check_final(self):
        sched, cfg = self.sched, self.cfg
        assert not sched.requests and not sched.running and len(sched.waiting) == 0
        assert sched.get_num_unfinished_requests() == 0
        kv = sched.kv_cache_manager
        assert kv.num_free_blocks == cfg.num_blocks - 1 and kv.num_used_blocks == 0
        assert not kv.req_to_blocks
        for rid, req in self.reqs.items():
            exp, reason, stop_reason = expected_output(req, self.plans[rid], cfg.max_model_len)
            if rid in self.aborted:
                got = self.outputs[rid]
                assert got == exp[:len(got)]
                continue
            assert self.outputs[rid] == exp, rid
            assert self.finish[rid] == (reason, stop_reason), rid
            assert req.output_token_ids == exp
            if req.sampling_params.prompt_logprobs is not None:
                assert self.prompt_lps.get(rid, []) == list(range(req.num_prompt_tokens - 1)), rid


# ---------------------------------------------------------------------------------------------
# admission


def test_admission_rejections():
    s = Scheduler(SchedulerConfig(max_model_len=100, num_blocks=5, block_size=16))  # 64 tokens
    with pytest.raises(ValueError, match="empty"):
        s.add_request(make_req("a", []))
    with pytest.raises(ValueError, match=r"90.*20.*110.*max_model_len=100"):
        s.add_request(make_req("b", [5] * 90, max_tokens=20))
    with pytest.raises(ValueError, match=r"needs 5 KV-cache blocks.*only 4"):
        s.add_request(make_req("c", [5] * 60, max_tokens=20))
    with pytest.raises(ValueError, match="max_tokens must be set"):
        make_req("d", [5] * 10, max_tokens=None)
    s.add_request(make_req("ok", [5] * 60, max_tokens=5))  # 64 tokens of K/V: fits exactly
    with pytest.raises(ValueError, match="already in use"):
        s.add_request(make_req("ok", [5] * 3))
    assert s.get_num_unfinished_requests() == 1


def test_max_tokens_up_to_model_len():
    d = Driver(SchedulerConfig(max_model_len=50, num_blocks=10))
    r = make_req("a", [5] * 20, max_tokens=30, ignore_eos=True)
    d.add(r)
    d.run()
    assert len(d.outputs["a"]) == 30 and d.finish["a"][0] == "length"
    d.check_final()


# ---------------------------------------------------------------------------------------------
# batching


def test_chunked_prefill_never_starves_decodes():
    cfg = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=4096,
                          num_blocks=200)
    d = Driver(cfg)
    for i in range(4):
        d.add(make_req(f"d{i}", [10 + i] * 5, max_tokens=200, ignore_eos=True))
    d.step()  # four short prefills
    d.add(make_req("long", list(range(3, 1003)), max_tokens=4, ignore_eos=True))
    chunks = []
    while True:
        so = d.step()
        assert all(so.num_scheduled_tokens[f"d{i}"] == 1 for i in range(4))
        chunks.append(so.num_scheduled_tokens.get("long", 0))
        if d.sched.requests["long"].num_computed_tokens >= 1000:
            break
    assert chunks[:-1] == [60] * (len(chunks) - 1) and sum(chunks) == 1000
    d.run()
    d.check_final()


def test_each_request_gets_min_of_remaining_and_budget():
    cfg = SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=100, max_model_len=1000,
                          num_blocks=500, enable_prefix_caching=False)
    s = Scheduler(cfg)
    lens = [30, 50, 45, 10]
    for i, n in enumerate(lens):
        s.add_request(make_req(f"r{i}", [3 + i] * n, max_tokens=3))
    so = s.schedule()
    assert so.num_scheduled_tokens == {"r0": 30, "r1": 50, "r2": 20}
    assert [n.num_computed_tokens for n in so.new_reqs] == [0, 0, 0]
    assert s.requests["r2"].num_computed_tokens == 20
    # Second schedule() without an update (async scheduling): r0 and r1 decode the token still in
    # flight (its id comes from the device), r2 continues its prefill, r3 starts.
    assert s.requests["r0"].num_inflight == 1 and s.requests["r2"].num_inflight == 0
    so2 = s.schedule()
    assert so2.num_scheduled_tokens == {"r0": 1, "r1": 1, "r2": 25, "r3": 10}
    r2 = next(c for c in so2.cached_reqs if c.req_id == "r2")
    assert r2.num_computed_tokens == 20 and r2.new_block_ids
    assert s.requests["r0"].num_inflight == 2
    s.check_invariants()


def test_fcfs_order_and_slot_reuse_next_step():
    cfg = SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=64, num_blocks=100)
    d = Driver(cfg)
    for i in range(6):
        d.add(make_req(f"r{i}", [3 + i] * 10, max_tokens=1 + (i % 3), ignore_eos=True,
                       arrival=float(i)))
    admitted = []
    while d.sched.has_unfinished_requests():
        finished_before = len(d.finish)
        running_before = len(d.sched.running)
        so = d.step()
        admitted += [n.req_id for n in so.new_reqs]
        if running_before == 2 and len(d.finish) > finished_before:
            pass  # slots freed now are used by the next step (checked below)
        assert len(d.sched.running) <= 2
    assert admitted == [f"r{i}" for i in range(6)]
    d.check_final()


def test_running_requests_hold_at_most_max_loras_adapters():
    """With max_loras=2, a request of a third adapter waits (head of line) until a running
    adapter's requests are gone; base-model requests (lora_id 0) never count."""
    cfg = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=256, num_blocks=100, max_loras=2)
    d = Driver(cfg)
    loras = [1, 0, 2, 1, 3, 0]
    for i, lora in enumerate(loras):
        req = make_req(f"r{i}", [3 + i] * 10, max_tokens=2 + 4 * (lora == 2), ignore_eos=True,
                       arrival=float(i))
        req.lora_id = lora
        d.add(req)
    admitted = []
    while d.sched.has_unfinished_requests():
        so = d.step()
        admitted.append([n.req_id for n in so.new_reqs])
        assert all(n.lora_id == loras[int(n.req_id[1:])] for n in so.new_reqs)
        assert len({r.lora_id for r in d.sched.running} - {0}) <= 2
    assert admitted[0] == ["r0", "r1", "r2", "r3"]  # r4's adapter 3 waits, and r5 behind it
    assert ["r4", "r5"] in admitted
    d.check_final()


def test_finished_slot_and_blocks_reused_in_the_very_next_step():
    cfg = SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=64, num_blocks=3, max_model_len=64)
    d = Driver(cfg)
    d.add(make_req("a", [5] * 20, max_tokens=2, ignore_eos=True))  # needs both usable blocks
    d.add(make_req("b", [6] * 20, max_tokens=2, ignore_eos=True))
    so1 = d.step()
    so2 = d.step()
    assert "a" in d.finish and list(so2.num_scheduled_tokens) == ["a"]
    so3 = d.step()
    assert [n.req_id for n in so3.new_reqs] == ["b"] and "a" in so3.finished_req_ids
    assert sorted(so3.new_reqs[0].block_ids) == sorted(so1.new_reqs[0].block_ids)
    d.run()
    d.check_final()


def test_priority_policy_admission_order():
    cfg = SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=64, num_blocks=100,
                          policy="priority")
    d = Driver(cfg)
    spec = [("a", 5, 0.0), ("b", 1, 1.0), ("c", 5, 2.0), ("d", -3, 3.0), ("e", 1, 4.0)]
    for rid, prio, t in spec:
        d.add(make_req(rid, [7] * 4, max_tokens=1, ignore_eos=True, priority=prio, arrival=t))
    admitted = []
    while d.sched.has_unfinished_requests():
        admitted += [n.req_id for n in d.step().new_reqs]
    assert admitted == ["d", "b", "e", "a", "c"]
    d.check_final()


def test_priority_policy_preempts_lowest_priority():
    cfg = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=256, num_blocks=7, block_size=4,
                          max_model_len=64, policy="priority", enable_prefix_caching=False)
    d = Driver(cfg)
    d.add(make_req("hi", [5] * 4, max_tokens=10, ignore_eos=True, priority=0, arrival=0.0))
    d.add(make_req("lo", [6] * 4, max_tokens=10, ignore_eos=True, priority=9, arrival=1.0))
    d.add(make_req("mid", [7] * 4, max_tokens=10, ignore_eos=True, priority=5, arrival=2.0))
    preempted = []
    while d.sched.has_unfinished_requests():
        so = d.step()
        preempted += sorted(so.preempted_req_ids)
    assert preempted and preempted[0] == "lo"
    assert "hi" not in preempted
    d.check_final()


def test_preempting_a_request_already_scheduled_this_step_rolls_it_back():
    # Priority policy: the victim (lowest priority) may already have been scheduled in this step.
    cfg = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, num_blocks=6, block_size=4,
                          max_model_len=64, policy="priority")
    d = Driver(cfg)
    low = make_req("low", list(range(3, 13)), max_tokens=8, ignore_eos=True, priority=9, arrival=0.0)
    assert d.add(low)
    d.step()                                   # low: 10-token prefill (3 blocks)
    assert d.add(make_req("high", list(range(20, 28)), max_tokens=8, ignore_eos=True, priority=0,
                          arrival=1.0))
    d.step()                                   # low decodes; high admitted (2 blocks): cache full
    kv = d.sched.kv_cache_manager
    assert kv.num_free_blocks == 0
    so = d.step()
    # low's decode completed (and registered) its block 2, then high needed a block: low is the
    # victim, its token is taken back out of the step and the uncomputed block is unregistered.
    assert so.preempted_req_ids == {"low"}
    assert so.num_scheduled_tokens == {"high": 1} and so.total_num_scheduled_tokens == 1
    assert [c.req_id for c in so.cached_reqs] == ["high"]
    assert kv.block_pool.cached_block_hash_to_block.get(low.block_hashes[2]) is None
    assert all(kv.block_pool.cached_block_hash_to_block.get(h) is not None for h in low.block_hashes[:2])
    d.run()
    d.check_final()


def test_fcfs_preempts_newest_and_recomputes_outputs():
    cfg = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=256, num_blocks=7, block_size=4,
                          max_model_len=64, enable_prefix_caching=False)
    d = Driver(cfg)
    for i in range(3):
        d.add(make_req(f"r{i}", [5 + i] * 6, max_tokens=12, ignore_eos=True, arrival=float(i)))
    first_preempt = None
    resumed = []
    while d.sched.has_unfinished_requests():
        so = d.step()
        if so.preempted_req_ids and first_preempt is None:
            first_preempt = set(so.preempted_req_ids)
            (victim,) = first_preempt
            assert victim == "r2"  # the most recently admitted
            req = d.reqs[victim]
            assert req.status == RequestStatus.PREEMPTED and req.num_computed_tokens == 0
            assert req.output_token_ids  # kept
            assert d.sched.waiting.peek() is req  # at the front
        for nr in so.new_reqs:
            if nr.output_token_ids:
                resumed.append(nr)
                # Everything generated before the preemption (this step may have added one more).
                got = d.outputs[nr.req_id]
                assert got[:len(nr.output_token_ids)] == nr.output_token_ids
                assert len(got) - len(nr.output_token_ids) in (0, 1)
    assert first_preempt and resumed
    assert d.sched.stats.num_preemptions >= 1
    d.check_final()


def test_preempted_request_recomputes_with_prefix_hits():
    cfg = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=256, num_blocks=9, block_size=4,
                          max_model_len=64)
    d = Driver(cfg)
    d.add(make_req("a", [5] * 8, max_tokens=20, ignore_eos=True))
    d.add(make_req("b", [6] * 8, max_tokens=20, ignore_eos=True))
    hits = []
    while d.sched.has_unfinished_requests():
        so = d.step()
        hits += [nr.num_computed_tokens for nr in so.new_reqs if nr.output_token_ids]
    assert hits and max(hits) > 0  # the preempted request got some of its blocks back
    d.check_final()


# ---------------------------------------------------------------------------------------------
# stop conditions


@pytest.mark.parametrize("plan, kw, out_len, reason, stop_reason", [
    ([5, EOS, 6, 7], dict(max_tokens=4), 2, "stop", None),
    ([5, EOS, 6, 7], dict(max_tokens=4, ignore_eos=True), 4, "length", None),
    ([5, EOS, 6, EOS, 9], dict(max_tokens=5, min_tokens=3), 4, "stop", None),
    ([5, 9, 6, 7], dict(max_tokens=4, stop_token_ids=[6]), 3, "stop", 6),
    ([5, 9, 6, 7], dict(max_tokens=4, stop_token_ids=[5], min_tokens=2), 4, "length", None),
    ([EOS, 9, 6, 7], dict(max_tokens=4, stop_token_ids=[EOS], ignore_eos=True), 1, "stop", EOS),
    ([5, 9, 6, 7], dict(max_tokens=2), 2, "length", None),
])
def test_stop_conditions(plan, kw, out_len, reason, stop_reason):
    d = Driver(SchedulerConfig(num_blocks=20, max_model_len=100))
    req = make_req("a", [7, 8, 9], **kw)
    d.add(req, plan=plan)
    d.run()
    assert d.outputs["a"] == plan[:out_len]
    assert d.finish["a"] == (reason, stop_reason)
    assert req.stop_reason == stop_reason and req.get_finish_reason() == reason
    d.check_final()


def test_extra_stop_ids_from_engine_and_max_model_len():
    d = Driver(SchedulerConfig(num_blocks=20, max_model_len=8))
    sp = SamplingParams(max_tokens=5)
    sp.all_stop_token_ids |= {33}  # as the engine adds its extra EOS ids at admission
    req = Request("a", [7, 8, 9], sp, eos_token_id=EOS)
    d.add(req, plan=[5, 33, 1, 1, 1])
    req2 = make_req("b", [7, 8, 9], max_tokens=5, ignore_eos=True)
    d.add(req2, plan=[1] * 10)
    d.run()
    assert d.finish["a"] == ("stop", 33)
    assert len(d.outputs["b"]) == 5 and d.finish["b"] == ("length", None)
    assert d.reqs["b"].num_tokens == 8


# ---------------------------------------------------------------------------------------------
# aborts


def test_abort_in_any_state_frees_blocks_and_reports_next_step():
    cfg = SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=32, num_blocks=30, block_size=4)
    d = Driver(cfg)
    for i in range(4):
        d.add(make_req(f"r{i}", [3 + i] * 40, max_tokens=10, ignore_eos=True))
    d.step()  # r0 prefill chunk (32 of 40)
    assert d.sched.requests["r0"].status == RequestStatus.RUNNING
    used = d.sched.kv_cache_manager.num_used_blocks
    assert used == 8
    d.abort("r0")      # running, mid-prefill
    d.abort("r3")      # waiting
    assert d.sched.kv_cache_manager.num_used_blocks == 0
    d.abort("nope")    # unknown: ignored
    so = d.step()
    assert {"r0", "r3"} <= so.finished_req_ids
    assert [n.req_id for n in so.new_reqs] == ["r1"]
    d.abort("r1")
    d.abort("r2", RequestStatus.FINISHED_STOPPED)
    assert d.sched.requests == {} and not d.sched.has_unfinished_requests()
    so = d.step()
    assert {"r1", "r2"} <= so.finished_req_ids and so.total_num_scheduled_tokens == 0
    assert d.reqs["r2"].status == RequestStatus.FINISHED_STOPPED
    assert d.reqs["r0"].get_finish_reason() == "abort"
    with pytest.raises(ValueError):
        d.sched.finish_requests(["r1"], RequestStatus.RUNNING)
    d.check_final()


def test_output_for_aborted_request_is_ignored():
    d = Driver(SchedulerConfig(num_blocks=20))
    d.add(make_req("a", [5] * 5, max_tokens=5))
    so = d.sched.schedule()
    ro = d.runner.execute(so)
    d.sched.finish_requests(["a"], RequestStatus.FINISHED_ABORTED)
    assert d.sched.update_from_output(so, ro) == []
    d.sched.check_invariants()


# ---------------------------------------------------------------------------------------------
# prefix caching through the scheduler


def test_n_siblings_share_prompt_blocks_in_the_same_step():
    cfg = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=1024, num_blocks=100)
    d = Driver(cfg)
    prompt = list(range(3, 103))  # 100 tokens: 6 full blocks + 4
    for i in range(4):
        d.add(make_req(f"x-{i}", prompt, max_tokens=5, temperature=1.0, seed=i))
    so = d.step()
    assert [n.num_computed_tokens for n in so.new_reqs] == [0, 96, 96, 96]
    assert so.num_scheduled_tokens == {"x-0": 100, "x-1": 4, "x-2": 4, "x-3": 4}
    tables = [n.block_ids for n in so.new_reqs]
    assert all(t[:6] == tables[0][:6] for t in tables)
    assert len({t[6] for t in tables}) == 4
    kv = d.sched.kv_cache_manager
    assert all(b.ref_cnt == 4 for b in kv.get_blocks("x-0")[:6])
    assert kv.num_used_blocks == 6 + 4
    st_ = d.sched.stats
    assert st_.prefix_cache_hits == 3 * 96 and st_.prefix_cache_queries == 400
    assert d.cached == {"x-0": 0, "x-1": 96, "x-2": 96, "x-3": 96}
    d.run()
    d.check_final()


def test_discarded_step_unregisters_its_blocks_and_aborts_its_requests():
    """A step whose dispatch failed wrote no K/V: the blocks it registered (including those its
    other requests hit in the same step) leave the prefix cache; earlier steps' blocks stay."""
    sched = Scheduler(SchedulerConfig(num_blocks=50))
    kv = sched.kv_cache_manager
    prefix = list(range(3, 35))  # 2 full blocks
    sched.add_request(make_req("a", prefix + [40]))
    so = sched.schedule()
    sched.update_from_output(so, ModelRunnerOutput({"a": [7]}))
    committed = {b.block_hash for b in kv.get_blocks("a")[:2]}
    prompt = prefix + list(range(50, 90))  # 4 full blocks + 8
    for i in range(2):
        sched.add_request(make_req(f"x-{i}", prompt, temperature=1.0, seed=i))
    so = sched.schedule()
    assert [n.num_computed_tokens for n in so.new_reqs] == [32, 64]  # x-1 hit x-0's new blocks
    assert set(so.num_scheduled_tokens) == {"a", "x-0", "x-1"}
    aborted = sched.discard_step(so)
    assert sorted(r.request_id for r in aborted) == ["a", "x-0", "x-1"]
    assert set(kv.block_pool.cached_block_hash_to_block) == committed
    sched.check_invariants()
    assert kv.num_used_blocks == 0
    sched.add_request(make_req("y", prompt))
    so = sched.schedule()
    assert so.new_reqs[0].num_computed_tokens == 32  # only the prefix computed in the first step
    assert so.finished_req_ids == {"a", "x-0", "x-1"}  # the runner hears of the aborts


def test_prompt_logprobs_request_gets_no_hits_and_chunks_pass_through():
    cfg = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=16, num_blocks=100, block_size=4)
    d = Driver(cfg)
    prompt = list(range(3, 43))
    d.add(make_req("warm", prompt, max_tokens=2))
    d.run()
    d.add(make_req("plp", prompt, max_tokens=2, prompt_logprobs=1))
    d.add(make_req("hit", prompt, max_tokens=2))
    first = d.step()
    assert first.new_reqs[0].req_id == "plp" and first.new_reqs[0].num_computed_tokens == 0
    d.run()
    assert d.prompt_lps["plp"] == list(range(39))
    assert d.cached["plp"] == 0 and d.cached["hit"] == 36
    d.check_final()


def test_prompt_logprobs_not_repeated_after_preemption():
    cfg = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=8, num_blocks=11, block_size=4,
                          max_model_len=64, enable_prefix_caching=False)
    d = Driver(cfg)
    d.add(make_req("old", [9] * 4, max_tokens=30, ignore_eos=True))
    d.step()
    d.add(make_req("plp", list(range(3, 23)), max_tokens=20, ignore_eos=True, prompt_logprobs=0))
    d.run()
    assert d.reqs["plp"].num_preemptions >= 1
    assert d.prompt_lps["plp"] == list(range(19))
    d.check_final()


def test_reset_prefix_cache_via_scheduler():
    d = Driver(SchedulerConfig(num_blocks=50))
    prompt = list(range(3, 60))
    d.add(make_req("a", prompt, max_tokens=2))
    d.run()
    assert d.sched.reset_prefix_cache()
    d.add(make_req("b", prompt, max_tokens=2))
    so = d.step()
    assert so.new_reqs[0].num_computed_tokens == 0
    d.run()
    d.check_final()


def test_stats():
    s = Scheduler(SchedulerConfig(num_blocks=11, max_num_seqs=1))
    s.add_request(make_req("a", [5] * 20))
    s.add_request(make_req("b", [5] * 20))
    s.schedule()
    st_ = s.stats
    assert (st_.num_running, st_.num_waiting, st_.num_used_blocks, st_.num_free_blocks) == (1, 1, 2, 8)
    assert st_.kv_cache_usage == pytest.approx(0.2)
    assert st_.prefix_cache_queries == 20 and st_.prefix_cache_hits == 0
    assert st_.prefix_cache_hit_rate == 0.0 and st_.num_preemptions == 0
    assert s.get_request("a").status == RequestStatus.RUNNING and s.get_request("zz") is None


def test_config_validation():
    with pytest.raises(ValueError, match="policy"):
        SchedulerConfig(policy="lifo")
    with pytest.raises(ValueError, match="num_blocks"):
        SchedulerConfig(num_blocks=1)
    with pytest.raises(ValueError, match="max_num_seqs"):
        SchedulerConfig(max_num_seqs=0)


# ---------------------------------------------------------------------------------------------
# randomized end-to-end


_PREFIXES = [[random.Random(k).randrange(3, 40) for _ in range(200)] for k in range(3)]


def random_request(rng: random.Random, rid: str, cfg: SchedulerConfig, arrival: float) -> Request:
    p_len = rng.choice([1, 2, rng.randrange(1, 40), rng.randrange(1, 120)])
    shared = rng.randrange(0, p_len + 1) if rng.random() < 0.6 else 0
    prompt = _PREFIXES[rng.randrange(3)][:shared] + [rng.randrange(3, 40) for _ in range(p_len - shared)]
    max_tokens = rng.choice([None, 1, 2, rng.randrange(1, 30), rng.randrange(1, 80)])
    if max_tokens is None:  # up to max_model_len, as the engine resolves an unset max_tokens
        max_tokens = max(1, cfg.max_model_len - p_len)
    min_tokens = min(rng.choice([0, 0, 0, rng.randrange(0, 5)]), max_tokens)
    kw = dict(max_tokens=max_tokens, min_tokens=min_tokens, ignore_eos=rng.random() < 0.5,
              stop_token_ids=rng.choice([None, [rng.randrange(3, 40)]]),
              priority=rng.randrange(3))
    if rng.random() < 0.05:
        kw["prompt_logprobs"] = 1
    salt = rng.choice([None, None, None, "s1"])
    return make_req(rid, prompt, salt=salt, arrival=arrival, **kw)


def run_random(seed: int, num_reqs: int, cfg: SchedulerConfig | None = None, check_prob=0.2,
               guess=False):
    rng = random.Random(seed)
    if cfg is None:
        cfg = SchedulerConfig(
            max_num_seqs=rng.choice([1, 2, 4, 8, 32]),
            max_num_batched_tokens=rng.choice([1, 3, 16, 64, 512]),
            max_model_len=rng.choice([32, 100, 256]),
            num_blocks=rng.choice([3, 6, 12, 40, 400]),
            block_size=rng.choice([1, 4, 16]),
            enable_prefix_caching=rng.random() < 0.8,
            policy=rng.choice(["fcfs", "priority"]))
    d = Driver(cfg, seed=seed, check_prob=check_prob, guess=guess)
    t = 0.0
    pending = num_reqs
    accepted = rejected = 0
    steps = 0
    while pending or d.sched.has_unfinished_requests():
        for _ in range(min(pending, rng.choice([0, 0, 1, 1, 2, 5]))):
            pending -= 1
            t += 1.0
            rid = f"s{seed}-r{pending}"
            req = random_request(rng, rid, cfg, t)
            copies = rng.choice([1, 1, 1, 3])  # n>1-style siblings
            for c in range(copies):
                sib = req if c == 0 else make_req(f"{rid}-{c}", req.prompt_token_ids, salt=req.cache_salt,
                                                  arrival=t, max_tokens=req.sampling_params.max_tokens,
                                                  ignore_eos=True)
                if d.add(sib):
                    accepted += 1
                else:
                    rejected += 1
        if d.sched.requests and rng.random() < 0.02:
            rid = rng.choice(list(d.sched.requests))
            d.abort(rid, rng.choice([RequestStatus.FINISHED_ABORTED, RequestStatus.FINISHED_STOPPED]))
        if d.sched.has_unfinished_requests():
            d.step()
            steps += 1
            assert steps < 200_000
    d.step()  # flush finished ids to the runner
    assert not d.runner.states, "runner still holds finished requests"
    d.check_final()
    return d, accepted, rejected


@pytest.mark.parametrize("seed", range(40))
def test_random_workloads(seed):
    d, accepted, rejected = run_random(seed, num_reqs=60)
    assert accepted + rejected > 0


@pytest.mark.parametrize("seeds", [range(0, 10), range(10, 20)])
def test_random_workloads_with_speculative_guesses(seeds):
    """Guesses right and wrong: the outputs are the plans' (cut at stops and lengths within a
    step's guesses), rejected guesses' K/V is computed again before it is read, and every budget
    and block count holds."""
    guessed = accepted = 0
    for seed in seeds:
        d, _, _ = run_random(3000 + seed, num_reqs=40, guess=True, check_prob=1.0)
        guessed += d.sched.stats.spec_decode.num_draft_tokens
        accepted += d.sched.stats.spec_decode.num_accepted_tokens
    assert guessed > accepted > 100


def test_speculative_guesses_under_heavy_preemption():
    cfg = SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=48, max_model_len=120,
                          num_blocks=12, block_size=4)
    spec = preempted = 0
    for seed in range(5):
        d, _, _ = run_random(4000 + seed, num_reqs=40, cfg=cfg, guess=True, check_prob=1.0)
        spec += d.sched.stats.spec_decode.num_accepted_tokens
        preempted += d.sched.stats.num_preemptions
    assert spec > 50 and preempted > 20


@pytest.mark.parametrize("seeds", [range(0, 10)])
def test_random_workloads_with_a_draft_models_lookahead(seeds):
    """As above with a draft model's slots allocated ahead of each sampling step: they hold
    whatever the draft writes there, never another request's or a cached block's K/V."""
    accepted = 0
    for seed in seeds:
        rng = random.Random(seed)
        cfg = SchedulerConfig(max_num_seqs=rng.choice([1, 4, 32]),
                              max_num_batched_tokens=rng.choice([3, 16, 512]),
                              max_model_len=rng.choice([32, 100]),
                              num_blocks=rng.choice([12, 40, 400]), block_size=rng.choice([1, 4, 16]),
                              num_lookahead_tokens=rng.choice([1, 3, 4]))
        d, _, _ = run_random(5000 + seed, num_reqs=40, cfg=cfg, guess=True, check_prob=1.0)
        accepted += d.sched.stats.spec_decode.num_accepted_tokens
    assert accepted > 100


def test_lookahead_slots_go_to_sampling_steps_up_to_max_model_len():
    d = Driver(SchedulerConfig(max_num_batched_tokens=8, num_blocks=40, max_model_len=40,
                               block_size=2, num_lookahead_tokens=3))
    assert d.add(make_req("a", [5] * 20, max_tokens=20, ignore_eos=True))
    kv = d.sched.kv_cache_manager
    for held in (4, 8):  # prompt chunks of 8 tokens, without a sample: no slots ahead
        d.step()
        assert len(kv.get_block_ids("a")) == held
    d.step()  # the prompt's last 4 tokens and a sample: 20 + 3 slots
    assert len(kv.get_block_ids("a")) == 12
    most = 0
    while not d.finish.get("a"):
        d.step()
        most = max(most, len(kv.get_block_ids("a") or []))
    assert most == 20  # 40 slots: none past max_model_len


def test_guesses_are_cut_to_the_budget_and_the_length_limit():
    d = Driver(SchedulerConfig(max_num_batched_tokens=3, num_blocks=20, max_model_len=100),
               guess=True)
    d.add(make_req("a", [5] * 4, max_tokens=6, ignore_eos=True), plan=[7, 8, 9, 10, 11, 12])
    d.step()  # prefill (4 tokens over two steps at a budget of 3)
    d.step()
    req = d.sched.requests["a"]
    req.spec_token_ids = [8, 9, 10, 11]
    so = d.step()
    assert so.scheduled_spec_decode_tokens == {"a": [8, 9]} and so.num_scheduled_tokens == {"a": 3}
    assert req.output_token_ids == [7, 8, 9, 10]
    req.spec_token_ids = [11, 12, 13]
    so = d.step()  # 4 outputs so far, 6 at most: one guess, then the last token
    assert so.scheduled_spec_decode_tokens == {"a": [11]}
    assert d.finish["a"] == ("length", None) and d.outputs["a"] == [7, 8, 9, 10, 11, 12]


def test_random_workload_heavy_preemption():
    cfg = SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=48, max_model_len=120,
                          num_blocks=12, block_size=4)
    total_preempt = 0
    for seed in range(5):
        d, _, _ = run_random(1000 + seed, num_reqs=40, cfg=cfg)
        total_preempt += d.sched.stats.num_preemptions
    assert total_preempt > 20


def test_random_workload_priority_with_preemption():
    cfg = SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=64, max_model_len=120,
                          num_blocks=14, block_size=4, policy="priority")
    for seed in range(5):
        d, _, _ = run_random(2000 + seed, num_reqs=40, cfg=cfg)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31 - 1),
       max_num_seqs=st.integers(1, 12),
       max_num_batched_tokens=st.integers(1, 200),
       num_blocks=st.integers(2, 60),
       block_size=st.sampled_from([1, 2, 4, 16]),
       caching=st.booleans(),
       policy=st.sampled_from(["fcfs", "priority"]))
def test_random_workloads_hypothesis(seed, max_num_seqs, max_num_batched_tokens, num_blocks,
                                     block_size, caching, policy):
    cfg = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                          max_model_len=128, num_blocks=num_blocks, block_size=block_size,
                          enable_prefix_caching=caching, policy=policy)
    run_random(seed, num_reqs=15, cfg=cfg, check_prob=1.0)


class _CountingGrammar:
    """A grammar of exactly `length` tokens, any of them (the scheduler's side of a matcher)."""
    bitmask_words = 2

    def __init__(self, length):
        self.length, self.accepted = length, []

    @staticmethod
    def accept_all(grammar_tokens):
        for g, t in grammar_tokens:
            g.accepted.append(t)
        return [t != g.refuses for g, t in grammar_tokens]

    refuses = None

    @property
    def terminated(self):
        return len(self.accepted) >= self.length

    @staticmethod
    def fill_bitmasks(grammar_rows, bitmask):
        for g, i in grammar_rows:
            bitmask[i] = len(g.accepted)  # the mask of the state it was filled in


def test_grammar_masks_follow_the_tokens_and_a_complete_grammar_stops():
    """Async scheduling: each step is scheduled before the one before it has come back; its masks
    are filled after that, from matchers that have seen every earlier token."""
    s = Scheduler(SchedulerConfig(max_model_len=64, num_blocks=20, block_size=4))
    plain = make_req("plain", [5, 6, 7], max_tokens=10)
    constrained = make_req("g", [5, 6], max_tokens=10)
    constrained.grammar = _CountingGrammar(3)
    s.add_request(plain)
    s.add_request(constrained)
    in_flight = s.schedule()
    assert set(in_flight.grammar_rows) == {"g"} and s.num_structured_requests == 1
    assert s.grammar_bitmask(in_flight)[0][0] == 0
    while "g" in s.requests:
        ahead = s.schedule()
        s.update_from_output(in_flight, ModelRunnerOutput(
            {rid: [9] for rid in in_flight.num_scheduled_tokens}))
        if "g" in ahead.grammar_rows:
            mask = s.grammar_bitmask(ahead)[ahead.grammar_rows["g"]]
            # Every token before this step's sample is in, or the request is done (all allowed).
            assert mask[0] == (len(constrained.output_token_ids) if "g" in s.requests else -1)
        in_flight = ahead
    assert constrained.output_token_ids == [9, 9, 9] == constrained.grammar.accepted
    assert constrained.status == RequestStatus.FINISHED_STOPPED and constrained.stop_reason is None
    assert s.num_structured_requests == 0 and "plain" in s.requests


def test_a_token_its_grammar_refuses_aborts_only_that_request():
    s = Scheduler(SchedulerConfig(max_model_len=64, num_blocks=20, block_size=4))
    reqs = [make_req(rid, [5, 6], max_tokens=10) for rid in ("a", "b", "plain")]
    reqs[0].grammar, reqs[1].grammar = _CountingGrammar(5), _CountingGrammar(5)
    reqs[1].grammar.refuses = 13
    for r in reqs:
        s.add_request(r)
    out = s.schedule()
    s.update_from_output(out, ModelRunnerOutput({"a": [13], "b": [13], "plain": [13]}))
    assert reqs[1].status == RequestStatus.FINISHED_ABORTED
    assert reqs[0].status == reqs[2].status == RequestStatus.RUNNING
    assert reqs[0].grammar.accepted == [13] and s.num_structured_requests == 1
