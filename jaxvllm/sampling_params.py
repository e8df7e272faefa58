"""SamplingParams: the same fields, defaults and validation as vLLM's offline API."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Optional

GREEDY_EPS = 1e-5  # a temperature below this is greedy (the sampler uses the same)


class RequestOutputKind(enum.IntEnum):
    """What each RequestOutput of a request holds (vLLM's names)."""
    CUMULATIVE = 0   # everything so far, every step
    DELTA = 1        # only what is new since the request's previous output
    FINAL_ONLY = 2   # one output, when the request finishes


# Stop strings are searched on every step and stop ids are masked in the sampler (with min_tokens),
# whose compiled width follows their count: both are bounded per request.
MAX_STOP = 64
# logit_bias entries per request: OpenAI's limit, and the static width of the device's bias rows.
MAX_LOGIT_BIAS = 300


@dataclass(kw_only=True)
class StructuredOutputsParams:
    """What a request's output must be (vLLM's names); exactly one field is set.

    json: a JSON schema (a dict or its JSON text); json_object: any JSON object; regex: a regular
    expression the whole output matches; choice: one of these strings; grammar: a context-free
    grammar, in Lark syntax (llguidance's) or GBNF (llama.cpp's, `root ::= ...`)."""
    json: Optional[str | dict] = None
    regex: Optional[str] = None
    choice: Optional[list[str]] = None
    grammar: Optional[str] = None
    json_object: Optional[bool] = None

    def __post_init__(self) -> None:
        given = [name for name in ("json", "regex", "choice", "grammar", "json_object")
                 if getattr(self, name) not in (None, False)]
        if len(given) != 1:
            raise ValueError(f"structured_outputs must set exactly one of json, regex, choice, "
                             f"grammar, json_object; got {given or 'none'}")
        kinds = {"json": (str, dict), "regex": str, "grammar": str, "json_object": bool}
        name = given[0]
        if name == "choice":
            if not (isinstance(self.choice, (list, tuple)) and self.choice
                    and all(isinstance(c, str) and c for c in self.choice)):
                raise ValueError("structured_outputs.choice must be a non-empty list of non-empty "
                                 "strings")
            self.choice = list(self.choice)
        elif not isinstance(getattr(self, name), kinds[name]):
            raise ValueError(f"structured_outputs.{name} must be a "
                             f"{' or '.join(t.__name__ for t in _tuple(kinds[name]))}, got "
                             f"{type(getattr(self, name)).__name__}")

    @property
    def kind(self) -> str:
        return next(name for name in ("json", "regex", "choice", "grammar", "json_object")
                    if getattr(self, name) not in (None, False))


def _tuple(t: type | tuple) -> tuple:
    return t if isinstance(t, tuple) else (t,)


@dataclass(kw_only=True)
class SamplingParams:
    n: int = 1
    best_of: Optional[int] = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: Optional[int] = None
    stop: Optional[str | list[str]] = None
    stop_token_ids: Optional[list[int]] = None
    ignore_eos: bool = False
    max_tokens: Optional[int] = 16
    min_tokens: int = 0
    logprobs: Optional[int] = None
    prompt_logprobs: Optional[int] = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    priority: int = 0
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    structured_outputs: Optional[StructuredOutputsParams] = None
    logit_bias: Optional[dict[int, float]] = None   # token id -> added to its logit, in [-100, 100]
    allowed_token_ids: Optional[list[int]] = None   # only these may be sampled
    bad_words: Optional[list[str]] = None           # words never generated (vLLM's)
    # stop_token_ids, and at admission the tokenizer's EOS and the generation config's extra EOS
    # ids (the engine adds them): what min_tokens masks. Not a constructor argument.
    all_stop_token_ids: set[int] = field(default_factory=set, init=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = _as_list(self.stop, "stop", "a string or a list of strings")
        self.stop_token_ids = _as_list(self.stop_token_ids, "stop_token_ids", "a list of ints")
        if self.top_k is None:
            self.top_k = 0
        if self.best_of is None:
            self.best_of = self.n
        if self.seed == -1:
            self.seed = None  # as vLLM: -1 means "no seed"
        self._validate()
        self.top_k = max(self.top_k, 0)  # -1 and 0 both mean "all tokens", as in vLLM
        if self.temperature < GREEDY_EPS:
            # Greedy: the other sampling knobs are irrelevant, as in vLLM.
            self.top_p, self.top_k, self.min_p = 1.0, 0, 0.0
        self.all_stop_token_ids = set(self.stop_token_ids)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPS

    @property
    def has_penalties(self) -> bool:
        return (self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or self.repetition_penalty != 1.0)

    def _validate(self) -> None:
        def check(cond: bool, name: str, msg: str) -> None:
            if not cond:
                raise ValueError(f"{name} {msg}")

        def is_int(v: object) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v: object) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool)

        for name in ("n", "top_k", "min_tokens"):
            if not is_int(getattr(self, name)):
                raise ValueError(f"{name} must be an int, got {type(getattr(self, name)).__name__}")
        for name in ("ignore_eos", "skip_special_tokens", "spaces_between_special_tokens",
                     "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {type(getattr(self, name)).__name__}")
        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
                     "repetition_penalty"):
            if not is_num(getattr(self, name)):
                raise ValueError(f"{name} must be a number, got {type(getattr(self, name)).__name__}")
        check(self.n >= 1, "n", f"must be at least 1, got {self.n}.")
        # Kept for vLLM compatibility; like vLLM's V1 engine, only best_of == n is supported.
        check(is_int(self.best_of) and self.best_of == self.n, "best_of",
              f"({self.best_of!r}) != n ({self.n}) is not supported.")
        check(self.top_k >= -1, "top_k", f"must be -1 or 0 (all tokens) or at least 1, got {self.top_k}.")
        check(self.temperature >= 0.0, "temperature", f"must be non-negative, got {self.temperature}.")
        check(0.0 < self.top_p <= 1.0, "top_p", f"must be in (0, 1], got {self.top_p}.")
        check(0.0 <= self.min_p <= 1.0, "min_p", f"must be in [0, 1], got {self.min_p}.")
        check(-2.0 <= self.presence_penalty <= 2.0, "presence_penalty",
              f"must be in [-2, 2], got {self.presence_penalty}.")
        check(-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty",
              f"must be in [-2, 2], got {self.frequency_penalty}.")
        check(self.repetition_penalty > 0.0, "repetition_penalty",
              f"must be greater than zero, got {self.repetition_penalty}.")
        if self.max_tokens is not None:
            check(is_int(self.max_tokens) and self.max_tokens >= 1, "max_tokens",
                  f"must be at least 1, got {self.max_tokens}.")
        check(self.min_tokens >= 0, "min_tokens", f"must be non-negative, got {self.min_tokens}.")
        if self.max_tokens is not None:
            check(self.min_tokens <= self.max_tokens, "min_tokens",
                  f"must be less than or equal to max_tokens={self.max_tokens}, got {self.min_tokens}.")
        if self.seed is not None:
            check(is_int(self.seed), "seed", f"must be an int, got {self.seed!r}.")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None:
                check(is_int(v) and v >= 0, name, f"must be a non-negative int, got {v!r}.")
        check(all(isinstance(s, str) and s for s in self.stop), "stop",
              "must be a string or a list of non-empty strings.")
        check(len(self.stop) <= MAX_STOP, "stop", f"may hold at most {MAX_STOP} strings, got "
              f"{len(self.stop)}.")
        check(all(is_int(t) and t >= 0 for t in self.stop_token_ids), "stop_token_ids",
              "must be a list of non-negative ints.")
        check(len(self.stop_token_ids) <= MAX_STOP, "stop_token_ids",
              f"may hold at most {MAX_STOP} ids, got {len(self.stop_token_ids)}.")
        check(is_int(self.priority), "priority", f"must be an int, got {self.priority!r}.")
        check(isinstance(self.output_kind, RequestOutputKind), "output_kind",
              f"must be a RequestOutputKind, got {self.output_kind!r}.")
        check(self.structured_outputs is None
              or isinstance(self.structured_outputs, StructuredOutputsParams), "structured_outputs",
              f"must be a StructuredOutputsParams, got {type(self.structured_outputs).__name__}.")
        if self.logit_bias is not None:
            check(isinstance(self.logit_bias, dict) and all(
                is_int(t) and t >= 0 and is_num(b) and -100.0 <= b <= 100.0
                for t, b in self.logit_bias.items()), "logit_bias",
                "must map non-negative int token ids to numbers in [-100, 100].")
            check(len(self.logit_bias) <= MAX_LOGIT_BIAS, "logit_bias",
                  f"may hold at most {MAX_LOGIT_BIAS} entries, got {len(self.logit_bias)}.")
        if self.allowed_token_ids is not None:
            check(isinstance(self.allowed_token_ids, (list, tuple)) and self.allowed_token_ids
                  and all(is_int(t) and t >= 0 for t in self.allowed_token_ids),
                  "allowed_token_ids", "must be a non-empty list of non-negative ints.")
            check(self.structured_outputs is None, "allowed_token_ids",
                  "cannot be combined with structured_outputs.")
        if self.bad_words is not None:
            check(isinstance(self.bad_words, (list, tuple))
                  and all(isinstance(w, str) and w for w in self.bad_words), "bad_words",
                  "must be a list of non-empty strings.")
            check(self.structured_outputs is None and self.allowed_token_ids is None, "bad_words",
                  "cannot be combined with structured_outputs or allowed_token_ids.")

    def clone(self) -> "SamplingParams":
        import copy
        return copy.deepcopy(self)


def _as_list(v: object, name: str, what: str) -> list:
    if v is None:
        return []
    if not isinstance(v, (list, tuple)):
        raise ValueError(f"{name} must be {what}, got {type(v).__name__}")
    return list(v)
