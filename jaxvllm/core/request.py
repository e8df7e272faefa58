"""A request as the scheduler sees it: token ids, progress, status."""
from __future__ import annotations

import enum
import time
from typing import Any, Optional

from jaxvllm.sampling_params import SamplingParams


class RequestStatus(enum.IntEnum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    PREEMPTED = enum.auto()
    # Everything from here on is finished.
    FINISHED_STOPPED = enum.auto()
    FINISHED_LENGTH = enum.auto()
    FINISHED_ABORTED = enum.auto()
    FINISHED_IGNORED = enum.auto()

    @property
    def finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED

    @property
    def finish_reason(self) -> Optional[str]:
        return _FINISH_REASON.get(self)


_FINISH_REASON = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.FINISHED_IGNORED: "length",
}


def lora_cache_salt(lora_int_id: int) -> Optional[str]:
    """The prefix-cache salt of a request under LoRA adapter `lora_int_id` (0: none): an adapter's
    K/V are its own."""
    return f"lora-{lora_int_id}" if lora_int_id else None


class Request:
    """One sequence to generate. `n > 1` is fanned out by the engine into n Requests sharing a prompt."""

    def __init__(self, request_id: str, prompt_token_ids: list[int], sampling_params: SamplingParams,
                 eos_token_id: Optional[int], arrival_time: Optional[float] = None,
                 cache_salt: Optional[str] = None, lora_id: int = 0) -> None:
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self.eos_token_id = eos_token_id
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.priority = sampling_params.priority
        self.cache_salt = cache_salt  # extra key mixed into the first block hash (e.g. a LoRA id)
        self.lora_id = lora_id  # its LoRA adapter's lora_int_id (0: none)
        self.status = RequestStatus.WAITING
        self.output_token_ids: list[int] = []
        self.num_computed_tokens = 0
        # Tokens scheduled for sampling whose ids have not come back yet (async scheduling: the next
        # step is scheduled while the current one runs, its decode input taken from the device).
        self.num_inflight = 0
        self.num_cached_tokens = -1  # prefix-cache hit (tokens) at first scheduling; -1 = not yet
        self.num_preemptions = 0
        self.stop_reason: int | str | None = None
        if sampling_params.max_tokens is None:
            # Resolving it is a policy of the caller's (vLLM's offline engine caps it at
            # max_model_len, its OpenAI server fills it up to there), not the scheduler's.
            raise ValueError(f"request {request_id!r}: sampling_params.max_tokens must be set")
        self.max_tokens = sampling_params.max_tokens
        sp = sampling_params
        # Ids that stop it once min_tokens are out: the stop ids, and EOS unless ignore_eos.
        self.stop_ids = (frozenset(sp.stop_token_ids) if sp.ignore_eos else
                         frozenset(sp.all_stop_token_ids | ({eos_token_id} - {None})))
        self.stop_reason_exempt_id = None if sp.ignore_eos else eos_token_id  # stops with reason None
        self.min_tokens = sp.min_tokens
        # Set by the scheduler at admission: the token count (prompt + output) that ends it.
        self.max_num_tokens = 0
        self.num_prompt_logprobs_sent = 0  # prompt positions whose logprobs were passed on
        # Speculative decoding: guesses for its next tokens, from the last step (scheduled in the next).
        self.spec_token_ids: list[int] = []
        # Structured outputs: the matcher of its grammar (jaxvllm.structured_output.Grammar, or a
        # TokenMask for allowed_token_ids), set at admission, advanced with each appended token.
        self.grammar: Optional[Any] = None
        # Bookkeeping owned by core/ (KV-cache manager and scheduler).
        self.block_hashes: list[bytes] = []  # chained hashes of its full blocks (prefix caching)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    def get_finish_reason(self) -> Optional[str]:
        return self.status.finish_reason
