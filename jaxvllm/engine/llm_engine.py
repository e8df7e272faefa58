"""LLMEngine: the synchronous step loop. Tokenizes, fans out n>1, schedules, runs the model,
detokenizes, applies stop strings, and emits RequestOutputs (cumulative, delta or final only, as
each request's SamplingParams.output_kind asks)."""
from __future__ import annotations

import collections
import gc
import itertools
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np

from jaxvllm.config import EngineArgs
from jaxvllm.core.outputs import EngineCoreOutput
from jaxvllm.core.request import Request, RequestStatus, lora_cache_salt
from jaxvllm.core.scheduler import Scheduler, SchedulerStats
from jaxvllm.engine.detokenizer import IncrementalDetokenizer
from jaxvllm.lora.request import LoRARequest
from jaxvllm.outputs import CompletionOutput, Logprob, RequestOutput
from jaxvllm.sampling_params import RequestOutputKind, SamplingParams
from jaxvllm.structured_output import BadWords, GrammarCompiler, TokenMask

logger = logging.getLogger(__name__)
WAKE_TAGS = ("weights", "kv_cache")  # what LLM.wake_up can bring back

# Token ids may also be a 1-D integer JAX array, or a list of numpy ints (see as_token_ids).
PromptType = Union[str, Sequence[int], np.ndarray, dict]


class NotServingError(RuntimeError):
    """A request arrived while the engine cannot generate: asleep, or mid weight update. Nothing
    is wrong with the request; it can be sent again once the engine is woken or updated."""


def check_can_generate(asleep: bool, updating: bool) -> None:
    if asleep:
        raise NotServingError("the engine is asleep (sleep()): call wake_up() before generating")
    if updating:
        raise NotServingError("a weight update is in progress: call finish_weight_update() "
                              "before generating")


def check_idle(what: str, busy: bool) -> None:
    if busy:
        raise RuntimeError(f"{what} must be called between generate calls (requests are running)")


def check_sleep_level(level: Any) -> None:
    if level not in (1, 2) or isinstance(level, bool):
        raise ValueError(f"level must be 1 or 2, got {level!r}")


def wake_tags(tags: Optional[Sequence[str]]) -> list[str]:
    """The parts wake_up brings back (None: all of them)."""
    tags = list(WAKE_TAGS if tags is None else tags)
    bad = [t for t in tags if t not in WAKE_TAGS]
    if bad or not tags:
        raise ValueError(f"tags must name some of {list(WAKE_TAGS)}, got {tags!r}")
    return tags


def freeze_startup_heap() -> None:
    """Moves every object alive once an engine has started (modules, JAX's and the tokenizer's,
    the KV-cache block pool) out of reach of Python's cyclic garbage collector, as vLLM does: each
    full collection walked them all, ~200 ms for 250k objects, every 20-30 steps at 1024 decoding
    requests, which was a third of the engine thread's time per step (bench/host_step.py, CPU;
    bench/RESULTS.md). An earlier engine's objects become collectable again first, so an engine
    dropped in a reference cycle is freed when the next one starts (or at gc.unfreeze())."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()


def check_chunk(chunk: Any) -> None:
    if not (isinstance(chunk, dict) and all(isinstance(k, str) for k in chunk)):
        raise TypeError("during a weight update (start_weight_update), update_weights takes "
                        "a dict of weights by name ('embed', 'layers.3.q', ...)")


@dataclass
class _Child:
    index: int
    request_id: str
    # Both made at admission (a prepared request pickles). The scheduler's request holds the
    # sequence's output tokens; the engine reads them there.
    detok: Optional[IncrementalDetokenizer] = None
    request: Optional[Request] = None
    logprobs: Optional[list[dict[int, Logprob]]] = None
    cumulative_logprob: Optional[float] = None
    finish_reason: Optional[str] = None
    stop_reason: int | str | None = None
    sent_tokens: int = 0   # DELTA outputs: what earlier outputs already carried
    sent_text: int = 0


@dataclass
class _Parent:
    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list[int]
    params: SamplingParams
    children: list[_Child]
    prompt_logprobs: Optional[list] = None
    num_cached_tokens: int = 0
    metrics: dict = field(default_factory=dict)
    sent_prompt_logprobs: int = 0  # DELTA outputs: prompt positions already sent
    failed: bool = False      # its output processing raised: finished with finish_reason "error"
    grammar: Optional[str] = None  # structured outputs: compiled when prepared
    bad_words: Optional[list[tuple[int, ...]]] = None  # token sequences, tokenized when prepared
    lora_request: Optional[LoRARequest] = None  # its adapter, loaded when prepared

    @property
    def finished(self) -> bool:
        return all(c.finish_reason is not None for c in self.children)


class RequestPreparer:
    """Validates, tokenizes and normalizes a request into a `_Parent` (no scheduler, no device):
    the engine's first half of add_request, and the data-parallel front's (engine/data_parallel.py)
    before it hands the request to a replica process."""

    def __init__(self, tokenizer: Any, vocab_size: int, max_model_len: int, max_logprobs: int,
                 eos_token_id: Optional[int], generation_eos_ids: set[int],
                 load_lora: Optional[Callable[[LoRARequest], None]] = None) -> None:
        self.tokenizer = tokenizer
        self.load_lora = load_lora  # None: LoRA not enabled
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.max_logprobs = max_logprobs
        self.eos_token_id = eos_token_id
        self.extra_eos_ids = generation_eos_ids - {eos_token_id}
        self.grammars = GrammarCompiler(tokenizer, vocab_size,
                                        sorted(generation_eos_ids | ({eos_token_id} - {None})))
        # Scheduler/runner ids are unique per admission, so a user's request_id may be used again
        # while a step holding the old request is still on the device (its late sample then
        # matches no live request and is dropped).
        self._internal_ids = itertools.count()

    def tokenize(self, prompt: PromptType) -> tuple[Optional[str], list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                ids = as_token_ids(prompt["prompt_token_ids"], "prompt_token_ids", self.vocab_size)
                return prompt.get("prompt"), ids
            if "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise ValueError("prompt dict needs 'prompt' or 'prompt_token_ids'")
        if isinstance(prompt, str):
            return prompt, self.encode(prompt)
        return None, as_token_ids(prompt, "prompt", self.vocab_size)

    def encode(self, text: str, add_special_tokens: bool = True, name: str = "prompt") -> list[int]:
        if self.tokenizer is None:
            raise ValueError(f"this model has no tokenizer: pass {name} as token ids")
        return list(self.tokenizer.encode(check_text(text, name), add_special_tokens=add_special_tokens))

    def prepare(self, request_id: str, prompt: PromptType, params: Optional[SamplingParams],
                arrival_time: Optional[float],
                lora_request: Optional[LoRARequest] = None) -> _Parent:
        if params is not None and not isinstance(params, SamplingParams):
            raise TypeError(f"sampling_params must be a SamplingParams, got {type(params).__name__}")
        if lora_request is not None:
            if not isinstance(lora_request, LoRARequest):
                raise TypeError(f"lora_request must be a LoRARequest, got "
                                f"{type(lora_request).__name__}")
            if self.load_lora is None:
                raise ValueError("lora_request needs an engine started with enable_lora=True")
            self.load_lora(lora_request)
        params = (params or SamplingParams()).clone()
        text, ids = self.tokenize(prompt)
        self._validate(ids, params)
        # As vLLM offline: generation stops at max_model_len (finish_reason "length"), so a larger
        # (or no) max_tokens is capped there; the OpenAI server refuses such requests itself.
        room = self.max_model_len - len(ids)
        if params.max_tokens is None or params.max_tokens > room:
            params.max_tokens = room
            params.min_tokens = min(params.min_tokens, room)
        if params.top_k >= self.vocab_size:
            params.top_k = 0  # the same "all tokens" (and the sampler's int32 lane cannot hold any int)
        # As vLLM: EOS ids are in the set even with ignore_eos (which only keeps them from
        # stopping the request), so min_tokens masks them either way.
        params.all_stop_token_ids = (set(params.stop_token_ids) | self.extra_eos_ids
                                     | ({self.eos_token_id} - {None}))
        children = [_Child(i, f"{request_id}#{next(self._internal_ids)}") for i in range(params.n)]
        for c in children:
            if params.logprobs is not None:
                c.logprobs, c.cumulative_logprob = [], 0.0
        grammar = (self.grammars.compile(params.structured_outputs)
                   if params.structured_outputs is not None else None)
        bad_words = self._bad_word_sequences(params.bad_words) if params.bad_words else None
        now = time.monotonic() if arrival_time is None else arrival_time
        return _Parent(request_id, text, ids, params, children,
                       prompt_logprobs=[None] if params.prompt_logprobs is not None else None,
                       metrics={"arrival_time": now, "first_scheduled_time": None,
                                "first_token_time": None, "finished_time": None},
                       grammar=grammar, bad_words=bad_words, lora_request=lora_request)

    def _bad_word_sequences(self, words: list[str]) -> list[tuple[int, ...]]:
        """As vLLM: each word as written and with a leading space (how it follows another word)."""
        seqs = set()
        for word in words:
            for variant in {word, " " + word.lstrip()}:
                ids = tuple(self.encode(variant, False, "bad_words"))
                if ids:
                    seqs.add(ids)
        return sorted(seqs)

    def _validate(self, ids: list[int], params: SamplingParams) -> None:
        if not ids:
            raise ValueError("prompt must not be empty")
        n = len(ids)
        if n >= self.max_model_len:
            raise ValueError(f"The prompt is {n} tokens long, but max_model_len is "
                             f"{self.max_model_len}: it must be shorter")
        for name in ("stop_token_ids", "allowed_token_ids", "logit_bias"):
            ids = getattr(params, name)
            if ids:
                as_token_ids(list(ids), name, self.vocab_size)
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(params, name)
            if v is not None and v > self.max_logprobs:
                raise ValueError(f"{name} must be at most max_logprobs={self.max_logprobs}, got {v}")


class RequestFront:
    """The request-facing methods an engine (LLMEngine, or the data-parallel front) offers on top
    of its `preparer` and its `_is_running` / `admit_request`."""
    preparer: RequestPreparer

    def _is_running(self, request_id: str) -> bool:
        raise NotImplementedError

    def admit_request(self, parent: _Parent) -> None:
        raise NotImplementedError

    def tokenize(self, prompt: PromptType) -> tuple[Optional[str], list[int]]:
        return self.preparer.tokenize(prompt)

    def encode(self, text: str, add_special_tokens: bool = True, name: str = "prompt") -> list[int]:
        """Token ids of `text`; `name` is the field a bad value is reported as."""
        return self.preparer.encode(text, add_special_tokens, name)

    def add_request(self, request_id: str, prompt: PromptType, params: Optional[SamplingParams] = None,
                    arrival_time: Optional[float] = None,
                    lora_request: Optional[LoRARequest] = None) -> None:
        """Validates and queues a request; raises ValueError/TypeError (nothing is queued then)."""
        self.admit_request(self.prepare_request(request_id, prompt, params, arrival_time,
                                                lora_request))

    def prepare_request(self, request_id: str, prompt: PromptType,
                        params: Optional[SamplingParams] = None,
                        arrival_time: Optional[float] = None,
                        lora_request: Optional[LoRARequest] = None) -> _Parent:
        """Everything in add_request that does not touch the scheduler (safe off the step thread).
        What each output holds follows `params.output_kind` (offline batches use FINAL_ONLY)."""
        if self._is_running(request_id):
            raise ValueError(f"request_id {request_id!r} is already running")
        return self.preparer.prepare(request_id, prompt, params, arrival_time, lora_request)


class LLMEngine(RequestFront):
    def __init__(self, args: EngineArgs, loaded: Any = None,
                 devices: Optional[list[Any]] = None) -> None:
        """`devices`: the device group of a data-parallel replica (engine/data_parallel.py)."""
        from jaxvllm.engine.setup import start_tokenizer_load
        if args.node_rank > 0:  # a second engine would wait for followers of its own
            raise ValueError(f"node_rank {args.node_rank}: only rank 0 runs an engine; the other "
                             f"ranks run jaxvllm.engine.multihost.run_follower(engine_args)")
        self.args = args
        self.devices = devices
        t0 = time.perf_counter()
        # The tokenizer is first needed by a request, so it loads (in a child process: importing
        # transformers' AutoTokenizer was 16 s of Python on the GPU host) while the weights load,
        # the cache is sized and the buckets compile; a thread waits for it and unpickles it.
        child = start_tokenizer_load(args) if loaded is None else None
        try:
            self._start(args, loaded, child, t0)
        except BaseException:
            if child is not None:
                child.cancel()  # a failed start leaves no loader process behind
            raise

    def _start(self, args: EngineArgs, loaded: Any, child: Any, t0: float) -> None:
        from jaxvllm.engine.setup import build_runner, load
        pending_tokenizer = None
        self.tokenizer_origin = "given"  # with `loaded`; else where PendingTokenizer found it
        if child is not None:
            loaded = load(args)
            pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="jaxvllm-tokenizer")
            pending_tokenizer = pool.submit(lambda: (child.result(), time.perf_counter() - t0))
            pool.shutdown(wait=False)
        self.loaded = loaded
        self.load_seconds = time.perf_counter() - t0  # weights and config
        self.model_config = self.loaded.config
        self.runner, self.max_model_len, sched_cfg = build_runner(args, self.loaded, self.devices)
        if pending_tokenizer is not None and pending_tokenizer.done():
            pending_tokenizer.result()  # a tokenizer that failed already: say so before compiling
        self.scheduler = Scheduler(sched_cfg)
        self._parents: dict[str, _Parent] = {}
        # Dispatched steps not yet collected, oldest first: (SchedulerOutput, runner handle).
        self._inflight: collections.deque[tuple[Any, Any]] = collections.deque()
        self._speculative = args.speculative_config is not None
        self._stats_log = _StatsLogger()
        self._weight_update: Optional[set[str]] = None  # names updated since start_weight_update
        self._child_to_parent: dict[str, tuple[_Parent, _Child]] = {}
        from jaxvllm.engine.multihost import LeaderRunner, startup_phase
        startup_phase("compiling")  # multi-host: named if another rank is lost meanwhile
        self.compile_seconds = self.runner.warmup() if args.compiles_at_start() else 0.0
        if args.nnodes > 1:  # the other ranks replay every runner call (engine/multihost.py)
            self.runner = LeaderRunner(self.runner, args)
        if pending_tokenizer is not None:
            t_wait = time.perf_counter()
            self.loaded.tokenizer, self.loaded.seconds["tokenizer"] = pending_tokenizer.result()
            self.tokenizer_origin = child.origin
            self.loaded.seconds["tokenizer_wait"] = time.perf_counter() - t_wait
        self.tokenizer = self.loaded.tokenizer
        self.eos_token_id = getattr(self.tokenizer, "eos_token_id", None)
        self.preparer = RequestPreparer(self.tokenizer, self.model_config.vocab_size,
                                        self.max_model_len, args.max_logprobs, self.eos_token_id,
                                        _generation_eos_ids(self.loaded.generation_config),
                                        self._load_lora if args.enable_lora else None)
        self.default_sampling = generation_sampling_defaults(self.loaded.generation_config)
        freeze_startup_heap()

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> "LLMEngine":
        return cls(args)

    # ---- requests ----------------------------------------------------------------------------
    def _is_running(self, request_id: str) -> bool:
        return request_id in self._parents

    def admit_request(self, parent: _Parent) -> None:
        self._check_can_generate()
        if parent.lora_request is not None:  # read when prepared, unless a front prepared it
            self._load_lora(parent.lora_request)
        p = parent.params
        for c in parent.children:
            c.detok = IncrementalDetokenizer(self.tokenizer, p, parent.prompt_token_ids)
            child_params = p
            if p.n > 1 and p.seed is not None:
                # As vLLM: distinct but reproducible streams for the n samples of a seeded request.
                child_params = p.clone()
                child_params.seed = p.seed + c.index
            lora = parent.lora_request
            lora_id = 0 if lora is None else lora.lora_int_id
            c.request = Request(c.request_id, parent.prompt_token_ids, child_params,
                                self.eos_token_id, arrival_time=parent.metrics["arrival_time"],
                                cache_salt=lora_cache_salt(lora_id), lora_id=lora_id)
            if parent.grammar is not None:
                c.request.grammar = self.preparer.grammars.matcher(parent.grammar)
            elif p.allowed_token_ids:
                c.request.grammar = TokenMask(p.allowed_token_ids, self.model_config.vocab_size)
            elif parent.bad_words:
                c.request.grammar = BadWords(parent.bad_words, self.model_config.vocab_size)
            self.scheduler.add_request(c.request)
            self._child_to_parent[c.request_id] = (parent, c)
        self._parents[parent.request_id] = parent

    def abort_request(self, request_id: str | list[str]) -> None:
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        for rid in ids:
            parent = self._parents.pop(rid, None)
            if parent is None:
                continue
            child_ids = [c.request_id for c in parent.children]
            self.scheduler.finish_requests(child_ids, RequestStatus.FINISHED_ABORTED)
            for cid in child_ids:
                self._child_to_parent.pop(cid, None)

    def _load_lora(self, lora: LoRARequest) -> None:
        """The adapter's weights on the host, read once per lora_int_id (the runner puts them in a
        device slot when a step needs them)."""
        from jaxvllm.lora.peft import read_adapter
        slots = self.runner.lora
        known = slots.adapters.get(lora.lora_int_id)
        adapter = read_adapter(lora, self.model_config, slots.rank, known and known[0])
        if adapter is not None:
            self.runner.add_lora(lora.lora_int_id, lora.lora_path, adapter)

    def retract_requests(self) -> list[RequestOutput]:
        """Ends every unfinished request now (pause_generation without waiting): each one's
        output so far, finished, its unfinished sequences with finish_reason "abort". The step in
        flight is collected first, so the engine is idle after (weights may change)."""
        outs = self._collect_inflight(keep=0)
        for parent in self._parents.values():
            for c in parent.children:
                if c.finish_reason is None:
                    c.finish_reason = "abort"
            outs.append(self._make_output(parent, finished=True))
        self.abort_request(list(self._parents))
        return outs

    def reset_prefix_cache(self) -> None:
        self.scheduler.reset_prefix_cache()

    def has_unfinished_requests(self) -> bool:
        return bool(self._parents)

    def get_num_unfinished_requests(self) -> int:
        return len(self._parents)

    # ---- the step ----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One scheduler step. With async scheduling the next step is dispatched before the
        previous one's samples are collected, so outputs trail the device by one step."""
        if self._parents:
            self._check_can_generate()
        # Speculative guesses come from the tokens of the step before: a step that verifies some
        # is scheduled with no step in flight (its guesses made anew from them) and collected at
        # once; the others overlap as usual.
        guessing = self._speculative and self.scheduler.has_guesses()
        overlap = self.args.async_scheduling and not guessing
        # Normally nothing here with overlap; more when a collect was cut short (Ctrl-C while
        # waiting for the device): that step stays queued and is collected now, so the scheduler
        # never runs with more than one step on the device.
        outputs = self._collect_inflight(keep=1 if overlap else 0)
        if guessing:
            overlap = self.args.async_scheduling and not self.scheduler.has_guesses()
        scheduler_output = self.scheduler.schedule()
        try:
            now = time.monotonic()
            for new_req in scheduler_output.new_reqs:  # a request is first scheduled as a new one
                parent_child = self._child_to_parent.get(new_req.req_id)
                if parent_child and parent_child[0].metrics["first_scheduled_time"] is None:
                    parent_child[0].metrics["first_scheduled_time"] = now
            handle = self.runner.dispatch(scheduler_output)
        except BaseException:  # Ctrl-C too: the caller may go on using the engine
            self._discard_step(scheduler_output)
            raise
        if handle is not None:
            self._inflight.append((scheduler_output, handle))
        # The step just dispatched overlaps the collection of the one before (nothing to overlap
        # when nothing was dispatched).
        outputs += self._collect_inflight(keep=1 if overlap and handle is not None else 0)
        if not self._parents:
            outputs += self._collect_inflight(keep=0)  # nothing left to overlap with
        return outputs

    def _discard_step(self, scheduler_output: Any) -> None:
        """A step that failed to dispatch may have written none of its K/V: its requests fail
        (with all their n samples) and its prefix-cache entries go, so no later prompt reads them."""
        parents = set()
        for req in self.scheduler.discard_step(scheduler_output):
            parent_child = self._child_to_parent.get(req.request_id)
            if parent_child is not None:
                parents.add(parent_child[0].request_id)
        self.abort_request(list(parents))

    def _collect_inflight(self, keep: int) -> list[RequestOutput]:
        """Collects the oldest dispatched steps until `keep` are left. A step leaves the queue only
        once the runner has its samples, so an interrupted wait loses nothing."""
        outputs: list[RequestOutput] = []
        while len(self._inflight) > keep:
            self._give_grammar_bitmask()
            scheduler_output, handle = self._inflight[0]
            try:
                runner_out = self.runner.collect(handle)
            except BaseException:
                if handle.launch_failed:  # as a step that failed to dispatch
                    self._inflight.popleft()
                    self._discard_step(scheduler_output)
                raise
            self._inflight.popleft()
            if not self.args.disable_log_stats:
                self._stats_log.record(scheduler_output, runner_out, self.scheduler)
            core_outputs = self.scheduler.update_from_output(scheduler_output, runner_out)
            outputs += self._process(core_outputs)
        self._give_grammar_bitmask()  # the step left in flight samples while the host goes on
        return outputs

    def _give_grammar_bitmask(self) -> None:
        """Structured outputs: the oldest step in flight gets its grammar masks, which need the
        tokens of every step before it (all collected now). Its forward pass already runs; its
        sampler waits for them."""
        if not self._inflight:
            return
        scheduler_output, handle = self._inflight[0]
        if not handle.needs_grammar_bitmask:
            return
        try:
            rows = self.scheduler.grammar_bitmask(scheduler_output)
        except BaseException:
            self.runner.set_grammar_bitmask(handle, None)  # the step fails instead of waiting
            raise
        self.runner.set_grammar_bitmask(handle, rows)

    def _process(self, core_outs: list[EngineCoreOutput]) -> list[RequestOutput]:
        touched: dict[str, _Parent] = {}
        stopped: list[str] = []
        now = time.monotonic()
        for co in core_outs:
            parent_child = self._child_to_parent.get(co.req_id)
            if parent_child is None:
                continue
            parent, child = parent_child
            touched[parent.request_id] = parent
            if parent.failed:
                continue
            try:
                if self._apply(parent, child, co, now):
                    stopped.append(co.req_id)
            except Exception:
                # A fault of this request's own (e.g. its detokenization) fails it alone.
                logger.exception("request %s failed while processing its output; it is finished "
                                 "with finish_reason 'error', the engine goes on",
                                 parent.request_id)
                self._fail(parent)
        if stopped:
            self.scheduler.finish_requests(stopped, RequestStatus.FINISHED_STOPPED)
        outputs = []
        for parent in touched.values():
            finished = parent.finished
            if finished:
                parent.metrics["finished_time"] = now
                self._parents.pop(parent.request_id, None)
                for c in parent.children:
                    self._child_to_parent.pop(c.request_id, None)
            elif parent.params.output_kind == RequestOutputKind.FINAL_ONLY:
                continue
            outputs.append(self._make_output(parent, finished))
        return outputs

    def _apply(self, parent: _Parent, child: _Child, co: EngineCoreOutput, now: float) -> bool:
        """One step's output of one sequence; True when a stop string ended it (the scheduler
        still has it)."""
        stopped = False
        parent.num_cached_tokens = max(parent.num_cached_tokens, co.num_cached_tokens)
        if co.new_prompt_logprobs is not None and child.index == 0:
            self._add_decoded(co.new_prompt_logprobs)
            parent.prompt_logprobs.extend(co.new_prompt_logprobs)
        if co.new_token_ids:
            if parent.metrics["first_token_time"] is None:
                parent.metrics["first_token_time"] = now
            if co.new_logprobs is not None and child.logprobs is not None:
                self._add_decoded(co.new_logprobs)
                child.logprobs.extend(co.new_logprobs)
                child.cumulative_logprob += sum(entry[tok].logprob for tok, entry
                                                in zip(co.new_token_ids, co.new_logprobs))
            text_ids = co.new_token_ids
            if (co.finish_reason == "stop" and not parent.params.include_stop_str_in_output
                    and text_ids[-1] in child.request.stop_ids):
                text_ids = text_ids[:-1]  # as vLLM: a stop token's text is not part of the output
            if child.detok.update(text_ids, child.request.num_output_tokens):
                child.finish_reason, child.stop_reason = "stop", child.detok.stop_reason
                stopped = co.finish_reason is None
        if co.finish_reason is not None and child.finish_reason is None:
            child.finish_reason, child.stop_reason = co.finish_reason, co.stop_reason
        return stopped

    def _fail(self, parent: _Parent) -> None:
        """Finishes every unfinished sequence of `parent` with finish_reason "error" and frees them."""
        parent.failed = True
        live = [c for c in parent.children if c.finish_reason is None]
        for c in live:
            c.finish_reason, c.stop_reason = "error", None
        self.scheduler.finish_requests([c.request_id for c in live], RequestStatus.FINISHED_ABORTED)

    def _add_decoded(self, entries: list[Optional[dict[int, Logprob]]]) -> None:
        if self.tokenizer is None:
            return
        for entry in entries:
            for tid, lp in (entry or {}).items():
                lp.decoded_token = self.tokenizer.decode([tid])

    def _make_output(self, parent: _Parent, finished: bool) -> RequestOutput:
        # DELTA: each list is a fresh slice of what is new, so the step thread's work per output is
        # what the step added, not everything so far (cumulative outputs copy O(length) per step).
        delta = parent.params.output_kind == RequestOutputKind.DELTA
        outs = []
        for c in parent.children:
            # A failed request's text is what was decoded before the fault (its detokenizer may be
            # what failed).
            text = c.detok.text if parent.failed else c.detok.output_text(c.finish_reason is not None)
            start, tstart = (c.sent_tokens, c.sent_text) if delta else (0, 0)
            outs.append(CompletionOutput(
                index=c.index, text=text[tstart:], token_ids=c.request.output_token_ids[start:],
                cumulative_logprob=c.cumulative_logprob,
                logprobs=None if c.logprobs is None else c.logprobs[start:],
                finish_reason=c.finish_reason, stop_reason=c.stop_reason))
            c.sent_tokens, c.sent_text = c.request.num_output_tokens, len(text)
        prompt_logprobs = parent.prompt_logprobs
        if prompt_logprobs is not None:
            prompt_logprobs = prompt_logprobs[parent.sent_prompt_logprobs if delta else 0:]
            parent.sent_prompt_logprobs = len(parent.prompt_logprobs)
        return RequestOutput(parent.request_id, parent.prompt, parent.prompt_token_ids,
                             prompt_logprobs, outs, finished, parent.num_cached_tokens,
                             dict(parent.metrics))

    def get_stats(self) -> SchedulerStats:
        return self.scheduler.stats

    def startup_info(self) -> dict:
        """Start-up figures (benchmarks; a data-parallel replica reports its own to the front)."""
        import jax

        from jaxvllm.engine.setup import param_bytes
        d, n = (self.devices or jax.devices())[0], self.args.tensor_parallel_size
        return {"num_blocks": self.runner.num_blocks, "kv_sizing_s": self.runner.kv_sizing_seconds,
                "load_s": self.load_seconds, "compile_s": self.compile_seconds,
                "seconds": dict(self.loaded.seconds),
                "programs": self.runner.program_summary(),
                "from_cache": getattr(self.loaded, "from_cache", None),
                "param_bytes": param_bytes(self.loaded.params),
                "device": f"{jax.default_backend()}:{getattr(d, 'device_kind', str(d))} x{n}"}

    def replica_stats(self) -> list[SchedulerStats]:
        """Per data-parallel replica: this engine is the only one."""
        return [self.scheduler.stats]

    def update_weights(self, params: Any, reset_prefix_cache: bool = True) -> None:
        """See LLM.update_weights."""
        from jaxvllm.engine.weights import keep_cache_scales, to_engine_layout
        from jaxvllm.models.requant import in_layout, layers_like
        check_idle("update_weights", self.has_unfinished_requests())
        if self._weight_update is not None:
            self._update_weight_chunk(params)
            return
        params = to_engine_layout(params, self.loaded.config, "auto")
        if self.runner.params is not None:  # asleep: the runner says so below
            params = keep_cache_scales(params, self.runner.params)
        if (self.args.quantization is not None and self.runner.params is not None
                and not in_layout(params, self.runner.params)):  # quantized as the loaded ones
            for chunk in layers_like(params, self.runner.params, self.loaded.config):
                self.runner.update_named_weights(chunk)
        else:
            self.runner.update_weights(params)
        self.loaded.params = self.runner.params
        if reset_prefix_cache:
            self.scheduler.reset_prefix_cache()

    def start_weight_update(self) -> None:
        """See LLM.start_weight_update."""
        check_idle("start_weight_update", self.has_unfinished_requests())
        if self._weight_update is not None:
            raise RuntimeError("a weight update is already in progress (finish_weight_update())")
        self._weight_update = set()

    def finish_weight_update(self, reset_prefix_cache: bool = True) -> None:
        """See LLM.finish_weight_update."""
        if self._weight_update is None:
            raise RuntimeError("finish_weight_update without start_weight_update")
        self._weight_update = None
        if reset_prefix_cache:
            self.scheduler.reset_prefix_cache()

    def _update_weight_chunk(self, chunk: Any) -> None:
        """Weights by name ("embed", "layers.3.q", ...) in the engine's layout, in place; a
        quantized model's quantized ones arrive in the model's dtype and are quantized here (an
        int4 or int8 model's fused q/k/v and gate/up from their parts, sent in one chunk)."""
        from jaxvllm.models.requant import quantize_named_like
        check_chunk(chunk)
        named = dict(chunk)
        if self.args.quantization is not None and self.runner.params is not None:
            named = quantize_named_like(named, self.runner.params, self.loaded.config)
        self.runner.update_named_weights(named)
        self._weight_update.update(chunk)

    def sleep(self, level: int = 1) -> None:
        """See LLM.sleep."""
        check_sleep_level(level)
        check_idle("sleep", self.has_unfinished_requests())
        self.scheduler.reset_prefix_cache()  # the cached K/V are dropped with the cache
        self.runner.sleep(level)
        self.loaded.params = None  # the runner's were the only other reference

    def wake_up(self, tags: Optional[Sequence[str]] = None) -> None:
        """See LLM.wake_up."""
        self.runner.wake_up(wake_tags(tags))
        self.loaded.params = self.runner.params

    def is_sleeping(self) -> bool:
        return self.runner.is_sleeping

    def _check_can_generate(self) -> None:
        check_can_generate(self.runner.is_sleeping, self._weight_update is not None)


class _StatsLogger:
    """vLLM-style periodic log line: prompt/generation throughput, queue and KV-cache state."""
    INTERVAL_S = 5.0

    def __init__(self) -> None:
        self.last = time.monotonic()
        self.prompt_tokens = 0
        self.generated_tokens = 0

    def record(self, scheduler_output: Any, runner_out: Any, scheduler: Scheduler) -> None:
        self.generated_tokens += sum(map(len, runner_out.sampled_token_ids.values()))
        starts = [(new_req.req_id, new_req.num_computed_tokens,
                   len(new_req.prompt_token_ids) + len(new_req.output_token_ids))
                  for new_req in scheduler_output.new_reqs]
        for c in scheduler_output.cached_reqs:
            req = scheduler.get_request(c.req_id)
            if req is not None:
                starts.append((c.req_id, c.num_computed_tokens, req.num_prompt_tokens))
        for rid, start, prompt_len in starts:  # prompt positions computed this step
            end = min(start + scheduler_output.num_scheduled_tokens[rid], prompt_len)
            self.prompt_tokens += max(0, end - start)
        now = time.monotonic()
        if now - self.last < self.INTERVAL_S:
            return
        dt, self.last = now - self.last, now
        s = scheduler.stats
        logger.info("prompt throughput %.1f tok/s, generation throughput %.1f tok/s, running %d, "
                    "waiting %d, KV cache usage %.1f%%, prefix cache hit rate %.1f%%",
                    self.prompt_tokens / dt, self.generated_tokens / dt, s.num_running,
                    s.num_waiting, 100 * s.kv_cache_usage, 100 * s.prefix_cache_hit_rate)
        self.prompt_tokens = self.generated_tokens = 0


# generation_config.json keys that set sampling defaults (vLLM's generation_config="auto"), with
# transformers' GenerationConfig defaults: a key at its default value sets nothing, as in vLLM
# (which reads the config's diff against those defaults).
_GENERATION_KEYS = {"temperature": ("temperature", 1.0), "top_p": ("top_p", 1.0),
                    "top_k": ("top_k", 50), "min_p": ("min_p", None),
                    "repetition_penalty": ("repetition_penalty", 1.0),
                    "max_new_tokens": ("max_tokens", None)}


def generation_sampling_defaults(gen_config: Optional[dict]) -> dict:
    """SamplingParams keywords the model's generation config sets (checked here, so a bad config
    fails at start-up naming the field, not on every request)."""
    g = gen_config or {}
    out = {ours: g[key] for key, (ours, hf_default) in _GENERATION_KEYS.items()
           if g.get(key) is not None and g[key] != hf_default}
    try:
        SamplingParams(**out)
    except ValueError as e:
        raise ValueError(f"generation_config.json: {e}") from None
    return out


def _generation_eos_ids(gen_config: Optional[dict]) -> set[int]:
    eos = (gen_config or {}).get("eos_token_id")
    if eos is None:
        return set()
    return set(eos) if isinstance(eos, (list, tuple)) else {eos}


def check_text(text: str, name: str) -> str:
    """`text`, if it is valid Unicode: a lone UTF-16 surrogate (from a JSON escape or Python) is
    text no tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{name} is not valid Unicode text: a lone surrogate "
                         f"{text[e.start]!r} at index {e.start}") from None
    return text


def is_token_ids(x: Any) -> bool:
    """Whether `x` is one sequence of token ids rather than a batch of prompts: an array (numpy,
    JAX, anything numpy can view), or a list or tuple whose first item is an integer."""
    return hasattr(x, "__array__") or (isinstance(x, (list, tuple)) and bool(x)
                                       and isinstance(x[0], (int, np.integer)))


def as_token_ids(ids: Any, name: str, vocab_size: int) -> list[int]:
    """`ids` (a list or tuple of Python or numpy ints, or a 1-D integer numpy/JAX array) as a
    non-empty list of Python ints in [0, vocab_size); `name` is the field a bad value is reported
    as. Every way token ids come in goes through here once, so past it the engine sees Python ints
    only (numpy ints would leak into outputs, block hashes and JSON responses)."""
    if hasattr(ids, "__array__"):  # a JAX array is copied to the host here
        arr = np.asarray(ids)
        if arr.ndim != 1:
            raise ValueError(f"{name} must be a 1-D array of token ids, got shape {arr.shape}")
        if not np.issubdtype(arr.dtype, np.integer):  # bool is not an integer dtype to numpy
            raise TypeError(f"{name} must have an integer dtype, got {arr.dtype}")
        ids = arr.tolist()
    elif isinstance(ids, (list, tuple)):
        if all(type(t) is int for t in ids):  # the usual case, in one pass (a bool is not an int)
            ids = list(ids)
        else:
            # bool is an int to Python, but never a token id.
            wrong = [t for t in ids if not isinstance(t, (int, np.integer)) or isinstance(t, bool)]
            if wrong:
                raise TypeError(f"{name} must hold integers, got {type(wrong[0]).__name__} "
                                f"{wrong[0]!r}")
            ids = [int(t) for t in ids]
    else:
        raise TypeError(f"{name} must be a list of ints or a 1-D integer array, got "
                        f"{type(ids).__name__}")
    if not ids:
        raise ValueError(f"{name} is empty")
    if min(ids) < 0 or max(ids) >= vocab_size:
        bad = [t for t in ids if not 0 <= t < vocab_size]
        raise ValueError(f"{name} must be ids in [0, {vocab_size}); got {bad[:5]!r}")
    return ids
