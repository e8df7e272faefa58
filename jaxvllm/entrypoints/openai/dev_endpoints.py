"""vLLM's dev-mode endpoints, for a trainer that drives the server between rollouts: pause and
resume generation around a weight update, sleep and wake the engine, drop the prefix cache.

    POST /pause?wait_for_inflight_requests=false&clear_cache=true  -> {"status": "paused"}
    POST /resume                                                    -> {"status": "resumed"}
    GET  /is_paused                                                 -> {"is_paused": bool}
    POST /sleep?level=1                                             -> {"is_sleeping": true}
    POST /wake_up[?tags=weights&tags=kv_cache]                      -> {"is_sleeping": bool}
    GET  /is_sleeping                                               -> {"is_sleeping": bool}
    POST /reset_prefix_cache                                        -> {"status": "reset"}

They are off unless the server runs in dev mode (JAXVLLM_SERVER_DEV_MODE=1, as vLLM's
VLLM_SERVER_DEV_MODE; `OpenAIServer(dev_mode=True)` in-process): any client that reaches them can
stop the server's work. The API key guards them as it guards /v1. Semantics are AsyncLLMEngine's: while paused, new requests wait;
while asleep they are answered 503; sleeping with requests running is a 409.
"""
from __future__ import annotations

import os
from typing import Any, Callable

from aiohttp import web

from jaxvllm.engine.llm_engine import check_sleep_level, wake_tags
from jaxvllm.entrypoints.openai.protocol import APIError, bad_request
from jaxvllm.entrypoints.openai.responses import json_response

DEV_MODE_ENV = "JAXVLLM_SERVER_DEV_MODE"


def dev_mode_from_env() -> bool:
    return os.environ.get(DEV_MODE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def _flag(request: web.Request, name: str, default: bool) -> bool:
    value = request.query.get(name)
    if value is None:
        return default
    v = value.strip().lower()
    if v in ("true", "1"):
        return True
    if v in ("false", "0"):
        return False
    raise bad_request(f"{name} must be true or false, got {value!r}", name)


class DevEndpoints:
    """The handlers; `engine()` is the ready server's engine (it raises 503 while loading)."""

    def __init__(self, engine: Callable[[], Any]) -> None:
        self._engine = engine

    def add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_post("/pause", self.pause)
        router.add_post("/resume", self.resume)
        router.add_get("/is_paused", self.is_paused)
        router.add_post("/sleep", self.sleep)
        router.add_post("/wake_up", self.wake_up)
        router.add_get("/is_sleeping", self.is_sleeping)
        router.add_post("/reset_prefix_cache", self.reset_prefix_cache)

    async def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """The engine's method; its refusals as the client's errors: a bad argument is a 400, a
        call the engine's state does not allow now (requests running, not supported with this
        parallelism) a 409."""
        try:
            return await getattr(self._engine(), method)(*args, **kwargs)
        except ValueError as e:
            raise bad_request(str(e)) from None
        except RuntimeError as e:
            if type(e) is not RuntimeError:  # EngineDeadError and the like: the server's state
                raise
            raise APIError(str(e), 409, "ConflictError") from None

    async def pause(self, request: web.Request) -> web.Response:
        wait = _flag(request, "wait_for_inflight_requests", False)
        clear = _flag(request, "clear_cache", True)
        await self._call("pause_generation", wait_for_inflight_requests=wait, clear_cache=clear)
        return json_response({"status": "paused"})

    async def resume(self, request: web.Request) -> web.Response:
        await self._call("resume_generation")
        return json_response({"status": "resumed"})

    async def is_paused(self, request: web.Request) -> web.Response:
        return json_response({"is_paused": self._engine().is_paused()})

    async def sleep(self, request: web.Request) -> web.Response:
        raw = request.query.get("level", "1")
        try:  # the engine's own check, here to name the query parameter in the 400
            level = int(raw) if raw.strip().isdigit() else raw
            check_sleep_level(level)
        except ValueError as e:
            raise bad_request(str(e), "level") from None
        await self._call("sleep", level)
        return await self.is_sleeping(request)

    async def wake_up(self, request: web.Request) -> web.Response:
        tags = request.query.getall("tags", None)
        try:
            wake_tags(tags)
        except ValueError as e:
            raise bad_request(str(e), "tags") from None
        await self._call("wake_up", tags)
        return await self.is_sleeping(request)

    async def is_sleeping(self, request: web.Request) -> web.Response:
        return json_response({"is_sleeping": await self._call("is_sleeping")})

    async def reset_prefix_cache(self, request: web.Request) -> web.Response:
        await self._call("reset_prefix_cache")
        return json_response({"status": "reset"})
