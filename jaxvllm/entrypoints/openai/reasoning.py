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


def split_reasoning(parser: str, text: str) -> tuple[Optional[str], Optional[str]]:
    """(reasoning, content) of a whole chat completion; None for a part with nothing in it."""
    reasoning, content = ReasoningStream(parser).update(text, final=True)
    return reasoning or None, content or None


class ReasoningStream:
    """One choice's text, fed as it grows: each update returns the new (reasoning, content)
    pieces. Each character is looked at about once (a long reasoning streams in linear time)."""

    def __init__(self, parser: str) -> None:
        self.parser = parser
        self.phase = "start"   # start (tag not yet known), reasoning, content
        self.reasoning_start = self.reasoning_sent = 0
        self.content_start = self.content_sent = 0
        self.searched = 0      # END does not start before this, in the reasoning

    def update(self, text: str, final: bool) -> tuple[str, str]:
        if self.phase == "start":
            i = len(text) - len(text.lstrip())
            if text.startswith(START, i):
                self.phase, self.reasoning_start = "reasoning", i + len(START)
            elif not final and START.startswith(text[i:]):
                return "", ""  # "<thi": the opening tag, or not yet known (or nothing yet)
            elif self.parser == "qwen3":  # no think block: all content
                self.phase = "content"
            else:  # deepseek_r1: the template opened it
                self.phase, self.reasoning_start = "reasoning", i
            self.reasoning_sent = self.searched = self.reasoning_start
        reasoning = ""
        if self.phase == "reasoning":
            k = text.find(END, self.searched)
            if k < 0:
                end = len(text) if final else len(text) - partial_tag_len(text, END)
                self.searched = max(self.searched, len(text) - len(END) + 1)
            else:
                end = k
                self.phase, self.content_start = "content", k + len(END)
                self.content_sent = self.content_start
            reasoning = text[self.reasoning_sent:end]
            self.reasoning_sent = max(self.reasoning_sent, end)
        content = ""
        if self.phase == "content":
            content = text[self.content_sent:]
            self.content_sent = len(text)
        return reasoning, content
