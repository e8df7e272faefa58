"""Tool calls in a model's text, by the formats vLLM's parsers of the same names read
(`--tool-call-parser`), and the forms tool_choice "required" and a named function force:

- hermes (Qwen2.5, Qwen3, Hermes): `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks
  after any content; a last block may be cut off before its closing tag.
- llama3_json (Llama 3.1+): the whole output is `{"name": ..., "parameters": {...}}` (optionally after
  `<|python_tag|>`), several joined by `;`.
- mistral: content, then `[TOOL_CALLS]` and a JSON array of `{"name": ..., "arguments": {...}}`.
- required (tool_choice "required", vLLM's grammar): `[{"name": ..., "parameters": {...}}, ...]`.
- a named function (tool_choice names it): the whole output is its arguments.

A call's arguments are the text the model wrote for them (OpenAI's `function.arguments`; a JSON
string the model gave as arguments is decoded once). Text that does not parse as the format's
calls stays content, as vLLM does. Streaming reads the text as it grows, a character once: content
up to a tail that may still become the format's marker, a call's id and name once its name is
complete, then its arguments as they arrive, so the pieces add up to the whole text's split. (A
call cut off by max_tokens has streamed its beginning; the whole text then reads as content.)
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional

from jaxvllm.entrypoints.openai.text_split import check_name, partial_tag_len

PARSERS = ("hermes", "llama3_json", "mistral")
_ARGS_KEYS = {"hermes": ("arguments",), "llama3_json": ("parameters", "arguments"),
              "mistral": ("arguments",), "required": ("parameters",)}
_SPACE = " \t\r\n"


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI's responses carry it
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def to_openai(self) -> dict:
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class ToolCallDelta:
    """A streamed piece of call `index`: its first names it (id, name); the pieces' arguments add
    up to the call's."""
    index: int
    arguments: str
    call: Optional[ToolCall] = None  # on the first piece

    def to_openai(self) -> dict:
        if self.call is None:
            return {"index": self.index, "function": {"arguments": self.arguments}}
        return {"index": self.index, "id": self.call.id, "type": "function",
                "function": {"name": self.call.name, "arguments": self.arguments}}


def check_parser(name: Optional[str]) -> Optional[str]:
    return check_name(name, PARSERS, "tool_call_parser")


class _Object:
    """One JSON object read as it arrives, from the `{` at text[start]: where it ends, its name
    once complete, and the raw text of its arguments (the first of `args_keys`) so far. Only
    the structure is tracked; the object is parsed once complete."""

    def __init__(self, start: int, args_keys: tuple[str, ...]) -> None:
        self.start = self.pos = start
        self.args_keys = args_keys
        self.depth = 0
        self.in_string = self.escape = False
        self.state = "key"               # at depth 1: key, colon, value, after
        self.key: Optional[str] = None
        self.token: Optional[int] = None  # start of the depth-1 key or value being read
        self.name: Optional[str] = None
        self.args_start: Optional[int] = None
        self.args_end: Optional[int] = None
        self.end: Optional[int] = None   # past the closing brace

    def feed(self, text: str) -> None:
        i, n = self.pos, len(text)
        while i < n and self.end is None:
            c = text[i]
            if self.in_string:
                if self.escape:
                    self.escape = False
                elif c == "\\":
                    self.escape = True
                elif c == '"':
                    self.in_string = False
                    if self.depth == 1:
                        self._token_ends(text, i + 1)
            elif c == '"' or c in "{[":
                if self.depth == 1 and self.state in ("key", "value"):
                    self.token = i
                self.in_string = c == '"'
                self.depth += c != '"'
            elif c in "}]":
                if self.depth == 1 and self.state == "value" and self.token is not None:
                    self._token_ends(text, i)  # a number, true, false or null
                self.depth -= 1
                if self.depth == 1:
                    self._token_ends(text, i + 1)  # an object or array
                elif self.depth == 0:
                    self.end = i + 1
            elif self.depth == 1:
                if c == ":":
                    self.state = "value"
                elif c == ",":
                    if self.state == "value" and self.token is not None:
                        self._token_ends(text, i)
                    self.state = "key"
                elif c not in _SPACE and self.state == "value" and self.token is None:
                    self.token = i
            i += 1
        self.pos = i

    def _token_ends(self, text: str, end: int) -> None:
        if self.token is None:
            return
        raw = text[self.token:end].rstrip(_SPACE)
        if self.state == "key":
            self.key, self.state = _loads(raw), "colon"
        elif self.state == "value":
            if self.key == "name" and self.name is None and raw.startswith('"'):
                self.name = _loads(raw)
            elif self.key in self.args_keys and self.args_start is None:
                self.args_start, self.args_end = self.token, self.token + len(raw)
            self.state = "after"
        self.token = None

    def args_so_far(self, text: str) -> str:
        """The arguments' raw text as far as it has come (an object or array streams)."""
        start = self.args_start
        if start is None and self.state == "value" and self.key in self.args_keys:
            start = self.token
        if start is None or text[start] not in "{[":
            return ""
        return text[start:self.args_end if self.args_end is not None else self.pos]

    def call(self, text: str) -> Optional[tuple[str, str]]:
        """(name, arguments) of the complete object, or None if it is no call."""
        obj = _loads(text[self.start:self.end])
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return None
        if self.args_start is None:
            return obj["name"], "{}"
        args = _loads(text[self.args_start:self.args_end])
        return obj["name"], (args if isinstance(args, str)
                             else text[self.args_start:self.args_end])


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def _skip_space(text: str, i: int) -> int:
    while i < len(text) and text[i] in _SPACE:
        i += 1
    return i


class ToolCallStream:
    """One choice's text, in the format `fmt` (a parser's name or "required"), fed as it grows:
    each update returns the new content and the new pieces of calls."""

    def __init__(self, fmt: str) -> None:
        self.fmt = fmt
        self.args_keys = _ARGS_KEYS[fmt]
        self.content_end = 0  # the content is text[:content_end] (always a prefix)
        self.pos = 0          # text before pos is read
        # content (before a marker), start (what opens the calls), text (all content), open (an
        # object next), object, after (an object), between (hermes blocks), end, failed
        self.phase = "content" if fmt in ("hermes", "mistral") else "start"
        self.array = False    # mistral, required: the calls are an array
        self.obj: Optional[_Object] = None
        self.started: list[ToolCall] = []  # calls named so far
        self.sent_args: list[int] = []
        self.complete: list[ToolCall] = []

    @property
    def calls(self) -> list[ToolCall]:
        """The complete calls (none once the text has turned out not to be calls)."""
        return [] if self.phase == "failed" else self.complete

    def update(self, text: str, final: bool) -> tuple[str, list[ToolCallDelta]]:
        sent_content = self.content_end
        deltas: list[ToolCallDelta] = []
        while self.phase != "failed":
            before = (self.phase, self.pos)
            getattr(self, "_" + self.phase)(text, final, deltas)
            if (self.phase, self.pos) == before:
                break  # waiting for more text
        if final and not self._may_end(text):
            self.phase = "failed"  # a call cut off, or text that is no call
        if self.phase == "failed" and final or self.phase == "text":
            self.content_end = len(text)
        return text[sent_content:self.content_end], deltas

    def _may_end(self, text: str) -> bool:
        """The text so far is a whole output of the format."""
        if self.phase == "after":
            return self.fmt in ("hermes", "llama3_json") or not self.array
        return self.phase in ("content", "text", "between", "end")

    # ---- the phases: each reads what it can and moves on, or waits for more text ---------------
    def _content(self, text: str, final: bool, deltas: list) -> None:
        marker = "<tool_call>" if self.fmt == "hermes" else "[TOOL_CALLS]"
        k = text.find(marker, self.content_end)
        if k < 0:
            self.content_end = len(text) if final else len(text) - partial_tag_len(text, marker)
            return
        self.content_end = k
        self.pos = k + len(marker)
        self.phase = "open" if self.fmt == "hermes" else "start"

    def _start(self, text: str, final: bool, deltas: list) -> None:
        i = _skip_space(text, self.pos)
        if self.fmt == "llama3_json":
            tag = "<|python_tag|>"
            if text.startswith(tag, i):
                i = _skip_space(text, i + len(tag))
            elif tag.startswith(text[i:]) and not final:
                return  # the tag, or not yet known
        if i == len(text):
            return
        if text[i] == "[" and self.fmt in ("mistral", "required"):
            self.array, self.phase, self.pos = True, "open", i + 1
        elif text[i] == "{" and self.fmt != "required":
            self.phase, self.pos = "open", i
        else:
            self.phase = "text" if self.fmt == "llama3_json" else "failed"

    def _text(self, text: str, final: bool, deltas: list) -> None:
        self.pos = len(text)

    def _open(self, text: str, final: bool, deltas: list) -> None:
        i = _skip_space(text, self.pos)
        if i < len(text):
            if text[i] != "{":
                self.phase = "failed"
                return
            self.obj = _Object(i, self.args_keys)
            self.phase = "object"
        self.pos = i

    def _object(self, text: str, final: bool, deltas: list[ToolCallDelta]) -> None:
        obj = self.obj
        obj.feed(text)
        self.pos = obj.pos
        index = len(self.complete)
        if obj.name is not None and len(self.started) == index:
            self.started.append(ToolCall(obj.name, ""))
            self.sent_args.append(0)
            deltas.append(ToolCallDelta(index, "", self.started[index]))
        if len(self.started) > index:
            self._send_args(index, obj.args_so_far(text), deltas)
        if obj.end is None:
            return
        call = obj.call(text)
        if call is None or len(self.started) == index:
            self.phase = "failed"
            return
        self._send_args(index, call[1], deltas)
        self.started[index].arguments = call[1]
        self.complete.append(self.started[index])
        self.phase = "after"

    def _after(self, text: str, final: bool, deltas: list) -> None:
        i = _skip_space(text, self.pos)
        rest = text[i:i + 12]
        if self.fmt == "hermes":
            closing = "</tool_call>"
            if rest.startswith(closing):
                self.phase, self.pos = "between", i + len(closing)
            elif not closing.startswith(rest):
                self.phase = "failed"
            return
        if not rest:
            return
        if self.array and rest[0] in ",]":
            self.phase, self.pos = ("open" if rest[0] == "," else "end"), i + 1
        elif self.fmt == "llama3_json" and rest[0] == ";":
            self.phase, self.pos = "open", i + 1
        else:
            self.phase = "failed"

    def _between(self, text: str, final: bool, deltas: list) -> None:
        opening = "<tool_call>"  # text between hermes blocks is dropped
        k = text.find(opening, self.pos)
        if k >= 0:
            self.phase, self.pos = "open", k + len(opening)
        else:
            self.pos = max(self.pos, len(text) - partial_tag_len(text, opening))

    def _end(self, text: str, final: bool, deltas: list) -> None:
        i = _skip_space(text, self.pos)
        if i < len(text):
            self.phase = "failed"
        self.pos = i

    def _send_args(self, index: int, args: str, deltas: list[ToolCallDelta]) -> None:
        new = args[self.sent_args[index]:]
        if not new:
            return
        self.sent_args[index] = len(args)
        if deltas and deltas[-1].index == index:
            deltas[-1].arguments += new
        else:
            deltas.append(ToolCallDelta(index, new))


class NamedCallStream:
    """tool_choice names the function: the whole output is its arguments (a grammar's JSON)."""

    def __init__(self, name: str) -> None:
        self.call = ToolCall(name, "")

    @property
    def calls(self) -> list[ToolCall]:
        return [self.call] if self.call.arguments else []

    def update(self, text: str, final: bool) -> tuple[str, list[ToolCallDelta]]:
        args = text.strip(_SPACE)  # trailing space waits: it may be inside the arguments
        new = args[len(self.call.arguments):]
        if not new:
            return "", []
        first = not self.call.arguments
        self.call.arguments = args
        return "", [ToolCallDelta(0, new, self.call if first else None)]


def extract_tool_calls(fmt: str, text: str) -> tuple[Optional[str], list[ToolCall]]:
    """(content, calls) of a whole output; content None when there is none."""
    stream = ToolCallStream(fmt)
    content, _ = stream.update(text, final=True)
    return content or None, stream.calls
