"""Tool calls in a model's text, by the formats vLLM's parsers of the same names read
(`--tool-call-parser`):

- hermes (Qwen2.5, Qwen3, Hermes): `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks
  after any content; a last block may be cut off before its closing tag.
- llama3_json (Llama 3.1+): the whole output is `{"name": ..., "parameters": {...}}` (optionally after
  `<|python_tag|>`), several joined by `;`.
- mistral: content, then `[TOOL_CALLS]` and a JSON array of `{"name": ..., "arguments": {...}}`.

Text that does not parse as the format's calls stays content, as vLLM does. Streaming splits the
text so far the same way, holding back a tail that may still become the format's marker and a call
until it is complete, so content and calls streamed add up to the non-streamed split.
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional

from jaxvllm.entrypoints.openai.text_split import check_name, partial_tag_len

PARSERS = ("hermes", "llama3_json", "mistral")


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI's responses carry it
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def to_openai(self) -> dict:
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


def check_parser(name: Optional[str]) -> Optional[str]:
    return check_name(name, PARSERS, "tool_call_parser")


def _call(obj: Any, args_key: str) -> Optional[ToolCall]:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get(args_key, obj.get("arguments", {}))
    return ToolCall(obj["name"], args if isinstance(args, str) else json.dumps(args,
                                                                              ensure_ascii=False))


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


@dataclass
class Split:
    """A text so far as content and complete calls (what is neither is held back)."""
    content: str
    calls: list[ToolCall]


def _hermes(text: str, final: bool) -> Split:
    start, end = "<tool_call>", "</tool_call>"
    head, opened, rest = text.partition(start)
    if not opened:
        return Split(text if final else text[:len(text) - partial_tag_len(text, start)], [])
    calls = []
    blocks = [start + b for b in rest.split(start)]
    for i, block in enumerate(blocks):
        body, closed, _ = block[len(start):].partition(end)
        if not closed and not (final and i == len(blocks) - 1):
            break  # still arriving
        call = _call(_json(body.strip()), "arguments")
        if call is None:
            return Split(text, []) if final else Split(head, calls)
        calls.append(call)
    return Split(head, calls)


def _llama3_json(text: str, final: bool) -> Split:
    tag = "<|python_tag|>"
    body = text.lstrip()
    if body.startswith(tag):
        body = body[len(tag):].lstrip()
    if not final:
        # A call is the whole output: nothing can be content until it is known not to be one.
        maybe_call = body.startswith("{") or (tag.startswith(body) and len(body) < len(tag))
        return Split("", []) if maybe_call or not body else Split(text, [])
    if not body.startswith("{"):
        return Split(text, [])
    calls = []
    for part in body.split(";"):
        call = _call(_json(part.strip()), "parameters")
        if call is None:
            return Split(text, [])
        calls.append(call)
    return Split("", calls)


def _mistral(text: str, final: bool) -> Split:
    marker = "[TOOL_CALLS]"
    head, found, rest = text.partition(marker)
    if not found:
        return Split(text if final else text[:len(text) - partial_tag_len(text, marker)], [])
    if not final:
        return Split(head, [])  # the array is read once the output is complete
    parsed = _json(rest.strip())
    parsed = [parsed] if isinstance(parsed, dict) else parsed
    calls = [_call(obj, "arguments") for obj in parsed] if isinstance(parsed, list) else [None]
    if not calls or any(c is None for c in calls):
        return Split(text, [])
    return Split(head, calls)


_SPLITTERS = {"hermes": _hermes, "llama3_json": _llama3_json, "mistral": _mistral}


def extract_tool_calls(parser: str, text: str) -> tuple[Optional[str], list[ToolCall]]:
    """(content, calls) of a whole output; content None when there is none."""
    s = _SPLITTERS[parser](text, True)
    return s.content or None, s.calls


class ToolCallStream:
    """One streamed choice: each call takes the text so far and returns the new content and the
    calls completed since the last call."""

    def __init__(self, parser: str) -> None:
        self.parser = parser
        self.sent_content = 0
        self.sent_calls = 0

    def update(self, text: str, final: bool) -> tuple[str, list[ToolCall]]:
        s = _SPLITTERS[self.parser](text, final)
        new = s.content[self.sent_content:], s.calls[self.sent_calls:]
        self.sent_content, self.sent_calls = len(s.content), len(s.calls)
        return new
