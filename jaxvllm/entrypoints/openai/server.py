"""The aiohttp application: its routes, the engine's loading and draining, the error and auth
middlewares, and the endpoints about the server itself (health, version, metrics, models). Requests
to the model are serving.py's."""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import threading
from typing import Any, Callable, Optional

from aiohttp import web

from jaxvllm.config import EngineArgs
from jaxvllm.engine.async_llm_engine import EngineDeadError, resolve_future
from jaxvllm.entrypoints.openai import protocol
from jaxvllm.entrypoints.openai.dev_endpoints import DevEndpoints, dev_mode_from_env
from jaxvllm.entrypoints.openai.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from jaxvllm.entrypoints.openai.metrics import ServerMetrics
from jaxvllm.entrypoints.openai.protocol import APIError
from jaxvllm.entrypoints.openai.responses import error_response, internal_error, json_response
from jaxvllm.entrypoints.openai.serving import OpenAIServing, engine_stopped

logger = logging.getLogger("jaxvllm.server")

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
# A request body is read whole into memory before it is parsed. 32 MiB holds a batch of 32 prompts of
# 128k token ids each (a 128k-token prompt as ids is ~0.9 MB, as text ~0.5 MB); 1 MiB, aiohttp's own
# default, refused a single long prompt sent as token ids.
DEFAULT_MAX_BODY = 32 << 20
DEFAULT_MAX_WAITING = 1024
DEFAULT_STREAM_WRITE_TIMEOUT = 60.0
OPEN_PATHS = frozenset({"/health", "/metrics", "/version", "/ping"})


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
                 stream_write_timeout: float = DEFAULT_STREAM_WRITE_TIMEOUT,
                 reasoning_parser: Optional[str] = None,
                 tool_call_parser: Optional[str] = None,
                 lora_modules: Optional[list[Any]] = None,
                 dev_mode: Optional[bool] = None):
        self.engine_args = engine_args or EngineArgs()
        if isinstance(served_model_name, str):
            served_model_name = [served_model_name]
        served_names = list(served_model_name or [default_served_model_name(self.engine_args.model)])
        self.model_name = served_names[0]
        self.api_key = api_key or None
        if max_waiting_requests < 0:
            raise ValueError("max_waiting_requests must be >= 0")
        if not stream_write_timeout > 0:
            raise ValueError("stream_write_timeout must be > 0")
        self.shutdown_timeout = shutdown_timeout
        self._engine_factory = engine_factory
        self._engine_given = engine
        self.load_error: Optional[BaseException] = None
        self.created = protocol.now()
        self.metrics = ServerMetrics(self.model_name, lambda: self.serving.engine
                                     if self.serving.ready.is_set() else None,
                                     lambda: self.serving.in_flight)
        self.serving = OpenAIServing(self.engine_args, served_names, self.metrics,
                                     max_waiting=max_waiting_requests,
                                     max_body=max_request_body_bytes,
                                     stream_write_timeout=stream_write_timeout,
                                     reasoning_parser=reasoning_parser,
                                     tool_call_parser=tool_call_parser,
                                     lora_modules=lora_modules)
        self.dev_mode = dev_mode_from_env() if dev_mode is None else dev_mode
        self.app = self._build_app()

    # ------------------------------------------------------------------------------------------
    # App and engine lifecycle
    # ------------------------------------------------------------------------------------------
    def _build_app(self) -> web.Application:
        app = web.Application(client_max_size=self.serving.max_body,
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
        r.add_post("/tokenize", self.serving.tokenize)
        r.add_post("/detokenize", self.serving.detokenize)
        if self.dev_mode:
            DevEndpoints(self._ready_engine).add_routes(r)
        return app

    def _ready_engine(self) -> Any:
        self.serving.require_ready()
        return self.serving.engine

    @property
    def engine(self) -> Any:
        return self.serving.engine

    async def load_engine(self) -> None:
        """Build the engine in a daemon thread (loading weights and compiling blocks), then start it."""
        try:
            engine = self._engine_given
            if engine is None:
                factory = self._engine_factory or _default_engine_factory
                loop = asyncio.get_running_loop()
                fut: asyncio.Future = loop.create_future()

                def work() -> None:
                    try:
                        res: object = factory(self.engine_args)
                    except BaseException as e:  # noqa: BLE001 - reported to the loop
                        res = e
                    resolve_future(loop, fut, res)

                threading.Thread(target=work, name="jaxvllm-engine-load", daemon=True).start()
                engine = await fut
            await engine.start()
            self.serving.attach(engine)
        except asyncio.CancelledError:
            raise
        except BaseException as e:
            self.load_error = e
            logger.error("engine failed to load: %s", e, exc_info=e)
            raise

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
        await self.serving.ready.wait()
        while self._engine_alive():
            await asyncio.sleep(interval)

    async def drain(self, timeout: float) -> None:
        """Refuse new work; wait for in-flight requests up to `timeout`, then end the rest: their
        handlers, cancelled while draining, answer 503 (streams: a final error event and [DONE])
        and abort their engine requests."""
        self.serving.draining = True
        pending = {t for t in self.serving.active_tasks if not t.done()}
        if pending:
            logger.info("waiting up to %.1fs for %d in-flight requests", timeout, len(pending))
            _, pending = await asyncio.wait(pending, timeout=max(timeout, 0.0))
        if pending:
            logger.info("ending %d requests still running", len(pending))
            for t in pending:
                t.cancel()
            await asyncio.wait(pending, timeout=5.0)
        if self.engine is not None:
            for rid in list(self.serving.active_rids):
                with contextlib.suppress(Exception):
                    await self.engine.abort(rid)

    async def close_engine(self) -> None:
        if self.engine is not None and self.serving.ready.is_set():
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
                msg = f"The request body is larger than the limit of {self.serving.max_body} bytes."
            err = APIError(msg or e.reason, e.status, _HTTP_ERROR_TYPES.get(e.status, "BadRequestError"))
            headers = {k: v for k, v in e.headers.items() if k.lower() in ("allow", "retry-after")}
            return json_response(err.body(), e.status, headers)
        except (asyncio.CancelledError, ConnectionError):  # the client is gone: nothing to answer
            raise
        except EngineDeadError as e:
            logger.error("engine is dead: %s", e)
            self.metrics.observe_error(503)
            return error_response(engine_stopped(e))
        except Exception:
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
        ready, draining = self.serving.ready.is_set(), self.serving.draining
        if ready and not draining and self._engine_alive():
            return web.Response(status=200)
        state = ("failed to load" if self.load_error else "shutting down" if draining
                 else "loading" if not ready else "unhealthy")
        return json_response({"status": state}, 503)

    async def version(self, request: web.Request) -> web.Response:
        return json_response({"version": _version()})

    async def metrics_endpoint(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(),
                            headers={"Content-Type": METRICS_CONTENT_TYPE})

    def _model_card(self, name: str) -> dict:
        lora = self.serving.lora_modules.get(name)  # an adapter: its path, the base as parent
        return {"id": name, "object": "model", "created": self.created, "owned_by": "jaxvllm",
                "root": lora.lora_path if lora else self.engine_args.model or DEFAULT_MODEL_NAME,
                "parent": self.model_name if lora else None,
                "max_model_len": self.serving.limits.max_model_len if self.serving.ready.is_set()
                else self.engine_args.max_model_len, "permission": []}

    async def list_models(self, request: web.Request) -> web.Response:
        names = [*self.serving.served_names, *self.serving.lora_modules]
        return json_response({"object": "list", "data": [self._model_card(n) for n in names]})

    async def get_model(self, request: web.Request) -> web.Response:
        name = request.match_info["model"]
        if name not in self.serving.served_names and name not in self.serving.lora_modules:
            raise protocol.not_found(f"The model `{name}` does not exist.", "model")
        return json_response(self._model_card(name))
