"""Chat messages as OpenAI sends them, checked once for both LLM.chat and the server, and shaped as
chat templates take them (text parts joined into one string)."""
from __future__ import annotations

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


class ChatMessage(StrictModel):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    # Only an assistant message may leave its content out (it is then empty).
    content: Optional[Content] = Field(None, validate_default=True)
    name: Optional[str] = None
    tool_calls: Optional[list] = None

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

    @field_validator("tool_calls")
    @classmethod
    def _no_tool_calls(cls, tool_calls: list) -> list:
        if tool_calls:
            raise invalid("is not supported (tool calling)")
        return tool_calls

    def for_template(self) -> dict:
        msg = {"role": self.role, "content": self.content}
        if self.name is not None:
            msg["name"] = self.name
        return msg


Messages = Annotated[list[ChatMessage], Field(min_length=1)]
_MESSAGES = TypeAdapter(Messages)


def parse_messages(messages: Any, name: str = "messages") -> list[dict]:
    """`messages` checked (ValueError naming the bad field under `name`) and shaped for a chat
    template."""
    try:
        return [m.for_template() for m in _MESSAGES.validate_python(messages)]
    except ValidationError as e:
        raise ValueError(describe(e, name)[1]) from None
