"""Strict request schemas: the pydantic base the chat messages (LLM.chat) and the OpenAI wire schema
share, and how a validation error is reported (the path of the offending field and a message)."""
from __future__ import annotations

from typing import Annotated, Any, Optional

from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError
from pydantic_core import PydanticCustomError

# Labels of the tagged unions below. They are pydantic's steps into a union (which branch was taken),
# not fields, so an error's path leaves them out.
UNION_TAGS = frozenset({"<text>", "<parts>"})


def _integral(v: Any) -> Any:
    # A float with no fraction is an integer on the wire (JSON has one number type); 2.5 is not.
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return v


Int = Annotated[int, BeforeValidator(_integral)]


class StrictModel(BaseModel):
    """No coercion of "0.5" into 0.5 or of 1 into true; unknown fields are ignored (as OpenAI and
    vLLM do); NaN and infinities are not numbers."""
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


def invalid(message: str) -> PydanticCustomError:
    """A validator's own error: reported with the field's path and `message` as is."""
    return PydanticCustomError("invalid", message.replace("{", "{{").replace("}", "}}"))


def field_path(loc: tuple, root: str = "") -> str:
    """('messages', 0, 'content') -> 'messages[0].content' (under `root`, if given)."""
    path = root
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part not in UNION_TAGS:
            path = f"{path}.{part}" if path else str(part)
    return path


def describe(error: ValidationError, root: str = "") -> tuple[Optional[str], str]:
    """(path of the field, message naming it) for the first error of a validation."""
    first = error.errors(include_url=False)[0]
    path = field_path(first["loc"], root) or None
    what = f"'{path}'" if path else "The request body"
    kind = first["type"]
    if kind == "missing":
        return path, f"{what} is required."
    if kind == "invalid":  # our validators' own wording, a predicate ("must be ...")
        return path, f"{what} {first['msg']}."
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return path, f"{what} must be an object, got {json_type(first['input'])}."
    msg = first["msg"]  # pydantic's wording: "Input should be ..."
    msg = msg[0].lower() + msg[1:]
    if kind.endswith("_type"):
        msg += f", got {json_type(first['input'])}"
    return path, f"{what}: {msg}."


_JSON_TYPES = ((type(None), "null"), (bool, "boolean"), (int, "integer"), (float, "number"),
               (str, "string"), (list, "array"), (dict, "object"))  # bool before int: it is one


def json_type(v: Any) -> str:
    """The JSON name of a parsed value's type, for error messages."""
    return next((name for t, name in _JSON_TYPES if isinstance(v, t)), type(v).__name__)
