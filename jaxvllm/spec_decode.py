"""Speculative decoding's configuration (vLLM's `speculative_config`) and the prompt-lookup proposer.

Two ways to guess a request's next tokens: "ngram" finds its latest tokens earlier in its own
context and copies what followed them there (host-only, here); "draft_model" runs a smaller model
of the same vocabulary greedily on the device (worker/drafter.py). Either way the engine then
computes the request's last token and the guesses in one step, and the sampler keeps the guesses
the target model agrees with (worker/sampler.py: greedy output is unchanged token for token;
sampled output keeps the target distribution), plus one token of its own.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

METHODS = ("ngram", "draft_model")
_NGRAM_KEYS = ("prompt_lookup_max", "prompt_lookup_min")


@dataclass(frozen=True)
class SpeculativeConfig:
    """vLLM's `speculative_config` keys for the "ngram" and "draft_model" methods."""
    method: str = "ngram"
    num_speculative_tokens: int = 4     # most guesses verified per step
    # ngram: the suffix lengths looked up; as vLLM: 5 when neither is given, one given sets the other.
    prompt_lookup_max: int = 5
    prompt_lookup_min: int = 5
    # draft_model: the draft's HF directory or .gguf file (loaded as the target's load_format and
    # dtype: dummy weights for a dummy target).
    model: Optional[str] = None

    @classmethod
    def from_dict(cls, d: Any) -> Optional["SpeculativeConfig"]:
        """None for None; ValueError/TypeError naming the key for anything else malformed."""
        if d is None:
            return None
        if not isinstance(d, dict):
            raise TypeError(f"speculative_config must be a dict, got {type(d).__name__}")
        unknown = set(d) - {"method", "model", "num_speculative_tokens", *_NGRAM_KEYS}
        if unknown:
            raise ValueError(f"speculative_config: unsupported key(s) {sorted(unknown)} (supported: "
                             f"method, model, num_speculative_tokens, prompt_lookup_max, "
                             f"prompt_lookup_min)")
        model = d.get("model")
        # As vLLM infers it: a model named "ngram" is prompt lookup, any other a draft model.
        method = d.get("method") or ("ngram" if model in (None, "ngram", "[ngram]")
                                     else "draft_model")
        if method not in METHODS:
            raise ValueError(f"speculative_config.method must be one of {METHODS}, got {method!r}")
        if method == "draft_model":
            if not isinstance(model, str) or not model:
                raise ValueError("speculative_config.model (the draft model's path) is required "
                                 f"for method 'draft_model', got {model!r}")
            ngram_keys = sorted(set(d) & set(_NGRAM_KEYS))
            if ngram_keys:
                raise ValueError(f"speculative_config: {ngram_keys} are for method 'ngram', not "
                                 "'draft_model'")
        elif model not in (None, "ngram", "[ngram]"):
            raise ValueError(f"speculative_config.model is the draft model of method "
                             f"'draft_model'; method 'ngram' takes none, got {model!r}")
        if "num_speculative_tokens" not in d:
            raise ValueError("speculative_config.num_speculative_tokens is required")
        for name in ("num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min"):
            v = d.get(name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ValueError(f"speculative_config.{name} must be a positive int, got {v!r}")
        lo, hi = d.get("prompt_lookup_min"), d.get("prompt_lookup_max")
        lo, hi = (lo if lo is not None else hi if hi is not None else cls.prompt_lookup_min,
                  hi if hi is not None else lo if lo is not None else cls.prompt_lookup_max)
        cfg = cls(method, d["num_speculative_tokens"], hi, lo,
                  model if method == "draft_model" else None)
        if cfg.prompt_lookup_min > cfg.prompt_lookup_max:
            raise ValueError(f"speculative_config.prompt_lookup_min ({cfg.prompt_lookup_min}) must "
                             f"not exceed prompt_lookup_max ({cfg.prompt_lookup_max})")
        return cfg

    @property
    def num_lookahead_tokens(self) -> int:
        """KV slots a request needs past its scheduled tokens: a draft model writes its guesses'
        K/V there while guessing (vLLM's name)."""
        return self.num_speculative_tokens if self.method == "draft_model" else 0

    def index(self) -> "NgramIndex":
        return NgramIndex(self.prompt_lookup_min, self.prompt_lookup_max)

    def propose(self, index: "NgramIndex", limit: int) -> list[int]:
        """Up to min(num_speculative_tokens, limit) guesses for what follows `index`'s tokens."""
        return index.propose(min(self.num_speculative_tokens, limit))


class NgramIndex:
    """A request's tokens and the first position of each of their n-grams (min_n <= n <= max_n),
    kept up to date as tokens are appended, so that a proposal costs a few dict lookups instead of
    a scan of the request's tokens every step (measured on one CPU core: a numpy scan of 1k tokens
    0.34 ms, 87 ms a step at batch 256; appending a token and proposing 8 us)."""

    def __init__(self, min_n: int, max_n: int) -> None:
        self.min_n, self.max_n = min_n, max_n
        self.tokens: list[int] = []
        self._first: list[dict[tuple[int, ...], int]] = [{} for _ in range(max_n - min_n + 1)]

    def extend(self, token_ids: Sequence[int]) -> None:
        toks, first, lo = self.tokens, self._first, self.min_n
        for t in token_ids:
            toks.append(t)
            end = len(toks)
            for n in range(lo, min(self.max_n, end) + 1):
                first[n - lo].setdefault(tuple(toks[end - n:]), end - n)

    def propose(self, k: int) -> list[int]:
        """The up to `k` tokens that followed the earliest earlier occurrence of the longest suffix
        of length in [min_n, max_n] (vLLM's rule); [] when no such suffix occurred before."""
        toks = self.tokens
        size = len(toks)
        if k < 1:
            return []
        for n in range(min(self.max_n, size - 1), self.min_n - 1, -1):
            start = self._first[n - self.min_n].get(tuple(toks[size - n:]))
            if start is not None and start < size - n:  # not the suffix itself
                return toks[start + n:start + n + k]
        return []
