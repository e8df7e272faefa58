"""One chat choice's text as OpenAI's message parts: reasoning (`--reasoning-parser`), then tool
calls (forced by tool_choice "required" or a named function, whose grammar made the text the
calls; or read by `--tool-call-parser` under "auto"), and the rest as content. Fed the text as it
grows (streaming) or whole (`final`), it returns what is new each time, so both add up alike."""
from __future__ import annotations

from typing import Optional

from jaxvllm.entrypoints.openai.reasoning import ReasoningStream
from jaxvllm.entrypoints.openai.tool_parsers import (NamedCallStream, ToolCall, ToolCallDelta,
                                                     ToolCallStream)


class ChatOutput:
    def __init__(self, reasoning_parser: Optional[str], tool_call_parser: Optional[str],
                 forced: Optional[str], parallel_tool_calls: bool = True) -> None:
        """`forced`: "required", a function's name (tool_choice names it), or None.
        `parallel_tool_calls` False: a choice makes at most one call (the grammar of "required"
        allows one; under "auto" the calls after the first are dropped)."""
        self.reasoning = ReasoningStream(reasoning_parser) if reasoning_parser else None
        self.forced = forced
        self.max_calls = None if parallel_tool_calls else 1
        self.tools: ToolCallStream | NamedCallStream | None = (
            ToolCallStream(tool_call_parser) if forced is None and tool_call_parser
            else ToolCallStream("required") if forced == "required"
            else NamedCallStream(forced) if forced is not None else None)
        self.text = ""
        self.content = ""

    def update(self, delta: str, final: bool) -> tuple[str, str, list[ToolCallDelta]]:
        """(new reasoning, new content, new pieces of calls) once `delta` is added to the text."""
        self.text += delta
        reasoning, content = (self.reasoning.update(self.text, final) if self.reasoning
                              else ("", delta))
        if self.tools is None:
            return reasoning, content, []
        self.content += content
        content, calls = self.tools.update(self.content, final)
        if self.max_calls is not None:
            calls = [d for d in calls if d.index < self.max_calls]
        return reasoning, content, calls

    @property
    def calls(self) -> list[ToolCall]:
        """The complete calls."""
        return self.tools.calls[:self.max_calls] if self.tools is not None else []

    def finish_reason(self, reason: Optional[str]) -> Optional[str]:
        """The engine's finish reason, or "tool_calls" when the choice made calls it chose to make
        (OpenAI keeps "stop" for a function tool_choice named)."""
        if reason is not None and self.calls and self.forced in (None, "required"):
            return "tool_calls"
        return reason
