"""The aiohttp application: engine loading and draining, error and auth middlewares, request
plumbing shared by all endpoints, and every endpoint except generation (see serving.py)."""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import threading
from typing import Any, Callable, Iterator, Optional

from aiohttp import web

from jaxvllm.config import EngineArgs
from jaxvllm.entrypoints.openai import protocol as P
from jaxvllm.entrypoints.openai.logprobs import decode_token
from jaxvllm.entrypoints.openai.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from jaxvllm.entrypoints.openai.metrics import ServerMetrics
from jaxvllm.entrypoints.openai.protocol import APIError, bad_request
from jaxvllm.entrypoints.openai.responses import error_response, internal_error, json_response
from jaxvllm.entrypoints.openai.serving import OpenAIServing

logger = logging.getLogger("jaxvllm.server")

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
# A request body is read whole into memory before it is parsed. 32 MiB holds a batch of 32 prompts of
# 128k token ids each (a 128k-token prompt as ids is ~0.9 MB, as text ~0.5 MB); 1 MiB, aiohttp's own
# default, refused a single long prompt sent as token ids.
DEFAULT_MAX_BODY = 32 << 20
DEFAULT_MAX_WAITING = 1024
DEFAULT_STREAM_WRITE_TIMEOUT = 60.0
OPEN_PATHS = frozenset({"/health", "/metrics", "/version", "/ping"})
_CHAT_TEMPLATE_RESERVED = frozenset({
    "conversation", "tools", "documents", "chat_template", "add_generation_prompt",
    "continue_final_message", "tokenize", "padding", "truncation", "max_length", "return_tensors",
    "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs"})


def _version() -> str:
    try:
        from importlib.metadata import version
        return version("jaxvllm")
    except Exception:
        return "0.1.0"


def default_served_model_name(model: Optional[str]) -> str:
    if not model:
        return DEFAULT_MODEL_NAME
    return os.path.basename(model.rstrip("/\\")) or model


_HTTP_ERROR_TYPES = {401: "AuthenticationError", 404: "NotFoundError", 405: "MethodNotAllowed",
                     413: "RequestEntityTooLarge", 503: "ServiceUnavailableError"}


def _default_engine_factory(engine_args: EngineArgs) -> Any:
    # Imported here, in the loading thread: importing JAX takes seconds and must not block /health.
    from jaxvllm.engine.async_llm_engine import AsyncLLMEngine
    return AsyncLLMEngine.from_engine_args(engine_args)


class OpenAIServer:
    """The aiohttp application and its state. One instance per server."""

    def __init__(self, engine_args: Optional[EngineArgs] = None, *,
                 engine: Any = None,
                 engine_factory: Optional[Callable[[EngineArgs], Any]] = None,
                 served_model_name: Optional[str | list[str]] = None,
                 api_key: Optional[str] = None,
                 max_waiting_requests: int = DEFAULT_MAX_WAITING,
                 max_request_body_bytes: int = DEFAULT_MAX_BODY,
                 shutdown_timeout: float = 30.0,
                 stream_write_timeout: float = DEFAULT_STREAM_WRITE_TIMEOUT):
        self.engine_args = engine_args or EngineArgs()
        if isinstance(served_model_name, str):
            served_model_name = [served_model_name]
        self.served_names = list(served_model_name or
                                 [default_served_model_name(self.engine_args.model)])
        self.model_name = self.served_names[0]
        self.api_key = api_key or None
        if max_waiting_requests < 0:
            raise ValueError("max_waiting_requests must be >= 0")
        self.max_waiting = max_waiting_requests
        self.max_body = max_request_body_bytes
        self.shutdown_timeout = shutdown_timeout
        if not stream_write_timeout > 0:
            raise ValueError("stream_write_timeout must be > 0")
        self.stream_write_timeout = stream_write_timeout
        self._engine_factory = engine_factory
        self.engine = engine
        self.load_error: Optional[BaseException] = None
        self.ready = asyncio.Event()
        self.draining = False
        self.in_flight = 0                       # admitted sequences (prompts x n), not finished
        self._active: set[asyncio.Task] = set()  # generation handler tasks
        self.active_rids: set[str] = set()       # engine requests running, aborted by drain()
        self.created = P.now()
        self.metrics = ServerMetrics(self.model_name, lambda: self.engine if self.ready.is_set()
                                     else None, lambda: self.in_flight)
        self.serving = OpenAIServing(self)
        self.app = self._build_app()

    # ------------------------------------------------------------------------------------------
    # App and engine lifecycle
    # ------------------------------------------------------------------------------------------
    def _build_app(self) -> web.Application:
        app = web.Application(client_max_size=self.max_body,
                              middlewares=[self._error_middleware, self._auth_middleware])
        r = app.router
        r.add_get("/health", self.health)
        r.add_get("/ping", self.health)
        r.add_get("/version", self.version)
        r.add_get("/metrics", self.metrics_endpoint)
        r.add_get("/v1/models", self.list_models)
        r.add_get("/v1/models/{model:.+}", self.get_model)
        r.add_post("/v1/completions", self.serving.completions)
        r.add_post("/v1/chat/completions", self.serving.chat_completions)
        r.add_post("/tokenize", self.tokenize)
        r.add_post("/detokenize", self.detokenize)
        return app
    async def load_engine(self) -> None:
        """Build the engine in a daemon thread (loading weights and compiling blocks), then start it."""
        try:
            if self.engine is None:
                factory = self._engine_factory or _default_engine_factory
                loop = asyncio.get_running_loop()
                fut: asyncio.Future = loop.create_future()

                def work() -> None:
                    try:
                        res, exc = factory(self.engine_args), None
                    except BaseException as e:  # noqa: BLE001 - reported to the loop
                        res, exc = None, e

                    def done() -> None:
                        if fut.done():
                            return
                        if exc is not None:
                            fut.set_exception(exc)
                        else:
                            fut.set_result(res)
                    with contextlib.suppress(RuntimeError):  # loop already closed
                        loop.call_soon_threadsafe(done)

                threading.Thread(target=work, name="jaxvllm-engine-load", daemon=True).start()
                self.engine = await fut
            await self.engine.start()
            self.limits = P.ServerLimits(
                max_model_len=int(self.engine.max_model_len),
                vocab_size=self._vocab_size(),
                max_logprobs=self.engine_args.max_logprobs,
                sampling_defaults=dict(getattr(self.engine, "default_sampling", {})))
            self.ready.set()
        except asyncio.CancelledError:
            raise
        except BaseException as e:
            self.load_error = e
            logger.error("engine failed to load: %s", e, exc_info=e)
            raise

    def _vocab_size(self) -> int:
        # The bound every token id of a request is checked against: the model's embedding rows (what
        # the engine checks too), never a guess that would let bad ids through to the model.
        v = getattr(getattr(self.engine, "model_config", None), "vocab_size", None)
        if not v:
            raise ValueError(f"the engine's model config has no vocab_size (got {v!r})")
        return int(v)

    @property
    def capacity(self) -> int:
        # Every data-parallel replica runs max_num_seqs sequences at once.
        return self.engine_args.max_num_seqs * self.engine_args.data_parallel_size + self.max_waiting

    def _engine_alive(self) -> bool:
        e = self.engine
        if e is None:
            return False
        if getattr(e, "errored", False) or getattr(e, "is_dead", False):
            return False
        return True

    async def wait_engine_dead(self, interval: float = 0.5) -> None:
        """Return once the ready engine has died (a step failed). Polled, as vLLM's watchdog: the
        step thread only records its death, it has no loop of ours to call."""
        await self.ready.wait()
        while self._engine_alive():
            await asyncio.sleep(interval)

    async def drain(self, timeout: float) -> None:
        """Refuse new work; wait for in-flight requests up to `timeout`, then end the rest: their
        handlers, cancelled while draining, answer 503 (streams: a final error event and [DONE])
        and abort their engine requests."""
        self.draining = True
        pending = {t for t in self._active if not t.done()}
        if pending:
            logger.info("waiting up to %.1fs for %d in-flight requests", timeout, len(pending))
            _, pending = await asyncio.wait(pending, timeout=max(timeout, 0.0))
        if pending:
            logger.info("ending %d requests still running", len(pending))
            for t in pending:
                t.cancel()
            await asyncio.wait(pending, timeout=5.0)
        if self.engine is not None:
            for rid in list(self.active_rids):
                with contextlib.suppress(Exception):
                    await self.engine.abort(rid)

    async def close_engine(self) -> None:
        if self.engine is not None and self.ready.is_set():
            try:
                await asyncio.wait_for(self.engine.shutdown(), timeout=30.0)
            except Exception:
                logger.exception("engine shutdown failed")

    # ------------------------------------------------------------------------------------------
    # Middlewares
    # ------------------------------------------------------------------------------------------
    @web.middleware
    async def _error_middleware(self, request: web.Request, handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except APIError as e:
            self.metrics.observe_error(e.status)
            return error_response(e)
        except web.HTTPException as e:
            if e.status < 400:
                raise
            self.metrics.observe_error(e.status)
            msg = e.text if e.text and not e.text.startswith(f"{e.status}:") else e.reason
            if e.status == 413:
                msg = f"The request body is larger than the limit of {self.max_body} bytes."
            err = APIError(msg or e.reason, e.status, _HTTP_ERROR_TYPES.get(e.status, "BadRequestError"))
            headers = {k: v for k, v in e.headers.items() if k.lower() in ("allow", "retry-after")}
            return json_response(err.body(), e.status, headers)
        except (asyncio.CancelledError, ConnectionError):  # the client is gone: nothing to answer
            raise
        except Exception as e:
            if type(e).__name__ == "EngineDeadError":
                logger.error("engine is dead: %s", e)
                self.metrics.observe_error(503)
                return error_response(APIError(f"The engine has stopped: {e}", 503,
                                               "ServiceUnavailableError"))
            self.metrics.observe_error(500)
            return error_response(internal_error(f"handling {request.method} {request.path}"))

    @web.middleware
    async def _auth_middleware(self, request: web.Request, handler) -> web.StreamResponse:
        if self.api_key is not None and request.path not in OPEN_PATHS:
            auth = request.headers.get("Authorization", "")
            scheme, _, token = auth.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                    token.strip().encode("utf-8", "surrogateescape"),
                    self.api_key.encode("utf-8")):
                raise APIError("Unauthorized: a valid API key is required "
                               "(Authorization: Bearer <key>).", 401, "AuthenticationError",
                               code="invalid_api_key")
        return await handler(request)

    # ------------------------------------------------------------------------------------------
    # Small endpoints
    # ------------------------------------------------------------------------------------------
    async def health(self, request: web.Request) -> web.Response:
        if self.ready.is_set() and not self.draining and self._engine_alive():
            return web.Response(status=200)
        state = ("failed to load" if self.load_error else "shutting down" if self.draining
                 else "loading" if not self.ready.is_set() else "unhealthy")
        return json_response({"status": state}, 503)

    async def version(self, request: web.Request) -> web.Response:
        return json_response({"version": _version()})

    async def metrics_endpoint(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(),
                            headers={"Content-Type": METRICS_CONTENT_TYPE})

    def _model_card(self, name: str) -> dict:
        return {"id": name, "object": "model", "created": self.created, "owned_by": "jaxvllm",
                "root": self.engine_args.model or DEFAULT_MODEL_NAME, "parent": None,
                "max_model_len": self.limits.max_model_len if self.ready.is_set() else
                self.engine_args.max_model_len, "permission": []}

    async def list_models(self, request: web.Request) -> web.Response:
        return json_response({"object": "list",
                              "data": [self._model_card(n) for n in self.served_names]})

    async def get_model(self, request: web.Request) -> web.Response:
        name = request.match_info["model"]
        if name not in self.served_names:
            raise P.not_found(f"The model `{name}` does not exist.", "model")
        return json_response(self._model_card(name))

    # ------------------------------------------------------------------------------------------
    # Request plumbing, shared with the generation handlers
    # ------------------------------------------------------------------------------------------
    def require_ready(self) -> None:
        if self.draining:
            raise APIError("The server is shutting down.", 503, "ServiceUnavailableError",
                           headers={"Retry-After": "5"})
        if not self.ready.is_set():
            raise APIError("The model is still loading.", 503, "ServiceUnavailableError",
                           headers={"Retry-After": "5"})

    async def read_json(self, request: web.Request) -> dict:
        cl = request.content_length
        if cl is not None and cl > self.max_body:
            raise APIError(f"The request body ({cl} bytes) is larger than the limit of "
                           f"{self.max_body} bytes.", 413, "RequestEntityTooLarge")
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise APIError(f"The request body is larger than the limit of {self.max_body} bytes.",
                           413, "RequestEntityTooLarge") from None
        return P.parse_json_body(raw)

    def check_model(self, model: Optional[str]) -> str:
        if model is None:
            return self.model_name
        if model in self.served_names or (self.engine_args.model and model == self.engine_args.model):
            return model
        raise P.not_found(f"The model `{model}` does not exist.", "model")

    def tokenizer(self, param: Optional[str]) -> Any:
        """The engine's tokenizer; a 400 naming `param` for a model without one (a config-only
        directory with dummy weights), which serves token-id prompts only."""
        tok = self.engine.tokenizer
        if tok is None:
            raise bad_request("This model has no tokenizer: send token ids instead of text "
                              "(e.g. 'prompt' as a list of integers).", param)
        return tok

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        # Chat requests reach this after render_chat, which already asked for the tokenizer.
        return list(self.tokenizer("prompt").encode(text, add_special_tokens=add_special_tokens))

    def render_chat(self, req: P.GenerationRequest) -> str:
        tok = self.tokenizer("messages")
        if getattr(tok, "chat_template", None) is None:
            raise bad_request("The model's tokenizer has no chat template; use /v1/completions.",
                              "messages")
        kwargs = {k: v for k, v in req.chat_template_kwargs.items()
                  if k not in _CHAT_TEMPLATE_RESERVED}
        try:
            text = tok.apply_chat_template(
                req.messages, tokenize=False, add_generation_prompt=req.add_generation_prompt,
                continue_final_message=req.continue_final_message, **kwargs)
        except Exception as e:  # jinja raise_exception(), template errors
            raise bad_request(f"The chat template could not be applied: {e}", "messages") from None
        if not isinstance(text, str):
            raise bad_request("The chat template did not render to text.", "messages")
        return text

    @contextlib.contextmanager
    def admitted(self, count: int) -> Iterator[None]:
        """Count `count` engine requests in flight, refusing them with 503 when over capacity, and
        track the current handler task so that drain() can wait for it. A request that alone asks
        for more than the capacity is a 400: no wait would ever admit it."""
        if count > self.capacity:
            raise bad_request(f"This request asks for {count} sequences (prompts x n); the server "
                              f"runs at most {self.capacity} at once (max_num_seqs x "
                              f"data_parallel_size + max_waiting_requests).", "n")
        if self.in_flight > 0 and self.in_flight + count > self.capacity:
            self.metrics.rejected.labels(self.model_name).inc()
            raise APIError(f"The server is overloaded ({self.in_flight} requests in flight); "
                           "retry later.", 503, "ServiceUnavailableError",
                           headers={"Retry-After": "1"})
        self.in_flight += count
        task = asyncio.current_task()
        self._active.add(task)
        try:
            yield
        finally:
            self.in_flight -= count
            self._active.discard(task)

    # ------------------------------------------------------------------------------------------
    # /tokenize and /detokenize
    # ------------------------------------------------------------------------------------------
    async def tokenize(self, request: web.Request) -> web.Response:
        self.require_ready()
        body = await self.read_json(request)
        f = P.Fields(body)
        self.check_model(f.str("model"))
        want_strs = f.bool("return_token_strs", False)
        if body.get("messages") is not None:
            if body.get("prompt") is not None:
                raise bad_request("Give either 'prompt' or 'messages', not both.", "prompt")
            req = P.GenerationRequest(
                kind="chat", model=None, prompts=[], sampling={}, max_tokens=None, n=1,
                stream=False, include_usage=False, continuous_usage=False,
                messages=P.parse_messages(body["messages"]),
                add_generation_prompt=f.bool("add_generation_prompt", True),
                continue_final_message=f.bool("continue_final_message", False),
                chat_template_kwargs=f.obj("chat_template_kwargs") or {})
            if req.add_generation_prompt and req.continue_final_message:
                raise bad_request("'continue_final_message' and 'add_generation_prompt' cannot "
                                  "both be true.", "continue_final_message")
            special = f.bool("add_special_tokens", False)
            ids = await asyncio.to_thread(lambda: self.encode(self.render_chat(req), special))
        else:
            prompt = body.get("prompt")
            if prompt is None:
                raise bad_request("'prompt' or 'messages' is required.", "prompt")
            if not isinstance(prompt, str):
                raise bad_request("'prompt' must be a string.", "prompt")
            ids = await asyncio.to_thread(self.encode, prompt, f.bool("add_special_tokens", True))
        res = {"count": len(ids), "max_model_len": self.limits.max_model_len, "tokens": ids,
               "token_strs": None}
        if want_strs:
            tok = self.engine.tokenizer
            conv = getattr(tok, "convert_ids_to_tokens", None)
            res["token_strs"] = list(conv(ids)) if conv else [decode_token(tok, t) for t in ids]
        return json_response(res)

    async def detokenize(self, request: web.Request) -> web.Response:
        self.require_ready()
        body = await self.read_json(request)
        f = P.Fields(body)
        self.check_model(f.str("model"))
        tokens = body.get("tokens")
        if tokens is None:
            raise bad_request("'tokens' is required.", "tokens")
        if not isinstance(tokens, list):
            raise bad_request("'tokens' must be an array of integers.", "tokens")
        ids = P._parse_int_list(f, "tokens", self.limits.vocab_size)
        return json_response({"prompt": self.tokenizer("tokens").decode(ids)})
