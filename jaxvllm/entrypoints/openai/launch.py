"""Starting and stopping a server in-process (the CLI, tests, benchmarks).

`handle = await start_server(engine_args, port=0)` in a running event loop (`handle.url`,
`await handle.stop()`), or `with ServerThread(engine_args) as srv:` from synchronous code. Both take
`engine=` (an engine already built) or `engine_factory=` (a callable EngineArgs -> engine, run in a
thread), plus the server options of OpenAIServer.
"""
from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Any, Optional

from aiohttp import web

from jaxvllm.config import EngineArgs
from jaxvllm.entrypoints.openai.server import OpenAIServer


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
        self.server.serving.draining = True
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
    max_waiting_requests=, max_request_body_bytes=, shutdown_timeout=, stream_write_timeout=,
    reasoning_parser=, tool_call_parser=, lora_modules=, dev_mode=.
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
