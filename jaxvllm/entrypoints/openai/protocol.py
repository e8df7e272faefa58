"""The OpenAI wire schema: request bodies as pydantic models, the errors answered for them, and the
pieces of responses.

Every malformed request becomes a 4xx `APIError` naming the offending field (pydantic's error path),
never an exception deeper in the server or the engine. Types are strict (jaxvllm.entrypoints.schema);
known fields whose feature is not supported (OpenAI's legacy `functions`, tools on completions, ...)
are rejected.
"""
from __future__ import annotations

import json
import math
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Literal, Optional, Union

from pydantic import BeforeValidator, Field, ValidationError, field_validator, model_validator
from pydantic_core.core_schema import ValidationInfo

from jaxvllm.engine.llm_engine import as_token_ids, check_text
from jaxvllm.entrypoints.chat_utils import ChatMessage, Messages, Tool
from jaxvllm.entrypoints.schema import Int, StrictModel, describe, invalid, json_type
from jaxvllm.sampling_params import RequestOutputKind, SamplingParams, StructuredOutputsParams

INT64_MAX = 2 ** 63 - 1


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------
class APIError(Exception):
    """An error answered to the client as {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, message: str, status: int = 400, type: str = "BadRequestError",
                 param: Optional[str] = None, code: Optional[int | str] = None,
                 headers: Optional[dict] = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type
        self.param = param
        self.code = code if code is not None else status
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: Optional[str], code: Any) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code},
            # vLLM's flat legacy fields, for clients that read them.
            "object": "error", "message": message, "type": type, "param": param, "code": code}


def bad_request(message: str, param: Optional[str] = None) -> APIError:
    return APIError(message, 400, "BadRequestError", param)


def not_found(message: str, param: Optional[str] = None) -> APIError:
    return APIError(message, 404, "NotFoundError", param)


# ---------------------------------------------------------------------------------------------
# JSON body
# ---------------------------------------------------------------------------------------------
def _reject_constant(name: str) -> Any:
    raise ValueError(f"invalid JSON number {name}")


def parse_json_body(raw: bytes) -> dict:
    if not raw or not raw.strip():
        raise bad_request("The request body is empty; expected a JSON object.")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise bad_request("The request body is not valid UTF-8.") from None
    try:
        body = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise bad_request("The request body is nested too deeply.") from None
    except ValueError as e:
        raise bad_request(f"The request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise bad_request(f"The request body must be a JSON object, got {json_type(body)}.")
    if _SURROGATE_ESCAPE.search(text):  # the only way valid UTF-8 JSON can hold a lone surrogate
        bad = _lone_surrogate_path(body)
        if bad is not None:
            raise bad_request(f"'{bad}' is not valid Unicode text: it holds a lone UTF-16 surrogate "
                              "escape (\\uD800-\\uDFFF without its pair).", bad)
    return body


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _lone_surrogate_path(body: dict) -> Optional[str]:
    """The path (`messages[0].content`) of the first string or key that is not valid Unicode."""
    stack: list[tuple[str, Any]] = [("", body)]
    while stack:
        path, v = stack.pop()
        if isinstance(v, dict):
            for k, x in v.items():
                sub = f"{path}.{k}" if path else str(k)
                if not _is_unicode(k):
                    return sub
                stack.append((sub, x))
        elif isinstance(v, list):
            stack.extend((f"{path}[{i}]", x) for i, x in enumerate(v))
        elif isinstance(v, str) and not _is_unicode(v):
            return path
    return None


def _is_unicode(text: str) -> bool:
    try:
        check_text(text, "")
    except ValueError:
        return False
    return True


# ---------------------------------------------------------------------------------------------
# Request bodies
# ---------------------------------------------------------------------------------------------
@dataclass
class ServerLimits:
    """What requests are checked against; passed to validation as its context."""
    max_model_len: int
    vocab_size: int
    max_logprobs: int = 20
    # The model's generation_config.json sampling defaults, for fields a request leaves out.
    sampling_defaults: dict = field(default_factory=dict)


class Request(StrictModel):
    """A request body, or an object in one: a null field is the field left out."""
    # Fields whose explicit null differs from leaving them out (max_tokens: null means up to the
    # context length, while a missing max_tokens is the endpoint's default).
    NULL_MEANS_SOMETHING: ClassVar[frozenset] = frozenset()

    @model_validator(mode="before")
    @classmethod
    def _drop_nulls(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None or k in cls.NULL_MEANS_SOMETHING}
        return data

    def check(self) -> None:
        """Rules across fields, as a 400 naming the field to fix (none unless a body has some)."""


def parse(schema: type[Request], raw: bytes, limits: ServerLimits) -> Any:
    """The JSON request body `raw` as an instance of `schema`; a 400 naming the first bad field."""
    try:
        req = schema.model_validate_json(raw, context=limits)
    except ValidationError as e:
        if e.errors(include_url=False)[0]["type"] != "json_invalid":
            raise bad_request(*reversed(describe(e))) from None
        # pydantic's JSON parser refuses more than JSON does (nesting past 200 levels) and says
        # less (not which string holds a lone surrogate): Python's parser decides, and names it.
        try:
            req = schema.model_validate(parse_json_body(raw), context=limits)
        except ValidationError as e:
            raise bad_request(*reversed(describe(e))) from None
    req.check()
    return req


def _token_ids(ids: Any, name: str, limits: ServerLimits) -> list[int]:
    # The engine's own check (integers, not empty, in the vocabulary), reported here as the field's.
    try:
        return as_token_ids(ids, name, limits.vocab_size)
    except (TypeError, ValueError) as e:
        raise invalid(str(e).removeprefix(name + " ")) from None


def _unsupported(v: Any, feature: str = "") -> Any:
    """`v` unless it asks for something not supported (is set or true)."""
    if v:
        raise invalid(f"is not supported ({feature})" if feature else "is not supported")
    return v


def _as_list(v: Any) -> Any:
    return [v] if isinstance(v, str) else v


class JSONSchemaFormat(Request):
    name: Optional[str] = None
    description: Optional[str] = None
    schema_: dict = Field(validation_alias="schema")
    strict: Optional[bool] = None


class ResponseFormat(Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JSONSchemaFormat] = None


class StructuredOutputs(Request):
    """vLLM's `structured_outputs` request field (StructuredOutputsParams' fields)."""
    json_: Any = Field(None, validation_alias="json")  # a schema, or its JSON text
    regex: Optional[str] = None
    choice: Optional[list[str]] = None
    grammar: Optional[str] = None
    json_object: Optional[bool] = None


class StreamOptions(Request):
    include_usage: bool = False
    continuous_usage_stats: bool = False


MAX_PROMPTS = 1024


class _GenerationRequest(Request):
    """The fields completions and chat share: sampling, streaming, and features refused."""
    KIND: ClassVar[str]
    NULL_MEANS_SOMETHING = frozenset({"max_tokens", "max_completion_tokens"})

    model: Optional[str] = None
    n: Int = Field(1, ge=1, le=128)
    best_of: Optional[Int] = None
    seed: Optional[Int] = Field(None, ge=-(2 ** 63), le=2 ** 64 - 1)
    # None: the model's generation config's value, else SamplingParams' default.
    temperature: Optional[float] = Field(None, ge=0.0, le=1e6)
    top_p: Optional[float] = None
    top_k: Optional[Int] = Field(None, ge=-1, le=2 ** 31 - 1)
    min_p: Optional[float] = None
    repetition_penalty: Optional[float] = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: Annotated[Optional[list[str]], BeforeValidator(_as_list)] = None  # or one string
    stop_token_ids: Optional[list[Int]] = None
    ignore_eos: bool = False
    min_tokens: Int = Field(0, ge=0, le=2 ** 31 - 1)
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    max_tokens: Optional[Int] = Field(None, ge=1, le=INT64_MAX)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    prompt_logprobs: Optional[Int] = Field(None, ge=0)
    user: Optional[str] = None
    logit_bias: Optional[dict[str, float]] = None   # token id (as JSON keys are strings) -> bias
    allowed_token_ids: Optional[list[Int]] = None
    bad_words: Optional[list[str]] = None
    functions: Optional[list] = None             # OpenAI's legacy names of tools and tool_choice
    function_call: Literal["none", "auto"] = "none"
    response_format: Optional[ResponseFormat] = None
    structured_outputs: Optional[StructuredOutputs] = None
    guided_json: Any = None   # vLLM's older names of structured_outputs' fields
    guided_regex: Optional[str] = None
    guided_choice: Optional[list[str]] = None
    guided_grammar: Optional[str] = None
    prompt_embeds: Any = None
    lora_request: Any = None

    @field_validator("stop_token_ids")
    @classmethod
    def _stop_ids_in_vocab(cls, ids: list[int], info: ValidationInfo) -> list[int]:
        return _token_ids(ids, "stop_token_ids", info.context) if ids else ids

    @field_validator("prompt_logprobs")
    @classmethod
    def _prompt_logprobs_allowed(cls, k: Optional[int], info: ValidationInfo) -> Optional[int]:
        return _at_most(k, info.context.max_logprobs)

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias_ids(cls, bias: dict[str, float], info: ValidationInfo) -> dict[int, float]:
        # JSON keys are strings: here they become token ids; SamplingParams checks the rest.
        if not all(key.isdigit() for key in bias):
            raise invalid("must map token ids (integer strings) to biases")
        ids = _token_ids([int(key) for key in bias], "logit_bias", info.context) if bias else []
        return dict(zip(ids, bias.values()))

    @field_validator("allowed_token_ids")
    @classmethod
    def _allowed_ids_in_vocab(cls, ids: list[int], info: ValidationInfo) -> list[int]:
        return _token_ids(ids, "allowed_token_ids", info.context)

    @field_validator("functions")
    @classmethod
    def _no_functions(cls, v: list) -> list:
        return _unsupported(v, "use tools")

    @field_validator("prompt_embeds", "lora_request")
    @classmethod
    def _no_embeds_or_lora(cls, v: Any) -> Any:
        return _unsupported(v is not None)


    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def continuous_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.continuous_usage_stats

    @property
    def requested_max_tokens(self) -> Optional[int]:
        """None: up to the context length."""
        return self.max_tokens

    @property
    def num_logprobs(self) -> Optional[int]:
        """Top logprobs per output token; None: no logprobs."""
        raise NotImplementedError

    @property
    def num_prompt_logprobs(self) -> Optional[int]:
        return self.prompt_logprobs

    def _constraints(self) -> list[str]:
        """The fields given that constrain the output."""
        return [name for name in ("response_format", "structured_outputs", "guided_json",
                                  "guided_regex", "guided_choice", "guided_grammar")
                if getattr(self, name) is not None
                and not (name == "response_format" and self.response_format.type == "text")]

    @property
    def structured_outputs_field(self) -> Optional[str]:
        """The field that constrains the output, if any."""
        given = self._constraints()
        return given[0] if given else None

    def structured_outputs_params(self) -> Optional[StructuredOutputsParams]:
        name = self.structured_outputs_field
        if name is None:
            return None
        if name == "response_format":
            fmt = self.response_format
            if fmt.type == "json_object":
                return StructuredOutputsParams(json_object=True)
            if fmt.json_schema is None:
                raise bad_request("'response_format.json_schema' is required for type "
                                  "'json_schema'.", "response_format.json_schema")
            return StructuredOutputsParams(json=fmt.json_schema.schema_)
        if name == "structured_outputs":
            spec = self.structured_outputs
            return StructuredOutputsParams(json=spec.json_, regex=spec.regex, choice=spec.choice,
                                           grammar=spec.grammar, json_object=spec.json_object)
        return StructuredOutputsParams(**{name.removeprefix("guided_"): getattr(self, name)})

    def check(self) -> None:
        """Rules across fields, as a 400 naming the field to fix."""
        given = self._constraints()
        if len(given) > 1:
            raise bad_request(f"Give one way to constrain the output, not {' and '.join(given)}.",
                              given[1])
        try:
            self.structured_outputs_params()
        except ValueError as e:
            raise bad_request(f"{e}.", self.structured_outputs_field) from None
        if self.best_of is not None and self.best_of != self.n:
            raise bad_request(f"'best_of' ({self.best_of}) != 'n' ({self.n}) is not supported.",
                              "best_of")
        if self.stream_options is not None and not self.stream:
            raise bad_request("'stream_options' is only allowed when 'stream' is true.",
                              "stream_options")

    def sampling_params(self, max_tokens: int, defaults: dict) -> SamplingParams:
        """The request's SamplingParams; `defaults` fill the sampling fields it leaves out."""
        if self.min_tokens > max_tokens:
            raise bad_request(f"'min_tokens' ({self.min_tokens}) must be <= max_tokens "
                              f"({max_tokens}).", "min_tokens")
        seed = self.seed
        if seed is not None and seed != -1:  # -1: no seed (SamplingParams' meaning too)
            seed %= INT64_MAX
        top_k = self.top_k if self.top_k is not None else defaults.get("top_k", 0)
        kw = dict(
            n=self.n, max_tokens=max_tokens, seed=seed,
            temperature=_given(self.temperature, defaults, "temperature", 1.0),
            top_p=_given(self.top_p, defaults, "top_p", 1.0),
            top_k=max(top_k, 0),
            min_p=_given(self.min_p, defaults, "min_p", 0.0),
            repetition_penalty=_given(self.repetition_penalty, defaults, "repetition_penalty", 1.0),
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            stop=[s for s in self.stop or () if s], stop_token_ids=self.stop_token_ids or [],
            ignore_eos=self.ignore_eos,
            min_tokens=self.min_tokens, skip_special_tokens=self.skip_special_tokens,
            spaces_between_special_tokens=self.spaces_between_special_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output,
            logprobs=self.num_logprobs, prompt_logprobs=self.num_prompt_logprobs,
            structured_outputs=self.structured_outputs_params(),
            logit_bias=self.logit_bias or None, allowed_token_ids=self.allowed_token_ids,
            bad_words=self.bad_words,
            # Streamed or not, the server takes each step's new tokens: the engine then copies
            # only those (cumulative outputs copy everything so far, every step).
            output_kind=RequestOutputKind.DELTA)
        try:
            return SamplingParams(**kw)
        except (ValueError, TypeError) as e:  # SamplingParams' messages start with the field
            msg = str(e)
            param = msg.split(" ", 1)[0]
            raise bad_request(msg, param if param in kw else None) from None


def _given(v: Optional[float], defaults: dict, name: str, fallback: float) -> float:
    return v if v is not None else defaults.get(name, fallback)


def _at_most(k: Optional[int], limit: int) -> Optional[int]:
    if k is not None and k > limit:
        raise invalid(f"must be <= {limit} (the server's max_logprobs), got {k}")
    return k


class CompletionRequest(_GenerationRequest):
    KIND = "completion"
    prompts: list[Union[str, list[int]]] = Field(validation_alias="prompt")
    suffix: str = ""
    echo: bool = False
    logprobs: Optional[Int] = Field(None, ge=0)
    max_tokens: Optional[Int] = Field(16, ge=1, le=INT64_MAX)
    add_special_tokens: bool = True
    tools: Optional[list] = None
    tool_choice: Literal["none", "auto"] = "none"

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, v: list) -> list:
        return _unsupported(v, "tools are for chat completions")

    @field_validator("prompts", mode="before")
    @classmethod
    def _prompts(cls, v: Any, info: ValidationInfo) -> list:
        """A string, an array of strings, an array of token ids, or an array of such arrays."""
        if isinstance(v, str):
            return [v]
        if not isinstance(v, list):
            raise invalid(f"must be a string or an array, got {json_type(v)}")
        if not v:
            raise invalid("must not be empty")
        if not isinstance(v[0], (str, list)):
            return [_token_ids(v, "prompt", info.context)]
        if len(v) > MAX_PROMPTS:
            raise invalid(f"holds {len(v)} prompts; at most {MAX_PROMPTS} are allowed")
        if all(isinstance(x, str) for x in v):
            return v
        if all(isinstance(x, list) for x in v):
            return [_token_ids(ids, f"prompt[{i}]", info.context) for i, ids in enumerate(v)]
        raise invalid("must be a string, an array of strings, an array of token ids, or an "
                      "array of token-id arrays")

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, v: str) -> str:
        return _unsupported(v)

    @field_validator("logprobs")
    @classmethod
    def _logprobs_allowed(cls, k: Optional[int], info: ValidationInfo) -> Optional[int]:
        return _at_most(k, info.context.max_logprobs)

    @property
    def num_logprobs(self) -> Optional[int]:
        return self.logprobs

    @property
    def num_prompt_logprobs(self) -> Optional[int]:
        # Echoed logprobs cover the prompt too.
        if self.echo and self.logprobs is not None and self.prompt_logprobs is None:
            return self.logprobs
        return self.prompt_logprobs


class ChatTemplateFields(Request):
    """How messages become a prompt (chat completions and /tokenize)."""
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: Optional[dict] = None
    chat_template: Optional[str] = None

    @field_validator("chat_template")
    @classmethod
    def _no_template_override(cls, v: Optional[str]) -> Optional[str]:
        return _unsupported(v is not None, "a chat template of the request's own")

    def check_template_flags(self, messages: list[ChatMessage]) -> None:
        if self.add_generation_prompt and self.continue_final_message:
            raise bad_request("'continue_final_message' and 'add_generation_prompt' cannot both be "
                              "true.", "continue_final_message")
        if self.continue_final_message and messages[-1].role != "assistant":
            raise bad_request("'continue_final_message' needs a final assistant message.",
                              "continue_final_message")


class NamedFunction(Request):
    name: str


class NamedToolChoice(Request):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(ChatTemplateFields, _GenerationRequest):
    KIND = "chat"
    messages: Messages
    tools: Optional[list[Tool]] = None
    # "none" | "auto" | "required" | {"type": "function", "function": {"name": ...}}; left out:
    # "auto" with tools, else "none" (OpenAI's default).
    tool_choice: Any = None
    parallel_tool_calls: bool = True
    logprobs: bool = False
    top_logprobs: Optional[Int] = Field(None, ge=0)
    max_completion_tokens: Optional[Int] = Field(None, ge=1, le=INT64_MAX)
    echo: bool = False
    add_special_tokens: bool = False

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_allowed(cls, k: Optional[int], info: ValidationInfo) -> Optional[int]:
        return _at_most(k, min(20, info.context.max_logprobs))

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, v: bool) -> bool:
        return _unsupported(v, "for chat completions")

    @property
    def requested_max_tokens(self) -> Optional[int]:
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return self.max_tokens

    @property
    def num_logprobs(self) -> Optional[int]:
        return (self.top_logprobs or 0) if self.logprobs else None

    @field_validator("tool_choice")
    @classmethod
    def _tool_choice(cls, v: Any) -> Any:
        if isinstance(v, str):
            if v not in ("none", "auto", "required"):
                raise invalid("must be 'none', 'auto', 'required' or a named function")
            return v
        try:
            return NamedToolChoice.model_validate(v)
        except ValidationError as e:
            raise invalid(describe(e, "tool_choice")[1].removeprefix("'tool_choice' ")) from None

    @property
    def effective_tool_choice(self) -> str | NamedToolChoice:
        if self.tool_choice is not None:
            return self.tool_choice
        return "auto" if self.tools else "none"

    @property
    def forced_tool_calls(self) -> bool:
        """tool_choice "required" or a named function: the output is the call, by a grammar."""
        choice = self.effective_tool_choice
        return choice == "required" or isinstance(choice, NamedToolChoice)

    def _constraints(self) -> list[str]:
        given = super()._constraints()
        return given + ["tool_choice"] if self.forced_tool_calls else given

    def structured_outputs_params(self) -> Optional[StructuredOutputsParams]:
        if self.structured_outputs_field != "tool_choice":
            return super().structured_outputs_params()
        choice = self.effective_tool_choice
        if isinstance(choice, NamedToolChoice):
            return StructuredOutputsParams(json=self._tool(choice.function.name).function.parameters
                                           or {"type": "object"})
        # vLLM's form for "required": an array of {"name", "parameters"} objects, one per call.
        calls = {"type": "array", "minItems": 1, "items": {"anyOf": [
            {"type": "object", "properties": {"name": {"type": "string", "enum": [t.function.name]},
                                              "parameters": t.function.parameters
                                              or {"type": "object"}},
             "required": ["name", "parameters"]} for t in self.tools]}}
        if not self.parallel_tool_calls:
            calls["maxItems"] = 1
        return StructuredOutputsParams(json=calls)

    def _tool(self, name: str) -> Tool:
        for tool in self.tools or ():
            if tool.function.name == name:
                return tool
        raise bad_request(f"tool_choice names the function {name!r}, which is not in 'tools'.",
                          "tool_choice")

    def check(self) -> None:
        choice = self.effective_tool_choice
        if choice != "none" and not self.tools:
            raise bad_request("'tool_choice' needs 'tools'.", "tool_choice")
        if isinstance(choice, NamedToolChoice):
            self._tool(choice.function.name)
        super().check()
        if self.top_logprobs and not self.logprobs:
            raise bad_request("'top_logprobs' requires 'logprobs' to be true.", "top_logprobs")
        self.check_template_flags(self.messages)


class TokenizeRequest(ChatTemplateFields):
    model: Optional[str] = None
    prompt: Optional[str] = None
    messages: Optional[Messages] = None
    add_special_tokens: Optional[bool] = None  # None: True for a prompt, False for messages
    return_token_strs: bool = False

    def check(self) -> None:
        if self.messages is None:
            if self.prompt is None:
                raise bad_request("'prompt' or 'messages' is required.", "prompt")
        elif self.prompt is not None:
            raise bad_request("Give either 'prompt' or 'messages', not both.", "prompt")
        else:
            self.check_template_flags(self.messages)


class DetokenizeRequest(Request):
    model: Optional[str] = None
    tokens: list[Int]

    @field_validator("tokens")
    @classmethod
    def _in_vocab(cls, ids: list[int], info: ValidationInfo) -> list[int]:
        return _token_ids(ids, "tokens", info.context)


# ---------------------------------------------------------------------------------------------
# Response helpers
# ---------------------------------------------------------------------------------------------
def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def clean_logprob(v: Optional[float]) -> Optional[float]:
    if v is None:
        return None
    v = float(v)
    if math.isnan(v):
        return -9999.0
    return max(v, -9999.0) if v != math.inf else 0.0


def usage(prompt_tokens: int, completion_tokens: int, cached: int = 0) -> dict:
    u = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
         "total_tokens": prompt_tokens + completion_tokens}
    if cached:
        u["prompt_tokens_details"] = {"cached_tokens": cached}
    return u
