"""OpenAI-compatible request parsing and validation, and response shapes.

Parsing is hand-written and strict about types (no silent coercion of "0.5" into 0.5) so that every
malformed request becomes a 4xx `APIError` naming the offending field, never an exception deeper in
the server or the engine. Unknown fields are ignored (as vLLM and OpenAI do); known fields whose
feature is not supported (tools, logit_bias, non-text response_format, ...) are rejected.
"""
from __future__ import annotations

import json
import math
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional

from jaxvllm.engine.llm_engine import as_token_ids, check_text
from jaxvllm.sampling_params import RequestOutputKind, SamplingParams

_MISSING = object()
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
        raise bad_request(f"The request body must be a JSON object, got {_jtype(body)}.")
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


def _jtype(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int):
        return "integer"
    if isinstance(v, float):
        return "number"
    if isinstance(v, str):
        return "string"
    if isinstance(v, list):
        return "array"
    if isinstance(v, dict):
        return "object"
    return type(v).__name__


# ---------------------------------------------------------------------------------------------
# Typed field readers
# ---------------------------------------------------------------------------------------------
class Fields:
    """Reads typed fields out of a JSON object, raising APIError(param=name) on bad values."""

    def __init__(self, body: dict, prefix: str = ""):
        self.body = body
        self.prefix = prefix

    def _name(self, name: str) -> str:
        return self.prefix + name

    def has(self, name: str) -> bool:
        return self.body.get(name) is not None

    def raw(self, name: str, default: Any = None) -> Any:
        v = self.body.get(name, default)
        return default if v is None else v

    def bool(self, name: str, default: Optional[bool] = None) -> Optional[bool]:
        v = self.body.get(name)
        if v is None:
            return default
        if not isinstance(v, bool):
            raise bad_request(f"'{self._name(name)}' must be a boolean, got {_jtype(v)}.",
                              self._name(name))
        return v

    def int(self, name: str, default: Optional[int] = None, lo: Optional[int] = None,
            hi: Optional[int] = None) -> Optional[int]:
        v = self.body.get(name)
        if v is None:
            return default
        v = as_int(v, self._name(name))
        check_range(v, self._name(name), lo, hi)
        return v

    def num(self, name: str, default: Optional[float] = None, lo: Optional[float] = None,
            hi: Optional[float] = None) -> Optional[float]:
        v = self.body.get(name)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise bad_request(f"'{self._name(name)}' must be a number, got {_jtype(v)}.",
                              self._name(name))
        v = float(v)
        if not math.isfinite(v):
            raise bad_request(f"'{self._name(name)}' must be a finite number.", self._name(name))
        check_range(v, self._name(name), lo, hi)
        return v

    def str(self, name: str, default: Optional[str] = None) -> Optional[str]:
        v = self.body.get(name)
        if v is None:
            return default
        if not isinstance(v, str):
            raise bad_request(f"'{self._name(name)}' must be a string, got {_jtype(v)}.",
                              self._name(name))
        return v

    def obj(self, name: str) -> Optional[dict]:
        v = self.body.get(name)
        if v is None:
            return None
        if not isinstance(v, dict):
            raise bad_request(f"'{self._name(name)}' must be an object, got {_jtype(v)}.",
                              self._name(name))
        return v


def as_int(v: Any, name: str) -> int:
    if isinstance(v, bool):
        raise bad_request(f"'{name}' must be an integer, got boolean.", name)
    if isinstance(v, int):
        return v
    if isinstance(v, float) and math.isfinite(v) and v.is_integer():
        return int(v)
    raise bad_request(f"'{name}' must be an integer, got {_jtype(v)}.", name)


def check_range(v: float, name: str, lo: Optional[float], hi: Optional[float]) -> None:
    if lo is not None and v < lo:
        raise bad_request(f"'{name}' must be >= {lo}, got {v}.", name)
    if hi is not None and v > hi:
        raise bad_request(f"'{name}' must be <= {hi}, got {v}.", name)


# ---------------------------------------------------------------------------------------------
# Parsed requests
# ---------------------------------------------------------------------------------------------
@dataclass
class ServerLimits:
    max_model_len: int
    vocab_size: int
    max_logprobs: int = 20
    # The model's generation_config.json sampling defaults, for fields a request leaves out.
    sampling_defaults: dict = field(default_factory=dict)


@dataclass
class GenerationRequest:
    """What the completions and chat handlers need, validated."""
    kind: str                                   # "completion" | "chat"
    model: Optional[str]
    prompts: list                               # str or list[int] per prompt (completions)
    sampling: dict                              # SamplingParams keywords, minus max_tokens
    max_tokens: Optional[int]                   # None: up to the context length
    n: int
    stream: bool
    include_usage: bool
    continuous_usage: bool
    echo: bool = False
    logprobs: Optional[int] = None              # completions: top-N; chat: top_logprobs
    want_logprobs: bool = False                 # chat: logprobs=true
    prompt_logprobs: Optional[int] = None
    messages: Optional[list] = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: Optional[bool] = None
    chat_template_kwargs: dict = field(default_factory=dict)
    user: Optional[str] = None


def _parse_stop(f: Fields) -> list[str]:
    v = f.body.get("stop")
    if v is None:
        return []
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise bad_request("'stop' must be a string or an array of strings.", "stop")
    return [s for s in v if s]  # their count is SamplingParams' to check


def _parse_int_list(f: Fields, name: str, vocab: Optional[int] = None) -> list[int]:
    v = f.body.get(name)
    if v is None:
        return []
    if not isinstance(v, list):
        raise bad_request(f"'{name}' must be an array of integers, got {_jtype(v)}.", name)
    out = []
    for x in v:
        x = as_int(x, name)
        if x < 0 or (vocab is not None and x >= vocab):
            raise bad_request(f"'{name}' holds token id {x}, outside [0, {vocab}).", name)
        out.append(x)
    return out


def _reject_unsupported(f: Fields) -> None:
    lb = f.body.get("logit_bias")
    if lb is not None:
        if not isinstance(lb, dict):
            raise bad_request("'logit_bias' must be an object.", "logit_bias")
        if lb:
            raise bad_request("'logit_bias' is not supported.", "logit_bias")
    for name in ("tools", "functions"):
        v = f.body.get(name)
        if v is not None:
            if not isinstance(v, list):
                raise bad_request(f"'{name}' must be an array.", name)
            if v:
                raise bad_request(f"'{name}' (tool calling) is not supported.", name)
    for name in ("tool_choice", "function_call"):
        v = f.body.get(name)
        if v is not None and v != "none" and v != "auto":
            raise bad_request(f"'{name}' is not supported.", name)
    for name in ("guided_json", "guided_regex", "guided_choice", "guided_grammar", "structured_outputs"):
        if f.body.get(name) is not None:
            raise bad_request(f"'{name}' (structured output) is not supported.", name)
    if f.body.get("prompt_embeds") is not None:
        raise bad_request("'prompt_embeds' is not supported.", "prompt_embeds")
    if f.body.get("lora_request") is not None:
        raise bad_request("'lora_request' is not supported.", "lora_request")


def _common(f: Fields, limits: ServerLimits, kind: str) -> dict:
    """Sampling fields shared by completions and chat, as SamplingParams keywords."""
    _reject_unsupported(f)
    n = f.int("n", 1, lo=1, hi=128)
    best_of = f.int("best_of", None)
    if best_of is not None and best_of != n:
        raise bad_request(f"'best_of' ({best_of}) != 'n' ({n}) is not supported.", "best_of")
    seed = f.int("seed", None, lo=-(2 ** 63), hi=2 ** 64 - 1)
    if seed is not None and seed != -1:  # -1: no seed (SamplingParams' meaning too)
        seed %= INT64_MAX
    d = limits.sampling_defaults
    top_k = f.int("top_k", d.get("top_k", 0), lo=-1, hi=2 ** 31 - 1)
    sampling = dict(
        n=n,
        temperature=f.num("temperature", d.get("temperature", 1.0), lo=0.0, hi=1e6),
        top_p=f.num("top_p", d.get("top_p", 1.0)),
        top_k=max(top_k, 0),
        min_p=f.num("min_p", d.get("min_p", 0.0)),
        presence_penalty=f.num("presence_penalty", 0.0),
        frequency_penalty=f.num("frequency_penalty", 0.0),
        repetition_penalty=f.num("repetition_penalty", d.get("repetition_penalty", 1.0)),
        seed=seed,
        stop=_parse_stop(f),
        stop_token_ids=_parse_int_list(f, "stop_token_ids", limits.vocab_size),
        ignore_eos=f.bool("ignore_eos", False),
        min_tokens=f.int("min_tokens", 0, lo=0, hi=2 ** 31 - 1),
        skip_special_tokens=f.bool("skip_special_tokens", True),
        spaces_between_special_tokens=f.bool("spaces_between_special_tokens", True),
        include_stop_str_in_output=f.bool("include_stop_str_in_output", False),
    )
    f.str("user")
    return sampling


def _stream_opts(f: Fields) -> tuple[bool, bool, bool]:
    stream = f.bool("stream", False)
    so = f.obj("stream_options")
    include_usage = continuous = False
    if so is not None:
        if not stream:
            raise bad_request("'stream_options' is only allowed when 'stream' is true.",
                              "stream_options")
        sf = Fields(so, "stream_options.")
        include_usage = sf.bool("include_usage", False)
        continuous = sf.bool("continuous_usage_stats", False)
    return stream, include_usage, continuous


def _max_tokens(f: Fields, names: tuple[str, ...], default: Optional[int]) -> Optional[int]:
    for name in names:
        if f.has(name):
            return f.int(name, None, lo=1, hi=2 ** 63 - 1)
    # An explicit null means "up to the context length", as in vLLM (not the completions default).
    return None if any(name in f.body for name in names) else default


def parse_prompt(v: Any, limits: ServerLimits) -> list:
    """OpenAI `prompt`: a string, array of strings, array of token ids, or array of such arrays."""
    if v is None:
        raise bad_request("'prompt' is required.", "prompt")
    if isinstance(v, str):
        return [v]
    if not isinstance(v, list):
        raise bad_request(f"'prompt' must be a string or an array, got {_jtype(v)}.", "prompt")
    if not v:
        raise bad_request("'prompt' must not be empty.", "prompt")
    if all(isinstance(x, str) for x in v):
        return list(v)
    if all(isinstance(x, int) and not isinstance(x, bool) for x in v):
        return [_check_ids(v, limits)]
    if all(isinstance(x, list) for x in v):
        return [_check_ids(ids, limits, f"prompt[{i}]") for i, ids in enumerate(v)]
    raise bad_request("'prompt' must be a string, an array of strings, an array of token ids, or "
                      "an array of token-id arrays.", "prompt")


def _check_ids(ids: list, limits: ServerLimits, name: str = "prompt") -> list[int]:
    """The engine's token-id checks (integers, not empty, in the vocabulary), as a 400."""
    try:
        return as_token_ids(ids, f"'{name}'", limits.vocab_size)
    except (TypeError, ValueError) as e:
        raise bad_request(f"{e}.", "prompt") from None


MAX_PROMPTS = 1024


def parse_completion_request(body: dict, limits: ServerLimits) -> GenerationRequest:
    f = Fields(body)
    model = f.str("model")
    prompts = parse_prompt(body.get("prompt"), limits)
    if len(prompts) > MAX_PROMPTS:
        raise bad_request(f"At most {MAX_PROMPTS} prompts per request.", "prompt")
    if body.get("suffix") is not None:
        if not isinstance(body["suffix"], str):
            raise bad_request("'suffix' must be a string.", "suffix")
        if body["suffix"]:
            raise bad_request("'suffix' is not supported.", "suffix")
    sampling = _common(f, limits, "completion")
    logprobs = f.int("logprobs", None, lo=0, hi=limits.max_logprobs)
    prompt_logprobs = f.int("prompt_logprobs", None, lo=0, hi=limits.max_logprobs)
    echo = f.bool("echo", False)
    stream, include_usage, continuous = _stream_opts(f)
    max_tokens = _max_tokens(f, ("max_tokens",), 16)
    if echo and logprobs is not None and prompt_logprobs is None:
        prompt_logprobs = logprobs
    return GenerationRequest(
        kind="completion", model=model, prompts=prompts, sampling=sampling, max_tokens=max_tokens,
        n=sampling["n"], stream=stream, include_usage=include_usage, continuous_usage=continuous,
        echo=echo, logprobs=logprobs, want_logprobs=logprobs is not None,
        prompt_logprobs=prompt_logprobs, add_special_tokens=f.bool("add_special_tokens", True),
        user=f.str("user"))


CHAT_ROLES = ("system", "user", "assistant", "developer", "tool")


def parse_messages(v: Any, param: str = "messages") -> list[dict]:
    if v is None:
        raise bad_request(f"'{param}' is required.", param)
    if not isinstance(v, list):
        raise bad_request(f"'{param}' must be an array, got {_jtype(v)}.", param)
    if not v:
        raise bad_request(f"'{param}' must not be empty.", param)
    out = []
    for i, m in enumerate(v):
        p = f"{param}[{i}]"
        if not isinstance(m, dict):
            raise bad_request(f"'{p}' must be an object, got {_jtype(m)}.", p)
        role = m.get("role")
        if not isinstance(role, str):
            raise bad_request(f"'{p}.role' is required and must be a string.", f"{p}.role")
        if role not in CHAT_ROLES:
            raise bad_request(f"'{p}.role' must be one of {', '.join(CHAT_ROLES)}; got {role!r}.",
                              f"{p}.role")
        if m.get("tool_calls"):
            raise bad_request(f"'{p}.tool_calls' is not supported.", f"{p}.tool_calls")
        content = m.get("content", _MISSING)
        if content is _MISSING or content is None:
            if role != "assistant":
                raise bad_request(f"'{p}.content' is required.", f"{p}.content")
            content = ""
        elif isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                pp = f"{p}.content[{j}]"
                if not isinstance(part, dict):
                    raise bad_request(f"'{pp}' must be an object.", pp)
                ptype = part.get("type")
                if ptype not in ("text", "input_text"):
                    raise bad_request(f"'{pp}.type' {ptype!r} is not supported; only 'text' parts "
                                      "are.", f"{pp}.type")
                text = part.get("text")
                if not isinstance(text, str):
                    raise bad_request(f"'{pp}.text' must be a string.", f"{pp}.text")
                texts.append(text)
            content = "\n".join(texts)
        elif not isinstance(content, str):
            raise bad_request(f"'{p}.content' must be a string or an array of text parts, got "
                              f"{_jtype(content)}.", f"{p}.content")
        msg = {"role": role, "content": content}
        name = m.get("name")
        if name is not None:
            if not isinstance(name, str):
                raise bad_request(f"'{p}.name' must be a string.", f"{p}.name")
            msg["name"] = name
        out.append(msg)
    return out


def parse_chat_request(body: dict, limits: ServerLimits) -> GenerationRequest:
    f = Fields(body)
    model = f.str("model")
    messages = parse_messages(body.get("messages"))
    rf = f.obj("response_format")
    if rf is not None:
        t = rf.get("type")
        if t != "text":
            raise bad_request(f"'response_format.type' {t!r} is not supported; only 'text' is.",
                              "response_format")
    sampling = _common(f, limits, "chat")
    want_lp = f.bool("logprobs", False)
    top_lp = f.int("top_logprobs", None, lo=0, hi=min(20, limits.max_logprobs))
    if top_lp is not None and top_lp > 0 and not want_lp:
        raise bad_request("'top_logprobs' requires 'logprobs' to be true.", "top_logprobs")
    stream, include_usage, continuous = _stream_opts(f)
    max_tokens = _max_tokens(f, ("max_completion_tokens", "max_tokens"), None)
    add_gen = f.bool("add_generation_prompt", True)
    cont = f.bool("continue_final_message", False)
    if add_gen and cont:
        raise bad_request("'continue_final_message' and 'add_generation_prompt' cannot both be "
                          "true.", "continue_final_message")
    if cont and messages[-1]["role"] != "assistant":
        raise bad_request("'continue_final_message' needs a final assistant message.",
                          "continue_final_message")
    ctk = f.obj("chat_template_kwargs") or {}
    if f.body.get("chat_template") is not None:
        raise bad_request("'chat_template' overrides are not supported.", "chat_template")
    if f.bool("echo", False):
        raise bad_request("'echo' is not supported for chat completions.", "echo")
    return GenerationRequest(
        kind="chat", model=model, prompts=[], sampling=sampling, max_tokens=max_tokens,
        n=sampling["n"], stream=stream, include_usage=include_usage, continuous_usage=continuous,
        logprobs=(top_lp or 0) if want_lp else None, want_logprobs=want_lp,
        messages=messages, add_generation_prompt=add_gen, continue_final_message=cont,
        add_special_tokens=f.bool("add_special_tokens", False), chat_template_kwargs=ctk,
        user=f.str("user"))


def build_sampling_params(req: GenerationRequest, max_tokens: int) -> SamplingParams:
    kw = dict(req.sampling)
    kw["max_tokens"] = max_tokens
    kw["logprobs"] = req.logprobs
    kw["prompt_logprobs"] = req.prompt_logprobs
    # Streamed or not, the server takes each step's new tokens: the engine then copies only those
    # (cumulative outputs copy everything so far, every step).
    kw["output_kind"] = RequestOutputKind.DELTA
    if kw["min_tokens"] > max_tokens:
        raise bad_request(f"'min_tokens' ({kw['min_tokens']}) must be <= max_tokens "
                          f"({max_tokens}).", "min_tokens")
    try:
        return SamplingParams(**kw)
    except (ValueError, TypeError) as e:
        msg = str(e)
        param = msg.split(" ", 1)[0] if msg else None
        if param not in kw:
            param = None
        raise bad_request(msg, param) from None


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
