"""The scheduler: continuous batching with chunked prefill, prefix caching and preemption.

One step is ``schedule()`` -> model runner -> ``update_from_output()``.

schedule()
  * Token budget ``max_num_batched_tokens`` and sequence budget ``max_num_seqs`` are never exceeded.
  * Running requests go first: decodes (exactly one token left to compute), then running requests
    still in (chunked) prefill, so decodes never starve behind a long prompt. Then waiting requests
    are admitted in policy order ("fcfs": arrival order; "priority": lower ``priority`` first, ties
    by arrival) while both budgets last. A waiting request that does not fit blocks the ones behind
    it (no reordering, so nobody starves).
  * Every scheduled request gets ``min(num_tokens + num_inflight - num_computed_tokens, remaining
    budget)`` tokens: a prompt longer than the remaining budget is split across steps (chunked
    prefill), a running request at the end of its tokens gets one decode token. ``num_computed_tokens``
    advances here (as in vLLM v1). Async scheduling: a chunk that ends a request's tokens will sample
    one, counted in ``num_inflight`` until update_from_output() brings it; a schedule() before that
    already schedules the decode of the in-flight token (the runner takes its id from the device).
    A request whose in-flight tokens reach its length limit is not scheduled again.
  * A new request first takes the longest run of prefix-cached full blocks of its tokens (always
    leaving its last token to compute) and starts computing after them.
  * Preemption by recompute: when a running request needs a block and none is free, the most
    recently admitted running request (under "priority": the lowest-priority one, latest arrival
    among equals) is preempted: its blocks are freed, it goes back to the FRONT of the waiting queue
    (status PREEMPTED, ``num_computed_tokens`` reset, generated tokens kept) and later returns to the
    runner as a NewRequestData whose ``output_token_ids`` are recomputed like prompt tokens (the
    prefix cache may give some of them back). A step that preempts admits no waiting request.
    If the victim was already scheduled in this step, its tokens are taken back out of the step.

n > 1 (parallel sampling) shares the prompt's blocks. The engine fans a request with ``n`` samples
out into n Requests with the same prompt. Full blocks are registered in the prefix cache as soon as
they are allocated for known token ids, in the step that computes them, and the model runner writes
the K/V of every scheduled token before any attention of the step reads the cache. So when the n
siblings are admitted in the same step, the first one allocates and computes the prompt's blocks and
the other n-1 hit those very blocks (ref count n) and compute only the prompt's last token (or last
partial block). Later steps and later requests with the same prefix hit them the same way.

Speculative decoding: a decoding request with guesses (``Request.spec_token_ids``, from the
runner's previous output) and no token in flight is scheduled for its last token and up to that many
guesses (``SchedulerOutput.scheduled_spec_decode_tokens``), within the token budget and its length
limit; ``num_computed_tokens`` advances over all of them, and update_from_output() takes the
rejected ones back. The engine runs a step with guesses synchronously (see has_guesses()). With a
draft model, a step that samples a request's token also gets it ``num_lookahead_tokens`` more KV
slots (up to max_model_len), where the draft writes its guesses' K/V.

update_from_output()
  Appends each new token (several with speculative decoding; a stop drops those after it), then
  checks, in order: a stop token (EOS unless ``ignore_eos``, or any id of
  ``sampling_params.all_stop_token_ids``; only once ``num_output_tokens >= min_tokens``) -> "stop";
  then ``max_tokens`` / ``max_model_len`` -> "length". Finished requests free their blocks at once;
  their ids reach the runner in the next SchedulerOutput.finished_req_ids.
"""
from __future__ import annotations

import dataclasses
import heapq
import itertools
from collections import deque
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Optional

import numpy as np

from jaxvllm.core.kv_cache_manager import KVCacheManager
from jaxvllm.core.outputs import (CachedRequestData, EngineCoreOutput, ModelRunnerOutput,
                                  NewRequestData, SchedulerOutput)
from jaxvllm.core.request import Request, RequestStatus

POLICIES = ("fcfs", "priority")

_RUNNING = RequestStatus.RUNNING
_WAITING = RequestStatus.WAITING
_PREEMPTED = RequestStatus.PREEMPTED
_STOPPED = RequestStatus.FINISHED_STOPPED
_LENGTH = RequestStatus.FINISHED_LENGTH
_ABORTED = RequestStatus.FINISHED_ABORTED


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int = 2048
    num_blocks: int = 1024          # including the reserved padding block 0
    block_size: int = 16
    enable_prefix_caching: bool = True
    policy: str = "fcfs"            # "fcfs" | "priority"
    max_loras: int = 0              # most distinct LoRA adapters among running requests (0: no LoRA)
    num_lookahead_tokens: int = 0   # KV slots past a sampling step's tokens (a draft model's guesses)

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len", "block_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if not isinstance(self.num_blocks, int) or self.num_blocks < 2:
            raise ValueError(f"num_blocks must be an int >= 2 (block 0 is reserved), got {self.num_blocks!r}")
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {self.policy!r}")


@dataclass
class SpecDecodeStats:
    """Speculative decoding, cumulative (vLLM's spec_decode counters)."""
    num_drafts: int = 0             # requests verified with at least one guess
    num_draft_tokens: int = 0       # guesses verified
    num_accepted_tokens: int = 0    # guesses the target model kept

    def record(self, num_guessed: int, num_accepted: int) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += num_guessed
        self.num_accepted_tokens += num_accepted

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0


@dataclass
class SchedulerStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float           # fraction of usable blocks in use
    num_used_blocks: int
    num_free_blocks: int
    prefix_cache_queries: int       # cumulative, tokens
    prefix_cache_hits: int          # cumulative, tokens
    num_preemptions: int            # cumulative
    spec_decode: SpecDecodeStats = dataclasses.field(default_factory=SpecDecodeStats)

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0


class _WaitingQueue:
    """FCFS deque or priority heap; removal is lazy (finished entries are skipped)."""

    def __init__(self, priority: bool) -> None:
        self._priority = priority
        self._dq: deque[Request] = deque()
        self._heap: list[tuple[int, float, int, Request]] = []
        self._seq = itertools.count()
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def push(self, req: Request) -> None:
        if self._priority:
            heapq.heappush(self._heap, (req.priority, req.arrival_time, next(self._seq), req))
        else:
            self._dq.append(req)
        self._len += 1

    def push_front(self, req: Request) -> None:
        """Re-queue a preempted request ahead of the others (under "priority" its own priority and
        arrival time decide, which puts it ahead of later arrivals of its priority)."""
        if self._priority:
            self.push(req)
        else:
            self._dq.appendleft(req)
            self._len += 1

    def peek(self) -> Optional[Request]:
        if self._priority:
            heap = self._heap
            while heap and heap[0][3].status.finished:
                heapq.heappop(heap)
            return heap[0][3] if heap else None
        dq = self._dq
        while dq and dq[0].status.finished:
            dq.popleft()
        return dq[0] if dq else None

    def pop(self) -> Request:
        req = self.peek()
        assert req is not None
        if self._priority:
            heapq.heappop(self._heap)
        else:
            self._dq.popleft()
        self._len -= 1
        return req

    def discard(self, req: Request) -> None:
        """Account for `req` leaving the queue; the caller marks it finished so it is skipped."""
        self._len -= 1

    def __iter__(self) -> Iterator[Request]:
        if self._priority:
            items = [e[3] for e in sorted(self._heap)]
        else:
            items = list(self._dq)
        return (r for r in items if not r.status.finished)


class Scheduler:
    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.kv_cache_manager = KVCacheManager(config.num_blocks, config.block_size,
                                               config.enable_prefix_caching)
        self.requests: dict[str, Request] = {}     # every unfinished request
        self.waiting = _WaitingQueue(config.policy == "priority")
        self.running: list[Request] = []            # admission order
        self._finished_req_ids: set[str] = set()    # reported in the next SchedulerOutput
        self.num_preemptions = 0
        self.num_structured_requests = 0           # unfinished requests with a grammar
        self.spec_stats = SpecDecodeStats()

    # ---- requests in / out ---------------------------------------------------------------------
    def add_request(self, req: Request) -> None:
        cfg = self.config
        rid = req.request_id
        if rid in self.requests:
            raise ValueError(f"request id {rid!r} is already in use")
        p = len(req.prompt_token_ids)
        if p == 0:
            raise ValueError(f"request {rid!r}: the prompt is empty")
        if p + req.max_tokens > cfg.max_model_len:
            raise ValueError(f"request {rid!r}: prompt ({p} tokens) + max_tokens ({req.max_tokens}) = "
                             f"{p + req.max_tokens} exceeds max_model_len={cfg.max_model_len}")
        # The last generated token is never fed back, so at most p + max_tokens - 1 tokens need K/V.
        need = self.kv_cache_manager.num_blocks_for(p + req.max_tokens - 1)
        usable = cfg.num_blocks - 1
        if need > usable:
            raise ValueError(f"request {rid!r}: prompt ({p} tokens) + max_tokens ({req.max_tokens}) "
                             f"needs {need} KV-cache blocks of {cfg.block_size} tokens, but the cache "
                             f"has only {usable}")
        req.max_num_tokens = min(p + req.max_tokens, cfg.max_model_len)
        req.status = _WAITING
        self.requests[rid] = req
        if req.grammar is not None:
            self.num_structured_requests += 1
        self.waiting.push(req)

    def finish_requests(self, req_ids: str | Iterable[str], status: RequestStatus) -> list[Request]:
        """Remove requests in any state (the engine: aborts, stop strings). Frees their blocks now;
        their ids go into the next SchedulerOutput.finished_req_ids. Unknown ids are ignored."""
        if not status.finished:
            raise ValueError(f"finish_requests needs a finished status, got {status!r}")
        if isinstance(req_ids, str):
            req_ids = (req_ids,)
        done = []
        for rid in req_ids:
            req = self.requests.get(rid)
            if req is None:
                continue
            was_running = req.status == _RUNNING
            self._finish(req, status)
            if was_running:
                self.running.remove(req)
            done.append(req)
        return done

    def _finish(self, req: Request, status: RequestStatus) -> None:
        """Mark finished, free blocks, forget. The caller removes it from `running` if needed."""
        if req.status == _WAITING or req.status == _PREEMPTED:
            self.waiting.discard(req)
        req.status = status
        self.kv_cache_manager.free(req)
        del self.requests[req.request_id]
        self._finished_req_ids.add(req.request_id)
        if req.grammar is not None:
            self.num_structured_requests -= 1

    # ---- schedule ------------------------------------------------------------------------------
    def _pick_victim(self) -> Request:
        if self.config.policy == "priority":
            # Lowest priority (largest value), latest arrival; among equals the latest admitted.
            best = None
            for r in self.running:
                if best is None or (r.priority, r.arrival_time) >= (best.priority, best.arrival_time):
                    best = r
            return best
        return self.running[-1]

    def _preempt(self, victim: Request, num_scheduled: dict[str, int], samples: set[str],
                 drafts: dict[str, list[int]]) -> int:
        """Preempt `victim`; returns how many tokens of this step it gives back (0 if it was not
        scheduled yet in this step). `samples`: requests whose chunk this step samples a token;
        `drafts`: the step's scheduled guesses."""
        drafts.pop(victim.request_id, None)
        victim.spec_token_ids = []
        if victim.request_id in samples:
            samples.discard(victim.request_id)
            victim.num_inflight -= 1
        if self.running and self.running[-1] is victim:
            self.running.pop()
        else:
            self.running.remove(victim)
        n = num_scheduled.pop(victim.request_id, 0)
        victim.num_computed_tokens -= n  # roll back this step: free() unregisters uncomputed blocks
        self.kv_cache_manager.free(victim)
        victim.status = _PREEMPTED
        victim.num_computed_tokens = 0
        victim.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.push_front(victim)
        return n

    def schedule(self) -> SchedulerOutput:
        cfg = self.config
        kv = self.kv_cache_manager
        kv.begin_step()
        allocate = kv.allocate_slots
        look = cfg.num_lookahead_tokens
        budget = cfg.max_num_batched_tokens
        num_scheduled: dict[str, int] = {}
        cached_reqs: list[CachedRequestData] = []
        new_reqs: list[NewRequestData] = []
        preempted: set[str] = set()
        prefills: list[Request] = []
        samples: set[str] = set()  # requests whose chunk in this step ends with a sampled token
        drafts: dict[str, list[int]] = {}  # speculative decoding: guesses verified in this step

        # 1) running requests: decodes first, then prefills in progress.
        for phase in (0, 1):
            for req in (self.running[:] if phase == 0 else prefills):
                if budget <= 0:
                    break
                if req.status != _RUNNING:  # preempted earlier in this step
                    continue
                computed = req.num_computed_tokens
                known = req.num_tokens + req.num_inflight
                if known >= req.max_num_tokens:
                    continue  # its in-flight token is its last: nothing left to compute
                n = known - computed
                k = 0  # guesses scheduled after its last token
                if n == 1 and req.spec_token_ids and not req.num_inflight:
                    k = min(len(req.spec_token_ids), req.max_num_tokens - known - 1, budget - 1)
                    n += k
                elif n != 1:
                    if phase == 0:
                        prefills.append(req)
                        continue
                    if n > budget:
                        n = budget
                    upto = req.num_prompt_logprobs_sent
                    if computed < upto < req.num_prompt_tokens and n > upto - computed:
                        n = upto - computed  # keep prompt-logprob chunks aligned after a preemption
                ahead = self._lookahead(computed + n) if look and computed + n - k == known else 0
                while True:
                    new_ids = allocate(req, n, num_lookahead_tokens=ahead)
                    if new_ids is not None:
                        break
                    victim = self._pick_victim()
                    preempted.add(victim.request_id)
                    back = self._preempt(victim, num_scheduled, samples, drafts)
                    if back:
                        budget += back
                        cached_reqs = [c for c in cached_reqs if c.req_id != victim.request_id]
                    if victim is req:
                        break
                if new_ids is None:
                    continue
                rid = req.request_id
                cached_reqs.append(CachedRequestData(rid, new_ids, computed))
                num_scheduled[rid] = n
                req.num_computed_tokens = computed + n
                if k:
                    drafts[rid] = req.spec_token_ids[:k]
                req.spec_token_ids = []
                if computed + n - k == known:
                    req.num_inflight += 1
                    samples.add(rid)
                budget -= n

        # 2) waiting requests, in policy order (none in a step that had to preempt).
        if not preempted:
            running = self.running
            waiting = self.waiting
            max_seqs = cfg.max_num_seqs
            while budget > 0 and len(running) < max_seqs and len(waiting):
                req = waiting.peek()
                if req is None or req.num_inflight:
                    break  # (a request preempted with a token in flight resumes once it is back)
                if req.lora_id and not self._lora_fits(req.lora_id):
                    break  # its adapter needs a slot that running requests' adapters hold
                hits, num_hit = kv.get_computed_blocks(req)
                n = req.num_tokens - num_hit
                if n > budget:
                    n = budget
                upto = req.num_prompt_logprobs_sent
                if 0 < upto < req.num_prompt_tokens and n > upto:
                    n = upto
                ahead = self._lookahead(num_hit + n) if look and num_hit + n == req.num_tokens else 0
                new_ids = allocate(req, n, hits, num_hit, ahead)
                if new_ids is None:
                    break  # head of line does not fit: wait for blocks to free up
                waiting.pop()
                rid = req.request_id
                req.status = _RUNNING
                running.append(req)
                if req.num_cached_tokens < 0:
                    req.num_cached_tokens = num_hit
                new_reqs.append(NewRequestData(
                    rid, req.prompt_token_ids, list(req.output_token_ids), req.sampling_params,
                    kv.get_block_ids(rid), num_hit, req.lora_id))
                num_scheduled[rid] = n
                req.num_computed_tokens = num_hit + n
                if num_hit + n == req.num_tokens:
                    req.num_inflight += 1
                budget -= n

        finished = self._finished_req_ids
        self._finished_req_ids = set()
        grammar_rows = {}
        if self.num_structured_requests:
            requests, start = self.requests, 0
            for rid in num_scheduled:
                if requests[rid].grammar is not None:
                    grammar_rows[rid] = start
                    start += 1 + len(drafts.get(rid, ()))
        return SchedulerOutput(new_reqs=new_reqs, cached_reqs=cached_reqs,
                               num_scheduled_tokens=num_scheduled,
                               total_num_scheduled_tokens=cfg.max_num_batched_tokens - budget,
                               finished_req_ids=finished, preempted_req_ids=preempted,
                               grammar_rows=grammar_rows, scheduled_spec_decode_tokens=drafts)

    def _lookahead(self, num_tokens: int) -> int:
        """Slots past a request's first `num_tokens` it gets for a draft model's guesses."""
        return max(0, min(self.config.num_lookahead_tokens, self.config.max_model_len - num_tokens))

    def has_guesses(self) -> bool:
        """Whether a running request holds speculative guesses: they are from its latest tokens,
        so its next step must be scheduled after the step before it has come back."""
        return any(r.spec_token_ids for r in self.running)

    def _lora_fits(self, lora_id: int) -> bool:
        active = {r.lora_id for r in self.running if r.lora_id}
        return lora_id in active or len(active) < self.config.max_loras

    def grammar_bitmask(self, scheduler_output: SchedulerOutput) -> np.ndarray:
        """The next-token masks of the step's requests with a grammar, from each one's first row of
        `grammar_rows` on: the mask after its tokens so far, then after each of its scheduled
        guesses in turn (the matcher advanced over them and rolled back). Valid once every token
        sampled before that step has come back through update_from_output (the matchers have then
        seen all of them); a request finished since allows every token, and so do the rows after a
        guess its grammar refuses (verification rejects that guess: its masked probability is 0)."""
        rows = scheduler_output.grammar_rows
        drafts = scheduler_output.scheduled_spec_decode_tokens
        total = sum(1 + len(drafts.get(rid, ())) for rid in rows)
        live = [(req.grammar, i, drafts.get(rid, ())) for rid, i in rows.items()
                if (req := self.requests.get(rid)) is not None]
        if not live:  # one all-ones word per row, which broadcasts over a row of any width
            return np.full((total, 1), -1, np.int32)
        bitmask = np.full((total, live[0][0].bitmask_words), -1, np.int32)
        advanced: dict[Any, int] = {}  # grammar -> guesses it consumed here (rolled back below)
        j = 0
        while live:
            for kind, kind_rows in _by_kind((g, i + j) for g, i, _ in live).items():
                kind.fill_bitmasks(kind_rows, bitmask)
            # A guess the mask refuses is not consumed (a refused token can leave a matcher failed).
            live = [(g, i, guesses) for g, i, guesses in live if j < len(guesses)
                    and _allows(bitmask[i + j], guesses[j])]
            for kind, items in _by_kind((g, guesses[j]) for g, _, guesses in live).items():
                kind.accept_all(items)
            for g, _, _ in live:
                advanced[g] = advanced.get(g, 0) + 1
            j += 1
        for g, n in advanced.items():
            g.rollback(n)
        return bitmask

    def discard_step(self, scheduler_output: SchedulerOutput) -> list[Request]:
        """The runner failed to run `scheduler_output` (the latest schedule()), so its K/V may never
        have been written. Unregisters the prefix-cache blocks it registered and aborts the
        requests it scheduled (their computed-token counts include tokens never computed); the
        runner hears of these and of the step's finished requests in the next step. Returns the
        aborted requests."""
        self.kv_cache_manager.discard_step()
        self._finished_req_ids |= scheduler_output.finished_req_ids
        return self.finish_requests(list(scheduler_output.num_scheduled_tokens),
                                    RequestStatus.FINISHED_ABORTED)

    # ---- update --------------------------------------------------------------------------------
    def update_from_output(self, scheduler_output: SchedulerOutput,
                           runner_output: ModelRunnerOutput) -> list[EngineCoreOutput]:
        requests = self.requests
        logprobs = runner_output.logprobs
        prompt_lps = runner_output.prompt_logprobs
        starts = self._chunk_starts(scheduler_output) if prompt_lps else None
        outputs: list[EngineCoreOutput] = []
        append = outputs.append
        any_finished_running = False
        refused, completed = (self._advance_grammars(runner_output.sampled_token_ids)
                              if self.num_structured_requests else ({}, {}))
        drafts = scheduler_output.scheduled_spec_decode_tokens
        proposals = runner_output.spec_token_ids
        for rid, toks in runner_output.sampled_token_ids.items():
            req = requests.get(rid)
            if req is None:
                continue  # finished or aborted meanwhile
            req.num_inflight -= 1
            guessed = drafts.get(rid)
            if guessed:  # the rejected guesses' K/V is not the request's: computed again
                req.num_computed_tokens -= len(guessed) + 1 - len(toks)
                self.spec_stats.record(len(guessed), len(toks) - 1)
            out_ids = req.output_token_ids
            status = None
            stop_reason = None
            for j, tok in enumerate(toks):
                out_ids.append(tok)
                if refused.get(rid) == j:
                    status = _ABORTED  # cannot happen with the mask applied: a sampler fault
                elif tok in req.stop_ids and len(out_ids) >= req.min_tokens:
                    status = _STOPPED
                    if tok != req.stop_reason_exempt_id:
                        stop_reason = tok
                elif completed.get(rid) == j:
                    status = _STOPPED  # the output is complete: as a stop token, without its id
                elif len(out_ids) + len(req.prompt_token_ids) >= req.max_num_tokens:
                    status = _LENGTH
                if status is not None:
                    toks = toks[:j + 1]  # what follows a stop is not output
                    break
            if status is None:  # its guesses after these tokens (each step's replace the last)
                req.spec_token_ids = proposals.get(rid, [])
            prompt_logprobs = None
            if prompt_lps and rid in prompt_lps:
                prompt_logprobs = self._take_prompt_logprobs(req, prompt_lps[rid], starts,
                                                             scheduler_output)
            if status is not None:
                req.stop_reason = stop_reason
                if req.status == _RUNNING:
                    any_finished_running = True
                self._finish(req, status)
            finish_reason = None if status is None else status.finish_reason
            new_logprobs = logprobs.get(rid) if logprobs else None
            append(EngineCoreOutput(rid, toks, finish_reason, stop_reason,
                                    None if new_logprobs is None else new_logprobs[:len(toks)],
                                    prompt_logprobs, max(req.num_cached_tokens, 0)))
        if prompt_lps:
            sampled = runner_output.sampled_token_ids
            for rid, chunk in prompt_lps.items():
                if rid in sampled:
                    continue
                req = requests.get(rid)
                if req is None:
                    continue
                prompt_logprobs = self._take_prompt_logprobs(req, chunk, starts, scheduler_output)
                if prompt_logprobs is not None:
                    append(EngineCoreOutput(rid, [], new_prompt_logprobs=prompt_logprobs,
                                            num_cached_tokens=max(req.num_cached_tokens, 0)))
        if any_finished_running:
            self.running = [r for r in self.running if r.status == _RUNNING]
        return outputs

    def _advance_grammars(self, sampled: dict[str, list[int]]
                          ) -> tuple[dict[str, int], dict[str, int]]:
        """The sampled tokens advance their requests' grammars, a token of each request at a time
        (with speculative decoding a request may have several), every grammar of a kind in one call
        (llguidance's matchers in parallel: one by one they took ~17 us each, 4 ms a step at batch
        256). Returns, by request id, the index of the token its grammar refused, and of the token
        that completed its output (nothing after either is consumed)."""
        live = [(req.grammar, rid) for rid in sampled
                if (req := self.requests.get(rid)) is not None and req.grammar is not None]
        refused: dict[str, int] = {}
        completed: dict[str, int] = {}
        j = 0
        while live:
            for kind, items in _by_kind(live).items():
                accepted = kind.accept_all([(grammar, sampled[rid][j]) for grammar, rid in items])
                for (grammar, rid), ok in zip(items, accepted):
                    if not ok:
                        refused[rid] = j
                    elif grammar.terminated:
                        completed[rid] = j
            j += 1
            live = [(g, rid) for g, rid in live if j < len(sampled[rid]) and rid not in refused
                    and rid not in completed]
        return refused, completed

    @staticmethod
    def _chunk_starts(scheduler_output: SchedulerOutput) -> dict[str, int]:
        starts = {c.req_id: c.num_computed_tokens for c in scheduler_output.cached_reqs}
        for new_req in scheduler_output.new_reqs:
            starts[new_req.req_id] = new_req.num_computed_tokens
        return starts

    @staticmethod
    def _take_prompt_logprobs(req: Request, chunk, starts: dict[str, int],
                              scheduler_output: SchedulerOutput):
        """Pass a prompt-logprobs chunk through unless it repeats positions already passed on
        (recomputation after a preemption); schedule() keeps chunks from straddling that point."""
        start = starts.get(req.request_id)
        if start is None or start < req.num_prompt_logprobs_sent:
            return None
        end = start + scheduler_output.num_scheduled_tokens.get(req.request_id, 0)
        req.num_prompt_logprobs_sent = max(req.num_prompt_logprobs_sent, min(end, req.num_prompt_tokens))
        return chunk

    # ---- queries -------------------------------------------------------------------------------
    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def get_num_unfinished_requests(self) -> int:
        return len(self.requests)

    def get_request(self, req_id: str) -> Optional[Request]:
        return self.requests.get(req_id)

    def reset_prefix_cache(self) -> bool:
        """Forget all cached prefixes (e.g. after a weight swap). Safe at any time: free blocks lose
        their hashes, in-use blocks stay with their requests but are unregistered. Running requests
        keep K/V computed with the old weights, so swap weights while idle if that matters."""
        return self.kv_cache_manager.reset_prefix_cache()

    @property
    def stats(self) -> SchedulerStats:
        kv = self.kv_cache_manager
        return SchedulerStats(
            num_running=len(self.running), num_waiting=len(self.waiting), kv_cache_usage=kv.usage,
            num_used_blocks=kv.num_used_blocks, num_free_blocks=kv.num_free_blocks,
            prefix_cache_queries=kv.prefix_cache_queries, prefix_cache_hits=kv.prefix_cache_hits,
            num_preemptions=self.num_preemptions, spec_decode=dataclasses.replace(self.spec_stats))

    def check_invariants(self, scheduled: Optional[SchedulerOutput] = None) -> None:
        """Consistency of queues, requests and block tables (for tests; O(everything)).
        `scheduled`: the schedule() whose output has not come back yet, if any (its guesses are
        counted as computed until then)."""
        guessed = scheduled.scheduled_spec_decode_tokens if scheduled is not None else {}
        kv = self.kv_cache_manager
        kv.check_invariants()
        cfg = self.config
        running_ids = [r.request_id for r in self.running]
        assert len(set(running_ids)) == len(running_ids), "a request is running twice"
        assert len(self.running) <= cfg.max_num_seqs
        waiting = list(self.waiting)
        assert len(waiting) == len(self.waiting), "waiting count drifted"
        assert len(waiting) + len(self.running) == len(self.requests), "requests lost or duplicated"
        bs = cfg.block_size
        for r in self.running:
            assert r.status == _RUNNING and self.requests.get(r.request_id) is r
            guesses = len(guessed.get(r.request_id, ()))
            assert 0 <= r.num_computed_tokens <= r.num_tokens + r.num_inflight + guesses
            assert 0 <= r.num_inflight <= 2
            assert len(kv.get_blocks(r.request_id)) >= -(-r.num_computed_tokens // bs)
        for r in waiting:
            assert r.status in (_WAITING, _PREEMPTED) and self.requests.get(r.request_id) is r
            assert r.num_computed_tokens == 0 and not kv.get_blocks(r.request_id)
        assert set(kv.req_to_blocks) <= set(running_ids), "a non-running request holds blocks"


def _by_kind(pairs: Iterable[tuple[Any, Any]]) -> dict[type, list[tuple[Any, Any]]]:
    """(mask rule, value) pairs grouped by the rule's kind (grammar, fixed token set, bad words):
    each kind fills masks and accepts tokens for all of its rules in one call."""
    groups: dict[type, list[tuple[Any, Any]]] = {}
    for pair in pairs:
        groups.setdefault(type(pair[0]), []).append(pair)
    return groups


def _allows(row: np.ndarray, token: int) -> bool:
    """Whether a mask row (int32 words, bit t of the row = token t) allows `token`."""
    return bool((int(row[token >> 5]) >> (token & 31)) & 1)
