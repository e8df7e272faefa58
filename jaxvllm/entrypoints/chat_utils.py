"""Chat messages as OpenAI sends them, checked once for both LLM.chat and the server, and shaped as
chat templates take them (text parts joined into one string)."""
from __future__ import annotations

import json
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import Discriminator, Field, Tag, TypeAdapter, ValidationError, field_validator
from pydantic_core.core_schema import ValidationInfo

from jaxvllm.entrypoints.schema import StrictModel, describe, invalid


class TextPart(StrictModel):
    type: Literal["text", "input_text"]
    text: str


def _content_kind(v: Any) -> Optional[str]:
    return "<text>" if isinstance(v, str) else "<parts>" if isinstance(v, list) else None


Content = Annotated[
    Union[Annotated[str, Tag("<text>")], Annotated[list[TextPart], Tag("<parts>")]],
    Discriminator(_content_kind, custom_error_type="invalid",
                  custom_error_message="must be a string or an array of text parts")]


class FunctionCall(StrictModel):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCallMessage(StrictModel):
    """An earlier assistant turn's tool call, as the client sends it back."""
    id: Optional[str] = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(StrictModel):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    # Only an assistant message may leave its content out (it is then empty).
    content: Optional[Content] = Field(None, validate_default=True)
    name: Optional[str] = None
    tool_calls: Optional[list[ToolCallMessage]] = None
    tool_call_id: Optional[str] = None

    @field_validator("content")
    @classmethod
    def _joined(cls, content: Any, info: ValidationInfo) -> str:
        if content is None:
            if info.data.get("role") != "assistant":
                raise invalid("is required")
            return ""
        if isinstance(content, list):
            return "\n".join(part.text for part in content)
        return content

    def for_template(self) -> dict:
        msg: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.name is not None:
            msg["name"] = self.name
        if self.tool_call_id is not None:
            msg["tool_call_id"] = self.tool_call_id
        if self.tool_calls:
            # Templates write the arguments with `tojson`: they take them as an object.
            msg["tool_calls"] = [{"id": c.id, "type": "function",
                                  "function": {"name": c.function.name,
                                               "arguments": _json_or_text(c.function.arguments)}}
                                 for c in self.tool_calls]
        return msg


def _json_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


class FunctionDefinition(StrictModel):
    name: str
    description: Optional[str] = None
    parameters: Optional[dict] = None  # a JSON schema of the arguments
    strict: Optional[bool] = None


class Tool(StrictModel):
    """A function the model may call (OpenAI's `tools` entries), as chat templates take it."""
    type: Literal["function"]
    function: FunctionDefinition


Messages = Annotated[list[ChatMessage], Field(min_length=1)]
_TOOLS = TypeAdapter(list[Tool])
_MESSAGES = TypeAdapter(Messages)


def parse_tools(tools: Any, name: str = "tools") -> list[dict]:
    """`tools` checked (ValueError naming the bad field) and shaped for a chat template."""
    try:
        return [t.model_dump(exclude_none=True) for t in _TOOLS.validate_python(tools)]
    except ValidationError as e:
        raise ValueError(describe(e, name)[1]) from None


def parse_messages(messages: Any, name: str = "messages") -> list[dict]:
    """`messages` checked (ValueError naming the bad field under `name`) and shaped for a chat
    template."""
    try:
        return [m.for_template() for m in _MESSAGES.validate_python(messages)]
    except ValidationError as e:
        raise ValueError(describe(e, name)[1]) from None
