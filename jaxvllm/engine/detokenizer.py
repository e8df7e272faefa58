"""Incremental detokenization and stop strings, on the host.

Uses the Rust tokenizer's DecodeStream (O(1) per token, handles multi-byte characters split across
tokens) when the tokenizer is a fast one, else re-decodes a short window of recent tokens.
"""
from __future__ import annotations

from typing import Any, Optional

from jaxvllm.sampling_params import SamplingParams

try:
    from tokenizers.decoders import DecodeStream
except ImportError:  # older tokenizers
    DecodeStream = None


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, params: SamplingParams, prompt_token_ids: list[int]) -> None:
        self.tokenizer = tokenizer
        self.params = params
        self.text = ""
        self.stop_reason: Optional[str] = None
        self._max_stop_len = max((len(s) for s in params.stop), default=0)
        rust = getattr(tokenizer, "_tokenizer", None)
        self._stream = None
        if DecodeStream is not None and rust is not None:
            self._rust = rust
            self._stream = DecodeStream(skip_special_tokens=params.skip_special_tokens)
            # Prime with the prompt tail so the first output token gets its leading space right.
            for tid in prompt_token_ids[-4:]:
                self._stream.step(rust, tid)
        self._ids: list[int] = []
        self._decoded_len = 0

    def update(self, new_token_ids: list[int], num_output_tokens: int) -> bool:
        """Appends tokens (the output now holds `num_output_tokens`); returns True if a stop string
        ended the output (text is then truncated). As vLLM, stop strings wait for min_tokens too:
        only text that ends past the first min_tokens tokens is searched."""
        start = len(self.text)
        for tid in new_token_ids:
            self.text += self._decode_one(tid)
        if self.params.stop and num_output_tokens > self.params.min_tokens:
            return self._check_stop(start)
        return False

    def _decode_one(self, tid: int) -> str:
        if self.tokenizer is None:  # token-id-only models (dummy weights without tokenizer files)
            return ""
        if self._stream is not None:
            return self._stream.step(self._rust, tid) or ""
        self._ids.append(tid)
        full = self.tokenizer.decode(self._ids, skip_special_tokens=self.params.skip_special_tokens)
        # A trailing replacement char means a multi-byte character is still incomplete.
        if full.endswith("\ufffd"):
            return ""
        piece = full[self._decoded_len:]
        self._decoded_len = len(full)
        return piece

    def _check_stop(self, new_start: int) -> bool:
        # Only a window that can contain a stop string touching the new text needs searching.
        # As vLLM, the first stop string in the list's order that occurs wins (not the earliest).
        window_start = max(0, new_start - self._max_stop_len + 1)
        for s in self.params.stop:
            i = self.text.find(s, window_start)
            if i != -1:
                break
        else:
            return False
        self.text = self.text[:i + len(s)] if self.params.include_stop_str_in_output else self.text[:i]
        self.stop_reason = s
        return True

    def output_text(self, finished: bool) -> str:
        """Text safe to show now: while running, hold back what could still become a stop string."""
        if finished or not self._max_stop_len or self.params.include_stop_str_in_output:
            return self.text
        return self.text[:max(0, len(self.text) - self._max_stop_len + 1)]
