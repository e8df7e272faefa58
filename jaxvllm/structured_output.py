"""Grammar-constrained decoding on the host, with llguidance: a request's StructuredOutputsParams
compiled into a grammar (checked when the request is prepared, cached by spec), one matcher per
sequence advanced with each accepted token, and the packed bitmask of the tokens its next sample may
take (`[rows, ceil(V/32)]` int32, bit j of word w allows token 32w + j), which the sampler applies.

llguidance rather than xgrammar (which vLLM and SGLang default to): xgrammar imports torch at run
time (its matcher fills torch tensors), and this engine's runtime never needs torch; llguidance is a
Rust library with no Python dependencies that fills numpy arrays.
"""
from __future__ import annotations

import json
import threading
from collections import OrderedDict
from typing import Any

import numpy as np

from jaxvllm.sampling_params import StructuredOutputsParams

# Compiled grammars kept per engine (a JSON schema's grammar is text of a few KiB).
GRAMMAR_CACHE_SIZE = 1024


def bitmask_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


class Grammar:
    """The matcher of one sequence."""
    __slots__ = ("_matcher", "bitmask_words")

    def __init__(self, matcher: Any, vocab_size: int) -> None:
        self._matcher = matcher
        self.bitmask_words = bitmask_words(vocab_size)

    @staticmethod
    def accept_all(grammar_tokens: list[tuple["Grammar", int]]) -> list[bool]:
        """Advance each grammar by its sampled token, in parallel; False where the grammar does not
        allow it."""
        return _executor().consume_token_par([(g._matcher, t) for g, t in grammar_tokens])

    @property
    def terminated(self) -> bool:
        """The output is complete (or the matcher failed): nothing but end-of-sequence may follow."""
        return self._matcher.is_stopped()

    def rollback(self, num_tokens: int) -> None:
        self._matcher.rollback(num_tokens)

    @staticmethod
    def fill_bitmasks(grammar_rows: list[tuple["Grammar", int]], bitmask: np.ndarray) -> None:
        """Write each grammar's allowed next tokens into its row of `bitmask` (int32[rows,
        ceil(V/32)], C-contiguous), on llguidance's thread pool: one mask can take ~0.05 ms (a JSON
        string's inside allows most of the vocabulary), too long for 256 of them one by one."""
        assert bitmask.flags["C_CONTIGUOUS"] and bitmask.dtype == np.int32
        _executor().unsafe_compute_mask_ptr([(g._matcher, i) for g, i in grammar_rows],
                                            bitmask.ctypes.data, bitmask.shape[1] * 4,
                                            bitmask.shape[0])


class _TokenRule:
    """A mask that is no grammar: every token is accepted and the output never completes."""
    __slots__ = ()

    def accept(self, token: int) -> None:
        pass

    def rollback(self, num_tokens: int) -> None:
        pass

    @staticmethod
    def accept_all(rule_tokens: list[tuple["_TokenRule", int]]) -> list[bool]:
        for rule, token in rule_tokens:
            rule.accept(token)
        return [True] * len(rule_tokens)

    @property
    def terminated(self) -> bool:
        return False


class TokenMask(_TokenRule):
    """A fixed set of allowed tokens (SamplingParams.allowed_token_ids)."""
    __slots__ = ("row", "bitmask_words")

    def __init__(self, token_ids: list[int], vocab_size: int) -> None:
        self.bitmask_words = bitmask_words(vocab_size)
        bits = np.zeros(self.bitmask_words * 32, np.uint8)
        bits[np.asarray(token_ids, np.int64)] = 1
        self.row = np.packbits(bits, bitorder="little").view(np.int32)

    @staticmethod
    def fill_bitmasks(grammar_rows: list[tuple["TokenMask", int]], bitmask: np.ndarray) -> None:
        for mask, i in grammar_rows:
            bitmask[i] = mask.row


class BadWords(_TokenRule):
    """vLLM's bad_words: the last token of each word's token sequence is banned right after the
    rest of it has been generated (a one-token word always)."""
    __slots__ = ("sequences", "recent", "bitmask_words", "_context")

    def __init__(self, sequences: list[tuple[int, ...]], vocab_size: int) -> None:
        self.sequences = sequences
        self.bitmask_words = bitmask_words(vocab_size)
        self._context = max(len(seq) for seq in sequences) - 1  # output tokens a ban looks back at
        self.recent: list[int] = []

    def accept(self, token: int) -> None:
        if self._context:  # every output token: a rollback (of guesses) may reach back any way
            self.recent.append(token)

    def rollback(self, num_tokens: int) -> None:
        if self._context:
            del self.recent[len(self.recent) - num_tokens:]

    @staticmethod
    def fill_bitmasks(grammar_rows: list[tuple["BadWords", int]], bitmask: np.ndarray) -> None:
        words = bitmask.view(np.uint32)
        for bad, i in grammar_rows:
            for seq in bad.sequences:
                n = len(seq) - 1
                if n == 0 or (len(bad.recent) >= n and tuple(bad.recent[-n:]) == seq[:-1]):
                    t = seq[-1]
                    words[i, t >> 5] &= np.uint32(~(1 << (t & 31)) & 0xFFFFFFFF)


_EXECUTOR: Any = None
_EXECUTOR_LOCK = threading.Lock()


def _executor() -> Any:
    global _EXECUTOR
    with _EXECUTOR_LOCK:
        if _EXECUTOR is None:
            from llguidance import LLExecutor
            _EXECUTOR = LLExecutor()
        return _EXECUTOR


class GrammarCompiler:
    """Grammars for one tokenizer and vocabulary (the model's embedding rows)."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: list[int]) -> None:
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._eos_token_ids = eos_token_ids
        self._lock = threading.Lock()
        self._ll_tokenizer: Any = None
        self._grammars: OrderedDict[str, str] = OrderedDict()

    def _llg_tokenizer(self) -> Any:
        import llguidance
        with self._lock:
            if self._ll_tokenizer is None:  # ~1 s: built once, on the first constrained request
                rust = getattr(self._tokenizer, "_tokenizer", None)
                if rust is None:
                    raise ValueError("structured_outputs needs a fast (Rust) tokenizer; this "
                                     "model's tokenizer is not one")
                try:
                    self._ll_tokenizer = llguidance.LLTokenizer(
                        rust.to_str(), n_vocab=self._vocab_size, eos_token=self._eos_token_ids)
                except ValueError as e:  # e.g. a word-level tokenizer: no bytes to match
                    raise ValueError(f"structured_outputs cannot use this model's tokenizer: "
                                     f"{e}") from None
            return self._ll_tokenizer

    def compile(self, params: StructuredOutputsParams) -> str:
        """The grammar of `params`, checked against the tokenizer (ValueError saying what is wrong
        with the field)."""
        if self._tokenizer is None:
            raise ValueError("structured_outputs needs the model's tokenizer; this model has none")
        key = _cache_key(params)
        with self._lock:
            grammar = self._grammars.get(key)
            if grammar is not None:
                self._grammars.move_to_end(key)
                return grammar
        grammar = _grammar_text(params)
        from llguidance import LLMatcher
        error = LLMatcher.validate_grammar(grammar, self._llg_tokenizer())
        if error:
            raise ValueError(f"structured_outputs.{params.kind} is not valid: {error}")
        with self._lock:
            self._grammars[key] = grammar
            if len(self._grammars) > GRAMMAR_CACHE_SIZE:
                self._grammars.popitem(last=False)
        return grammar

    def matcher(self, grammar: str) -> Grammar:
        """A new sequence's matcher of a compiled grammar."""
        from llguidance import LLMatcher
        m = LLMatcher(self._llg_tokenizer(), grammar, log_level=0)
        if m.is_error():
            raise ValueError(f"structured_outputs grammar failed: {m.get_error()}")
        return Grammar(m, self._vocab_size)


def _cache_key(params: StructuredOutputsParams) -> str:
    value = getattr(params, params.kind)
    return params.kind + ":" + json.dumps(value, sort_keys=True)


def _grammar_text(params: StructuredOutputsParams) -> str:
    from llguidance import LLMatcher
    from llguidance.gbnf_to_lark import gbnf_to_lark
    kind = params.kind
    if kind in ("json", "json_object"):
        schema = params.json if kind == "json" else {"type": "object"}
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as e:
                raise ValueError(f"structured_outputs.json is not valid JSON: {e}") from None
        if not isinstance(schema, dict):
            raise ValueError("structured_outputs.json must be a JSON schema object")
        return LLMatcher.grammar_from_json_schema(schema)
    if kind == "regex":
        return LLMatcher.grammar_from_regex(params.regex)
    if kind == "choice":
        return LLMatcher.grammar_from_lark(
            "start: " + " | ".join(json.dumps(c) for c in params.choice))
    text = params.grammar
    if "::=" in text:  # GBNF
        try:
            text = gbnf_to_lark(text)
        except Exception as e:  # its parser's own error types
            raise ValueError(f"structured_outputs.grammar is not valid GBNF: {e}") from None
    return LLMatcher.grammar_from_lark(text)


def new_bitmask(rows: int, vocab_size: int) -> np.ndarray:
    """All tokens allowed, for `rows` rows."""
    return np.full((rows, bitmask_words(vocab_size)), -1, np.int32)
