"""Reasoning output (`--reasoning-parser`): the `<think>...</think>` part of a chat completion goes to
`message.reasoning_content` (streamed: `delta.reasoning_content`), the rest to `content`, as vLLM's
parsers of the same names split it.

- deepseek_r1: the chat template opens the think block, so the output is reasoning up to
  `</think>` (an opening `<think>` the model writes itself is dropped); an output that never closes
  it is all reasoning.
- qwen3: the output is reasoning only if it opens with `<think>` (Qwen3 with thinking off writes no
  tags); reasoning is what stands between the tags, content what follows. A block cut off before
  `</think>` (max_tokens) stays reasoning, as it streamed (vLLM's non-streamed qwen3 parser calls it
  content instead, so its two answers differ).

Streaming splits the text so far the same way, holding back a tail that may still become a tag
(`</thi`), so the reasoning and content sent add up to the non-streamed split.
"""
from __future__ import annotations

from typing import Optional

from jaxvllm.entrypoints.openai.text_split import check_name, partial_tag_len

START, END = "<think>", "</think>"
PARSERS = ("deepseek_r1", "qwen3")


def check_parser(name: Optional[str]) -> Optional[str]:
    return check_name(name, PARSERS, "reasoning_parser")


def split_reasoning(parser: str, text: str, final: bool = True) -> tuple[Optional[str], Optional[str]]:
    """(reasoning, content) of a chat completion's text so far; None for a part with nothing in it.
    While not `final`, a tail that may still become a tag belongs to neither."""
    body = text.lstrip()
    opened = body.startswith(START)
    if opened:
        body = body[len(START):]
    elif not final and START.startswith(body) and body:
        return None, None  # "<thi": the opening tag, or not yet known
    if parser == "qwen3" and not opened:
        return None, _nonempty(text)
    reasoning, closed, content = body.partition(END)
    if not closed:
        if not final:
            reasoning = reasoning[:len(reasoning) - partial_tag_len(reasoning, END)]
        return _nonempty(reasoning), None
    return _nonempty(reasoning), _nonempty(content)


def _nonempty(s: str) -> Optional[str]:
    return s or None


class ReasoningStream:
    """One streamed choice: each call takes the text so far and returns the new (reasoning,
    content) pieces."""

    def __init__(self, parser: str) -> None:
        self.parser = parser
        self.sent_reasoning = 0
        self.sent_content = 0

    def update(self, text: str, final: bool) -> tuple[str, str]:
        reasoning, content = split_reasoning(self.parser, text, final)
        reasoning, content = reasoning or "", content or ""
        new = reasoning[self.sent_reasoning:], content[self.sent_content:]
        self.sent_reasoning, self.sent_content = len(reasoning), len(content)
        return new
