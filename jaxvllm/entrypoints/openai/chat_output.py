"""One chat choice's text as OpenAI's message parts: reasoning (`--reasoning-parser`), then tool
calls (forced by tool_choice "required" or a named function, whose grammar made the text the
calls; or read by `--tool-call-parser` under "auto"), and the rest as content. Fed the text as it
grows (streaming) or whole (`final`), it returns what is new each time, so both add up alike."""
from __future__ import annotations

import json
from typing import Optional

from jaxvllm.entrypoints.openai.reasoning import ReasoningStream
from jaxvllm.entrypoints.openai.tool_parsers import ToolCall, ToolCallStream


class ChatOutput:
    def __init__(self, reasoning_parser: Optional[str], tool_call_parser: Optional[str],
                 forced: Optional[str]) -> None:
        """`forced`: "required", a function's name (tool_choice names it), or None."""
        self.reasoning = ReasoningStream(reasoning_parser) if reasoning_parser else None
        self.tools = ToolCallStream(tool_call_parser) if tool_call_parser and not forced else None
        self.forced = forced
        self.text = ""
        self.content = ""
        self.num_calls = 0

    def update(self, delta: str, final: bool) -> tuple[str, str, list[ToolCall]]:
        """(new reasoning, new content, new complete calls) once `delta` is added to the text."""
        self.text += delta
        reasoning, content = (self.reasoning.update(self.text, final) if self.reasoning
                              else ("", delta))
        self.content += content
        calls: list[ToolCall] = []
        if self.forced is not None:
            if not final:
                return reasoning, "", []
            calls = _forced_calls(self.forced, self.content)
            content = "" if calls else self.content
        elif self.tools is not None:
            content, calls = self.tools.update(self.content, final)
        self.num_calls += len(calls)
        return reasoning, content, calls

    def finish_reason(self, reason: Optional[str]) -> Optional[str]:
        """The engine's finish reason, or "tool_calls" when the choice made calls it chose to make
        (OpenAI keeps "stop" for a function tool_choice named)."""
        if reason is not None and self.num_calls and self.forced in (None, "required"):
            return "tool_calls"
        return reason


def _forced_calls(forced: str, text: str) -> list[ToolCall]:
    if forced != "required":
        return [ToolCall(forced, text.strip())] if text.strip() else []
    try:  # the grammar's form: [{"name": ..., "parameters": {...}}, ...]
        items = json.loads(text)
        return [ToolCall(item["name"], json.dumps(item["parameters"], ensure_ascii=False))
                for item in items]
    except (ValueError, TypeError, KeyError):  # cut off by max_tokens: left as content
        return []
