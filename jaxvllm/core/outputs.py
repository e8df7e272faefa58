"""The data that crosses the scheduler/model-runner boundary (vLLM v1's SchedulerOutput and
ModelRunnerOutput). The runner keeps its own per-request state (token history, block table, sampling
arrays): new requests arrive whole once, after that only deltas."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from jaxvllm.sampling_params import SamplingParams


@dataclass
class NewRequestData:
    """A request the runner has not seen (or must rebuild: resumed after preemption)."""
    req_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]        # tokens generated before a preemption (recomputed as prompt)
    sampling_params: SamplingParams
    block_ids: list[int]               # its whole block table
    num_computed_tokens: int           # tokens already in the cache (prefix-cache hit)
    lora_id: int = 0                   # its LoRA adapter's lora_int_id (0: none)


@dataclass
class CachedRequestData:
    """A request the runner already holds; only what changed."""
    req_id: str
    new_block_ids: list[int]           # appended to its block table
    num_computed_tokens: int           # before this step's tokens


@dataclass
class SchedulerOutput:
    new_reqs: list[NewRequestData]
    cached_reqs: list[CachedRequestData]
    # Batch order is this dict's insertion order: running requests first, then new ones.
    num_scheduled_tokens: dict[str, int]
    total_num_scheduled_tokens: int
    # Requests the runner must forget: finished or aborted since the last step, or preempted now.
    finished_req_ids: set[str] = field(default_factory=set)
    preempted_req_ids: set[str] = field(default_factory=set)
    # Requests with a grammar -> their first row of the step's masks (Scheduler.grammar_bitmask):
    # one row per token the request samples in the step, 1 + its scheduled guesses.
    grammar_rows: dict[str, int] = field(default_factory=dict)
    # Speculative decoding: the guessed tokens scheduled after a request's last token (counted in
    # its num_scheduled_tokens), verified in this step.
    scheduled_spec_decode_tokens: dict[str, list[int]] = field(default_factory=dict)


@dataclass
class ModelRunnerOutput:
    # The new tokens of each request whose scheduled tokens reached the end of its known tokens:
    # one, or with speculative decoding the accepted guesses and one more; requests in the middle
    # of a chunked prefill are absent.
    sampled_token_ids: dict[str, list[int]]
    # Opaque to the scheduler: passed through to the engine (logprobs: one entry per new token).
    logprobs: dict[str, list[Any]] = field(default_factory=dict)
    prompt_logprobs: dict[str, Any] = field(default_factory=dict)
    # Speculative decoding: guesses for the tokens after each request's new ones.
    spec_token_ids: dict[str, list[int]] = field(default_factory=dict)


@dataclass
class EngineCoreOutput:
    """What one step produced for one request."""
    req_id: str
    new_token_ids: list[int]
    finish_reason: Optional[str] = None    # "stop" | "length" | "abort"
    stop_reason: int | str | None = None   # the stop token id (or stop string, set by the engine)
    new_logprobs: Optional[list[Any]] = None   # one entry per new token
    new_prompt_logprobs: Any = None
    num_cached_tokens: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
