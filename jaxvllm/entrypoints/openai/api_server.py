"""OpenAI-compatible HTTP server on aiohttp: `jaxvllm serve [MODEL]` or
`python -m jaxvllm.entrypoints.openai.api_server [MODEL]`.

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (both with SSE streaming),
POST /tokenize, POST /detokenize, GET /health, GET /version, GET /metrics.

Behaviour worth knowing:
- Binds 127.0.0.1 by default (vLLM binds 0.0.0.0); pass `--host 0.0.0.0` to serve other machines.
- The engine loads in a background thread; until it is ready /health answers 503 and the generation
  endpoints answer 503 with Retry-After. "jaxvllm: serving MODEL at http://HOST:PORT" is printed once
  it is ready.
- `--api-key` (or env JAXVLLM_API_KEY) requires `Authorization: Bearer KEY` on every endpoint except
  /health, /metrics, /version (so /v1/*, /tokenize and /detokenize).
- Backpressure: the server counts engine requests (one per prompt of a request) admitted and not yet
  finished. A request that would take that count above `max_num_seqs + --max-waiting-requests` is
  refused with 503 and a Retry-After header (a single request is always admitted when nothing else is
  in flight).
- A client that disconnects aborts its engine requests at once (handler cancellation for plain
  responses, a failed write for streams).
- SIGTERM/SIGINT: stop listening, refuse new requests with 503, let in-flight requests finish for up
  to `--shutdown-timeout` seconds, abort the rest, shut the engine down and exit 0.

In-process use (tests, benchmarks): `handle = await start_server(engine_args, port=0)` in a running
event loop (`handle.url`, `await handle.stop()`), or `with ServerThread(engine_args) as srv:` from
synchronous code. Both take `engine=` (an engine already built) or `engine_factory=` (a callable
EngineArgs -> engine, run in a thread), plus the server options of OpenAIServer.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import json
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Optional

from aiohttp import web

from jaxvllm.config import EngineArgs
from jaxvllm.entrypoints.openai import protocol as P
from jaxvllm.entrypoints.openai.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from jaxvllm.entrypoints.openai.metrics import ServerMetrics
from jaxvllm.entrypoints.openai.protocol import APIError, bad_request

logger = logging.getLogger("jaxvllm.server")

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MAX_BODY = 1 << 20
DEFAULT_MAX_WAITING = 1024
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


def _json(obj: Any, status: int = 200, headers: Optional[dict] = None) -> web.Response:
    return web.Response(text=json.dumps(obj, allow_nan=False), status=status,
                        content_type="application/json", headers=headers)


def _error_response(e: APIError) -> web.Response:
    return _json(e.body(), e.status, e.headers)


_HTTP_ERROR_TYPES = {401: "AuthenticationError", 404: "NotFoundError", 405: "MethodNotAllowed",
                     413: "RequestEntityTooLarge", 503: "ServiceUnavailableError"}


@dataclass
class _Choice:
    """Streaming state of one choice."""
    sent_text: int = 0
    sent_tokens: int = 0
    started: bool = False
    finished: bool = False


class OpenAIServer:
    """The aiohttp application and its state. One instance per server."""

    def __init__(self, engine_args: Optional[EngineArgs] = None, *,
                 engine: Any = None,
                 engine_factory: Optional[Callable[[EngineArgs], Any]] = None,
                 served_model_name: Optional[str | list[str]] = None,
                 api_key: Optional[str] = None,
                 max_waiting_requests: int = DEFAULT_MAX_WAITING,
                 max_request_body_bytes: int = DEFAULT_MAX_BODY,
                 shutdown_timeout: float = 30.0):
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
        self._engine_factory = engine_factory
        self.engine = engine
        self.load_error: Optional[BaseException] = None
        self.ready = asyncio.Event()
        self.draining = False
        self.in_flight = 0                       # admitted engine requests, not finished
        self._active: set[asyncio.Task] = set()  # generation handler tasks
        self._active_rids: set[str] = set()
        self._load_future: Optional[asyncio.Future] = None
        self.created = P.now()
        self.metrics = ServerMetrics(self.model_name, lambda: self.engine if self.ready.is_set()
                                     else None, lambda: self.in_flight)
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
        r.add_post("/v1/completions", self.completions)
        r.add_post("/v1/chat/completions", self.chat_completions)
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
            self._limits = P.ServerLimits(
                max_model_len=int(self.engine.max_model_len),
                vocab_size=self._vocab_size(),
                max_logprobs=self.engine_args.max_logprobs)
            self.ready.set()
        except asyncio.CancelledError:
            raise
        except BaseException as e:
            self.load_error = e
            logger.error("engine failed to load: %s", e, exc_info=e)
            raise

    def _vocab_size(self) -> int:
        mc = getattr(self.engine, "model_config", None)
        v = getattr(mc, "vocab_size", None)
        if not v:
            tok = self.engine.tokenizer
            try:
                v = len(tok)
            except Exception:
                v = getattr(tok, "vocab_size", 1 << 31)
        return int(v)

    @property
    def capacity(self) -> int:
        return self.engine_args.max_num_seqs + self.max_waiting

    def _engine_alive(self) -> bool:
        e = self.engine
        if e is None:
            return False
        if getattr(e, "errored", False) or getattr(e, "is_dead", False):
            return False
        return True

    async def drain(self, timeout: float) -> None:
        """Refuse new work; wait for in-flight requests up to `timeout`, then abort the rest."""
        self.draining = True
        pending = {t for t in self._active if not t.done()}
        if pending:
            logger.info("waiting up to %.1fs for %d in-flight requests", timeout, len(pending))
            _, pending = await asyncio.wait(pending, timeout=max(timeout, 0.0))
        if pending:
            logger.info("aborting %d requests still running", len(pending))
            for t in pending:
                t.cancel()
            await asyncio.wait(pending, timeout=5.0)
        if self.engine is not None:
            for rid in list(self._active_rids):
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
            return _error_response(e)
        except web.HTTPException as e:
            if e.status < 400:
                raise
            self.metrics.observe_error(e.status)
            msg = e.text if e.text and not e.text.startswith(f"{e.status}:") else e.reason
            if e.status == 413:
                msg = f"The request body is larger than the limit of {self.max_body} bytes."
            err = APIError(msg or e.reason, e.status, _HTTP_ERROR_TYPES.get(e.status, "BadRequestError"))
            headers = {k: v for k, v in e.headers.items() if k.lower() in ("allow", "retry-after")}
            return _json(err.body(), e.status, headers)
        except (asyncio.CancelledError, ConnectionResetError):
            raise
        except Exception as e:
            if type(e).__name__ == "EngineDeadError":
                logger.error("engine is dead: %s", e)
                self.metrics.observe_error(503)
                return _error_response(APIError(f"The engine has stopped: {e}", 503,
                                                "ServiceUnavailableError"))
            logger.exception("unexpected error handling %s %s", request.method, request.path)
            self.metrics.observe_error(500)
            err = APIError(f"Internal server error: {type(e).__name__}", 500, "InternalServerError")
            return _error_response(err)

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
        return _json({"status": state}, 503)

    async def version(self, request: web.Request) -> web.Response:
        return _json({"version": _version()})

    async def metrics_endpoint(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(),
                            headers={"Content-Type": METRICS_CONTENT_TYPE})

    def _model_card(self, name: str) -> dict:
        return {"id": name, "object": "model", "created": self.created, "owned_by": "jaxvllm",
                "root": self.engine_args.model or DEFAULT_MODEL_NAME, "parent": None,
                "max_model_len": self._limits.max_model_len if self.ready.is_set() else
                self.engine_args.max_model_len, "permission": []}

    async def list_models(self, request: web.Request) -> web.Response:
        return _json({"object": "list", "data": [self._model_card(n) for n in self.served_names]})

    async def get_model(self, request: web.Request) -> web.Response:
        name = request.match_info["model"]
        if name not in self.served_names:
            raise P.not_found(f"The model `{name}` does not exist.", "model")
        return _json(self._model_card(name))

    # ------------------------------------------------------------------------------------------
    # Request plumbing
    # ------------------------------------------------------------------------------------------
    def _require_ready(self) -> None:
        if self.draining:
            raise APIError("The server is shutting down.", 503, "ServiceUnavailableError",
                           headers={"Retry-After": "5"})
        if not self.ready.is_set():
            raise APIError("The model is still loading.", 503, "ServiceUnavailableError",
                           headers={"Retry-After": "5"})

    async def _read_json(self, request: web.Request) -> dict:
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

    def _check_model(self, model: Optional[str]) -> str:
        if model is None:
            return self.model_name
        if model in self.served_names or (self.engine_args.model and model == self.engine_args.model):
            return model
        raise P.not_found(f"The model `{model}` does not exist.", "model")

    def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return list(self.engine.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def _decode_token(self, tid: int) -> str:
        try:
            return self.engine.tokenizer.decode([tid])
        except Exception:
            return ""

    def _render_chat(self, req: P.GenerationRequest) -> str:
        tok = self.engine.tokenizer
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

    def _max_tokens_for(self, prompt_len: int, requested: Optional[int], param: str) -> int:
        L = self._limits.max_model_len
        if prompt_len == 0:
            raise bad_request("The prompt is empty.", param)
        if requested is None:
            if prompt_len >= L:
                raise bad_request(
                    f"This model's maximum context length is {L} tokens. However, your "
                    f"{'messages' if param == 'messages' else 'prompt'} resulted in {prompt_len} "
                    f"tokens. Please reduce the length of the input.", param)
            return L - prompt_len
        if prompt_len + requested > L:
            bad = param if prompt_len >= L else "max_tokens"
            raise bad_request(
                f"This model's maximum context length is {L} tokens. However, you requested "
                f"{prompt_len + requested} tokens ({prompt_len} in the "
                f"{'messages' if param == 'messages' else 'prompt'}, {requested} in the "
                f"completion). Please reduce the length of the input or the completion.", bad)
        return requested

    def _admit(self, count: int) -> None:
        if self.in_flight > 0 and self.in_flight + count > self.capacity:
            self.metrics.rejected.labels(self.model_name).inc()
            raise APIError(f"The server is overloaded ({self.in_flight} requests in flight); "
                           "retry later.", 503, "ServiceUnavailableError",
                           headers={"Retry-After": "1"})
        self.in_flight += count

    async def _engine_stream(self, rid: str, prompt_ids: list[int], sp) -> AsyncIterator[Any]:
        """One engine request, with abort on early exit and metrics on the way."""
        agen = self.engine.generate(prompt_ids, sp, rid)
        finished = False
        last_t, last_n = None, 0
        out = None
        self._active_rids.add(rid)
        try:
            async for out in agen:
                t = time.monotonic()
                total = sum(len(o.token_ids) for o in out.outputs)
                new = total - last_n
                if new > 0:
                    if last_t is not None:
                        self.metrics.observe_itl((t - last_t) / new, new)
                    last_t, last_n = t, total
                if out.finished:
                    finished = True
                yield out
                if finished:
                    break
        finally:
            self._active_rids.discard(rid)
            with contextlib.suppress(BaseException):
                await agen.aclose()
            if not finished:
                with contextlib.suppress(BaseException):
                    await self.engine.abort(rid)
            gen = sum(len(o.token_ids) for o in out.outputs) if out is not None else 0
            self.metrics.observe_tokens(len(prompt_ids) if out is not None else 0, gen)
            if out is not None:
                reasons = [o.finish_reason if finished else (o.finish_reason or "abort")
                           for o in out.outputs]
                self.metrics.observe_finished(out.metrics if finished else None, reasons)

    async def _merged(self, items: list[tuple[str, list[int], Any]]) -> AsyncIterator[tuple[int, Any]]:
        """Outputs of several engine requests, as they come: (prompt index, RequestOutput)."""
        if len(items) == 1:
            async with contextlib.aclosing(self._engine_stream(*items[0])) as it:
                async for out in it:
                    yield 0, out
            return
        queue: asyncio.Queue = asyncio.Queue()
        _END = object()

        async def pump(i: int, item) -> None:
            try:
                async with contextlib.aclosing(self._engine_stream(*item)) as it:
                    async for out in it:
                        queue.put_nowait((i, out, None))
                queue.put_nowait((i, _END, None))
            except asyncio.CancelledError:
                raise
            except BaseException as e:  # noqa: BLE001 - re-raised by the consumer
                queue.put_nowait((i, None, e))

        tasks = [asyncio.create_task(pump(i, it)) for i, it in enumerate(items)]
        try:
            remaining = len(tasks)
            while remaining:
                i, out, err = await queue.get()
                if err is not None:
                    raise err
                if out is _END:
                    remaining -= 1
                    continue
                yield i, out
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _track(self) -> asyncio.Task:
        task = asyncio.current_task()
        self._active.add(task)
        return task

    # ------------------------------------------------------------------------------------------
    # Logprobs shapes
    # ------------------------------------------------------------------------------------------
    def _token_str(self, tid: int, lp: Any) -> str:
        s = getattr(lp, "decoded_token", None)
        return s if isinstance(s, str) else self._decode_token(tid)

    def _top(self, tid: int, step: dict, num: int) -> list[tuple[int, Any]]:
        items = sorted(step.items(), key=lambda kv: (kv[1].rank if kv[1].rank is not None
                                                     else 1 << 30, -kv[1].logprob))
        top = [(t, lp) for t, lp in items if t != tid or (lp.rank is not None and lp.rank <= num)]
        top = [(t, lp) for t, lp in top][:num]
        return top

    def _completion_logprobs(self, token_ids: list[int], steps: list, num: int,
                             offset: int) -> dict:
        tokens, token_lps, top_lps, offsets = [], [], [], []
        for tid, step in zip(token_ids, steps):
            if step is None:
                s = self._decode_token(tid)
                token_lps.append(None)
                top_lps.append(None)
            else:
                lp = step.get(tid)
                s = self._token_str(tid, lp) if lp is not None else self._decode_token(tid)
                token_lps.append(P.clean_logprob(lp.logprob) if lp is not None else None)
                top = {}
                if lp is not None:
                    top[s] = P.clean_logprob(lp.logprob)
                for t, l in self._top(tid, step, num):
                    top.setdefault(self._token_str(t, l), P.clean_logprob(l.logprob))
                top_lps.append(top)
            tokens.append(s)
            offsets.append(offset)
            offset += len(s)
        return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": top_lps,
                "text_offset": offsets}

    def _chat_logprobs(self, token_ids: list[int], steps: list, num: int) -> dict:
        content = []
        for tid, step in zip(token_ids, steps or []):
            step = step or {}
            lp = step.get(tid)
            s = self._token_str(tid, lp) if lp is not None else self._decode_token(tid)
            entry = {"token": s, "logprob": P.clean_logprob(lp.logprob) if lp is not None else -9999.0,
                     "bytes": list(s.encode("utf-8"))}
            tops = sorted(step.items(), key=lambda kv: (kv[1].rank if kv[1].rank is not None
                                                        else 1 << 30, -kv[1].logprob))[:num]
            entry["top_logprobs"] = [
                {"token": (ts := self._token_str(t, l)), "logprob": P.clean_logprob(l.logprob),
                 "bytes": list(ts.encode("utf-8"))} for t, l in tops]
            content.append(entry)
        return {"content": content}

    # ------------------------------------------------------------------------------------------
    # /v1/completions and /v1/chat/completions
    # ------------------------------------------------------------------------------------------
    async def completions(self, request: web.Request) -> web.StreamResponse:
        self._require_ready()
        body = await self._read_json(request)
        req = P.parse_completion_request(body, self._limits)
        model = self._check_model(req.model)
        prompts: list[tuple[str, list[int]]] = []
        for p in req.prompts:
            if isinstance(p, str):
                ids = self._encode(p, req.add_special_tokens)
                prompts.append((p, ids))
            else:
                prompts.append((None, p))
        return await self._generate(request, req, model, prompts, "prompt")

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        self._require_ready()
        body = await self._read_json(request)
        req = P.parse_chat_request(body, self._limits)
        model = self._check_model(req.model)
        text = self._render_chat(req)
        ids = self._encode(text, req.add_special_tokens)
        return await self._generate(request, req, model, [(text, ids)], "messages")

    async def _generate(self, request: web.Request, req: P.GenerationRequest, model: str,
                        prompts: list, param: str) -> web.StreamResponse:
        items = []
        base = P.random_id("chatcmpl" if req.kind == "chat" else "cmpl")
        for i, (_, ids) in enumerate(prompts):
            mt = self._max_tokens_for(len(ids), req.max_tokens, param)
            sp = P.build_sampling_params(req, mt)
            items.append((f"{base}-{i}", ids, sp))
        self._admit(len(items))
        task = self._track()
        try:
            if req.stream:
                return await self._stream(request, req, model, base, prompts, items)
            return await self._full(req, model, base, prompts, items)
        finally:
            self.in_flight -= len(items)
            self._active.discard(task)

    async def _full(self, req, model, base, prompts, items) -> web.Response:
        finals: dict[int, Any] = {}
        try:
            async with contextlib.aclosing(self._merged(items)) as it:
                async for i, out in it:
                    if out.finished:
                        finals[i] = out
        except (ValueError, TypeError) as e:
            raise bad_request(str(e), "max_tokens" if "max_tokens" in str(e) else None) from None
        n = req.n
        choices = []
        prompt_tokens = completion_tokens = cached = 0
        for i in range(len(items)):
            out = finals[i]
            prompt_text, ids = prompts[i]
            prompt_tokens += len(ids)
            cached += int(getattr(out, "num_cached_tokens", 0) or 0)
            for o in sorted(out.outputs, key=lambda o: o.index):
                completion_tokens += len(o.token_ids)
                if req.kind == "chat":
                    lps = (self._chat_logprobs(o.token_ids, o.logprobs, req.logprobs or 0)
                           if req.want_logprobs else None)
                    choices.append({"index": i * n + o.index,
                                    "message": {"role": "assistant", "content": o.text},
                                    "logprobs": lps, "finish_reason": o.finish_reason,
                                    "stop_reason": o.stop_reason})
                else:
                    text = o.text
                    lps = None
                    if req.echo:
                        ptext = prompt_text if prompt_text is not None else \
                            self.engine.tokenizer.decode(ids)
                        text = ptext + text
                    if req.logprobs is not None:
                        tids, steps = list(o.token_ids), list(o.logprobs or [])
                        if req.echo:
                            plp = list(out.prompt_logprobs or [None] * len(ids))
                            tids, steps = list(ids) + tids, plp + steps
                        lps = self._completion_logprobs(tids, steps, req.logprobs, 0)
                    choices.append({"index": i * n + o.index, "text": text, "logprobs": lps,
                                    "finish_reason": o.finish_reason, "stop_reason": o.stop_reason,
                                    **({"prompt_logprobs": self._prompt_lps(out)}
                                       if req.prompt_logprobs is not None and not req.echo else {})})
        resp = {"id": base, "object": "chat.completion" if req.kind == "chat" else "text_completion",
                "created": P.now(), "model": model, "choices": choices,
                "usage": P.usage(prompt_tokens, completion_tokens, cached)}
        if req.kind == "chat":
            resp["system_fingerprint"] = None
        return _json(resp)

    def _prompt_lps(self, out) -> Optional[list]:
        if out.prompt_logprobs is None:
            return None
        res = []
        for step in out.prompt_logprobs:
            if step is None:
                res.append(None)
            else:
                res.append({str(t): {"logprob": P.clean_logprob(l.logprob), "rank": l.rank,
                                     "decoded_token": self._token_str(t, l)}
                            for t, l in step.items()})
        return res

    async def _stream(self, request, req, model, base, prompts, items) -> web.StreamResponse:
        n = req.n
        created = P.now()
        obj = "chat.completion.chunk" if req.kind == "chat" else "text_completion"
        it = self._merged(items)
        try:
            # Pull the first output before committing to a 200, so that engine-side validation
            # errors still become a proper 400.
            try:
                first = await it.__anext__()
            except StopAsyncIteration:
                first = None
            except (ValueError, TypeError) as e:
                raise bad_request(str(e)) from None

            resp = web.StreamResponse(status=200, headers={
                "Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no"})
            await resp.prepare(request)

            async def send(payload: Any) -> None:
                data = payload if isinstance(payload, str) else json.dumps(payload, allow_nan=False)
                await resp.write(f"data: {data}\n\n".encode("utf-8"))

            def chunk(choices: list, usage: Optional[dict] = None) -> dict:
                c = {"id": base, "object": obj, "created": created, "model": model,
                     "choices": choices}
                if usage is not None:
                    c["usage"] = usage
                return c

            states: dict[int, _Choice] = {}
            prompt_tokens = sum(len(ids) for _, ids in prompts)
            gen_tokens: dict[int, int] = {}

            if req.kind == "chat":
                for i in range(len(items)):
                    for j in range(n):
                        states[i * n + j] = _Choice(started=True)
                        await send(chunk([{"index": i * n + j,
                                           "delta": {"role": "assistant", "content": ""},
                                           "logprobs": None, "finish_reason": None}]))

            async def emit(i: int, out) -> None:
                prompt_text, ids = prompts[i]
                for o in sorted(out.outputs, key=lambda o: o.index):
                    idx = i * n + o.index
                    st = states.setdefault(idx, _Choice())
                    if st.finished:
                        continue
                    gen_tokens[idx] = len(o.token_ids)
                    text = o.text
                    delta = text[st.sent_text:] if len(text) > st.sent_text else ""
                    new_ids = list(o.token_ids[st.sent_tokens:])
                    steps = list((o.logprobs or [])[st.sent_tokens:len(o.token_ids)])
                    done = o.finish_reason is not None
                    if not delta and not new_ids and not done and st.started:
                        continue
                    if req.kind == "chat":
                        choice = {"index": idx, "delta": {"content": delta} if delta else {},
                                  "logprobs": (self._chat_logprobs(new_ids, steps, req.logprobs or 0)
                                               if req.want_logprobs and new_ids else None),
                                  "finish_reason": o.finish_reason}
                        if done:
                            choice["stop_reason"] = o.stop_reason
                    else:
                        lps = None
                        prefix = ""
                        if not st.started and req.echo:
                            prefix = prompt_text if prompt_text is not None else \
                                self.engine.tokenizer.decode(ids)
                            if req.logprobs is not None:
                                plp = list(out.prompt_logprobs or [None] * len(ids))
                                new_ids, steps = list(ids) + new_ids, plp + steps
                        if req.logprobs is not None:
                            lps = self._completion_logprobs(new_ids, steps, req.logprobs,
                                                            st.sent_text)
                        choice = {"index": idx, "text": prefix + delta, "logprobs": lps,
                                  "finish_reason": o.finish_reason}
                        if done:
                            choice["stop_reason"] = o.stop_reason
                    st.started = True
                    st.sent_text = max(st.sent_text, len(text))
                    st.sent_tokens = len(o.token_ids)
                    st.finished = done
                    usage = None
                    if req.include_usage and req.continuous_usage:
                        g = sum(gen_tokens.values())
                        usage = P.usage(prompt_tokens, g)
                    await send(chunk([choice], usage))

            try:
                if first is not None:
                    await emit(*first)
                async for i, out in it:
                    await emit(i, out)
            except (ValueError, TypeError) as e:
                err = APIError(str(e), 400, "BadRequestError")
                await send({"error": err.body()["error"]})
            except (ConnectionResetError, asyncio.CancelledError):
                raise
            except Exception as e:
                logger.exception("error while streaming")
                err = APIError(f"Internal server error: {type(e).__name__}", 500,
                               "InternalServerError")
                await send({"error": err.body()["error"]})
            if req.include_usage:
                await send(chunk([], P.usage(prompt_tokens, sum(gen_tokens.values()))))
            await send("[DONE]")
            await resp.write_eof()
            return resp
        finally:
            await it.aclose()

    # ------------------------------------------------------------------------------------------
    # /tokenize and /detokenize
    # ------------------------------------------------------------------------------------------
    async def tokenize(self, request: web.Request) -> web.Response:
        self._require_ready()
        body = await self._read_json(request)
        f = P.Fields(body)
        self._check_model(f.str("model"))
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
            ids = self._encode(self._render_chat(req), f.bool("add_special_tokens", False))
        else:
            prompt = body.get("prompt")
            if prompt is None:
                raise bad_request("'prompt' or 'messages' is required.", "prompt")
            if not isinstance(prompt, str):
                raise bad_request("'prompt' must be a string.", "prompt")
            ids = self._encode(prompt, f.bool("add_special_tokens", True))
        res = {"count": len(ids), "max_model_len": self._limits.max_model_len, "tokens": ids,
               "token_strs": None}
        if want_strs:
            tok = self.engine.tokenizer
            conv = getattr(tok, "convert_ids_to_tokens", None)
            res["token_strs"] = list(conv(ids)) if conv else [self._decode_token(t) for t in ids]
        return _json(res)

    async def detokenize(self, request: web.Request) -> web.Response:
        self._require_ready()
        body = await self._read_json(request)
        f = P.Fields(body)
        self._check_model(f.str("model"))
        tokens = body.get("tokens")
        if tokens is None:
            raise bad_request("'tokens' is required.", "tokens")
        if not isinstance(tokens, list):
            raise bad_request("'tokens' must be an array of integers.", "tokens")
        ids = P._parse_int_list(f, "tokens", self._limits.vocab_size)
        return _json({"prompt": self.engine.tokenizer.decode(ids)})


# ----------------------------------------------------------------------------------------------
# Starting and stopping
# ----------------------------------------------------------------------------------------------
def _default_engine_factory(engine_args: EngineArgs) -> Any:
    # Imported here, in the loading thread: importing JAX takes seconds and must not block /health.
    from jaxvllm.engine.async_llm_engine import AsyncLLMEngine
    return AsyncLLMEngine.from_engine_args(engine_args)


class ServerHandle:
    """A running server. `await handle.stop()` shuts it down gracefully."""

    def __init__(self, server: OpenAIServer, runner: web.AppRunner, host: str, port: int,
                 load_task: asyncio.Task):
        self.server = server
        self.runner = runner
        self.host = host
        self.port = port
        self.load_task = load_task
        self._stopped = False

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def engine(self) -> Any:
        return self.server.engine

    async def wait_ready(self, timeout: Optional[float] = None) -> None:
        """Return once the engine is ready; raise the load error if it failed."""
        await asyncio.wait_for(asyncio.shield(self.load_task), timeout)

    async def stop(self, timeout: Optional[float] = None) -> None:
        if self._stopped:
            return
        self._stopped = True
        timeout = self.server.shutdown_timeout if timeout is None else timeout
        self.server.draining = True
        for site in list(self.runner.sites):  # stop accepting connections
            with contextlib.suppress(Exception):
                await site.stop()
        await self.server.drain(timeout)
        if not self.load_task.done():
            self.load_task.cancel()
        with contextlib.suppress(BaseException):
            await self.load_task
        await self.runner.cleanup()
        await self.server.close_engine()


async def start_server(engine_args: Optional[EngineArgs] = None, host: str = "127.0.0.1",
                       port: int = 0, *, wait_ready: bool = True, access_log: bool = False,
                       **server_kwargs: Any) -> ServerHandle:
    """Start a server in the running event loop (port 0: any free port) and return its handle.

    server_kwargs go to OpenAIServer: engine=, engine_factory=, served_model_name=, api_key=,
    max_waiting_requests=, max_request_body_bytes=, shutdown_timeout=.
    """
    server = OpenAIServer(engine_args, **server_kwargs)
    kw: dict[str, Any] = {"handler_cancellation": True, "shutdown_timeout": 2.0}
    if not access_log:
        kw["access_log"] = None
    runner = web.AppRunner(server.app, **kw)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    sockets = getattr(site._server, "sockets", None) or []
    actual_port = sockets[0].getsockname()[1] if sockets else port
    load_task = asyncio.create_task(server.load_engine())
    load_task.add_done_callback(lambda t: t.cancelled() or t.exception())  # no "never retrieved"
    handle = ServerHandle(server, runner, host, actual_port, load_task)
    if wait_ready:
        try:
            await handle.wait_ready()
        except BaseException:
            await handle.stop(0)
            raise
    return handle


class ServerThread:
    """A server on its own event loop in a background thread, for synchronous tests and benchmarks.

        with ServerThread(EngineArgs(...)) as srv:
            openai.OpenAI(base_url=srv.url + "/v1", api_key="x")...
    """

    def __init__(self, engine_args: Optional[EngineArgs] = None, host: str = "127.0.0.1",
                 port: int = 0, ready_timeout: float = 600.0, wait_ready: bool = True,
                 **server_kwargs: Any):
        self._args = (engine_args, host, port)
        self._wait_ready = wait_ready
        self._kwargs = server_kwargs
        self._ready_timeout = ready_timeout
        self.loop = asyncio.new_event_loop()
        self.handle: Optional[ServerHandle] = None
        self._thread = threading.Thread(target=self.loop.run_forever, name="jaxvllm-server",
                                        daemon=True)

    def start(self) -> "ServerThread":
        self._thread.start()
        fut = asyncio.run_coroutine_threadsafe(
            start_server(*self._args, wait_ready=self._wait_ready, **self._kwargs), self.loop)
        try:
            self.handle = fut.result(self._ready_timeout)
        except BaseException:
            self._shutdown_loop()
            raise
        return self

    @property
    def url(self) -> str:
        return self.handle.url

    @property
    def server(self) -> OpenAIServer:
        return self.handle.server

    @property
    def engine(self) -> Any:
        return self.handle.engine

    def call(self, coro, timeout: float = 60.0) -> Any:
        """Run a coroutine on the server's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self, timeout: float = 5.0) -> None:
        if self.handle is not None:
            self.call(self.handle.stop(timeout), timeout + 60.0)
            self.handle = None
        self._shutdown_loop()

    def _shutdown_loop(self) -> None:
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10.0)
        if not self.loop.is_running() and not self.loop.is_closed():
            self.loop.close()

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------
def add_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                        help="HF directory or .gguf file (overrides --model); omitted: the "
                             "embedded default model.")
    EngineArgs.add_cli_args(parser)
    g = parser.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1",
                   help="Address to bind (default 127.0.0.1, loopback only; vLLM binds 0.0.0.0: "
                        "pass --host 0.0.0.0 to serve other machines).")
    g.add_argument("--port", type=int, default=8000, help="Port (default 8000; 0 picks a free one).")
    g.add_argument("--api-key", default=None,
                   help="Require 'Authorization: Bearer KEY' (default: env JAXVLLM_API_KEY; unset: "
                        "no auth). /health, /metrics and /version stay open.")
    g.add_argument("--served-model-name", nargs="+", default=None,
                   help="Model name(s) in the API (default: the model path's basename, or "
                        f"{DEFAULT_MODEL_NAME} for the default model); the first is reported.")
    g.add_argument("--max-waiting-requests", type=int, default=DEFAULT_MAX_WAITING,
                   help="Engine requests (one per prompt) allowed in flight beyond --max-num-seqs; "
                        "more get 503 with Retry-After (default %(default)s).")
    g.add_argument("--max-request-body-bytes", type=int, default=DEFAULT_MAX_BODY,
                   help="Largest request body; larger ones get 413 (default %(default)s).")
    g.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="Seconds in-flight requests may run after SIGTERM/SIGINT before they are "
                        "aborted (default %(default)s).")
    g.add_argument("--log-level", default="info",
                   choices=["debug", "info", "warning", "error"], help="Server log level.")
    g.add_argument("--access-log", action=argparse.BooleanOptionalAction, default=False,
                   help="Log every HTTP request.")
    return parser


def _engine_args_from(args: argparse.Namespace) -> EngineArgs:
    if getattr(args, "model_tag", None):
        args.model = args.model_tag
    return EngineArgs.from_cli_args(args)


async def serve(args: argparse.Namespace,
                engine_factory: Optional[Callable[[EngineArgs], Any]] = None) -> int:
    engine_args = _engine_args_from(args)
    api_key = args.api_key or os.environ.get("JAXVLLM_API_KEY") or None
    if args.max_waiting_requests < 0:
        raise SystemExit("--max-waiting-requests must be >= 0")
    if args.max_request_body_bytes < 1:
        raise SystemExit("--max-request-body-bytes must be >= 1")
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    try:
        handle = await start_server(
            engine_args, args.host, args.port, wait_ready=False, access_log=args.access_log,
            engine_factory=engine_factory, served_model_name=args.served_model_name,
            api_key=api_key, max_waiting_requests=args.max_waiting_requests,
            max_request_body_bytes=args.max_request_body_bytes,
            shutdown_timeout=args.shutdown_timeout)
    except OSError as e:
        print(f"jaxvllm: cannot listen on {args.host}:{args.port}: {e}", file=sys.stderr, flush=True)
        return 1
    logger.info("loading %s; /health answers 503 until ready (listening on %s)",
                handle.server.model_name, handle.url)
    ready = asyncio.ensure_future(handle.wait_ready())
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait({ready, stopping}, return_when=asyncio.FIRST_COMPLETED)
    code = 0
    if ready.done() and not ready.cancelled() and ready.exception() is None:
        print(f"jaxvllm: serving {handle.server.model_name} at {handle.url}", flush=True)
        await stopping
        logger.info("shutting down (waiting up to %.1fs for in-flight requests)",
                    args.shutdown_timeout)
    elif ready.done() and not ready.cancelled():
        print(f"jaxvllm: failed to load the model: {ready.exception()}", file=sys.stderr, flush=True)
        code = 1
    else:
        ready.cancel()
    stopping.cancel()
    await handle.stop(args.shutdown_timeout)
    return code


def run(args: argparse.Namespace,
        engine_factory: Optional[Callable[[EngineArgs], Any]] = None) -> int:
    logging.basicConfig(level=getattr(logging, args.log_level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return asyncio.run(serve(args, engine_factory))
    except KeyboardInterrupt:
        return 0


def main(argv: Optional[list[str]] = None,
         engine_factory: Optional[Callable[[EngineArgs], Any]] = None) -> int:
    parser = argparse.ArgumentParser(prog="jaxvllm serve",
                                     description="Start the OpenAI-compatible HTTP server.")
    add_args(parser)
    args = parser.parse_args(argv)
    try:
        _engine_args_from(args)
    except ValueError as e:
        parser.error(str(e))
    return run(args, engine_factory)


if __name__ == "__main__":
    sys.exit(main())
