"""AsyncLLMEngine: an asyncio front over LLMEngine (or its data-parallel replicas).

The step loop runs on its own thread (a step blocks on the device), so the event loop stays free for
HTTP. Requests are validated and tokenized on the caller's side; only admission, aborts, steps and
the engine calls of a training loop (weights, sleep, the prefix cache) touch the engine, all on the
step thread, between steps.
"""
from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any, AsyncIterator, Optional, Sequence

from jaxvllm.config import EngineArgs
from jaxvllm.core.scheduler import SchedulerStats
from jaxvllm.engine.data_parallel import Engine, create_engine
from jaxvllm.engine.llm_engine import NotServingError, PromptType
from jaxvllm.engine.setup import use_server_defaults
from jaxvllm.lora.request import LoRARequest
from jaxvllm.outputs import RequestOutput
from jaxvllm.sampling_params import RequestOutputKind, SamplingParams

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    pass


class RequestFailedError(RuntimeError):
    """One request failed in the engine (its output processing raised; the engine log has the
    traceback); the engine and the other requests go on."""


class _Latest:
    """What one request's stream has not delivered yet, on the consumer's event loop, in one item:
    a consumer that falls behind (a client that stops reading) takes it at once instead of a
    backlog of one output per step. Cumulative outputs replace the held one (the newest holds
    everything); DELTA outputs are appended to it (RequestOutput.add). A finished output or an
    error is final: nothing replaces it."""

    def __init__(self, delta: bool) -> None:
        self._delta = delta
        self._item: object = None
        self._ready = asyncio.Event()

    def put(self, item: object) -> None:
        held = self._item
        if isinstance(held, BaseException) or getattr(held, "finished", False):
            return
        if self._delta and held is not None and not isinstance(item, BaseException):
            held.add(item)
        else:
            self._item = item
        self._ready.set()

    async def get(self) -> object:
        await self._ready.wait()
        self._ready.clear()
        item, self._item = self._item, None
        return item


class AsyncLLMEngine:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.model_config = engine.model_config
        self.max_model_len = engine.max_model_len
        self.default_sampling = engine.default_sampling
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, _Latest]] = {}
        self._inbox: list[tuple[str, object]] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None
        # pause_generation(): new requests wait for this; futures resolved once no request runs.
        self._unpaused = asyncio.Event()
        self._unpaused.set()
        self._paused_on: Optional[asyncio.AbstractEventLoop] = None
        self._idle_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = []

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> "AsyncLLMEngine":
        """An engine for serving: batch limits left unset get the server's defaults."""
        use_server_defaults(args)
        return cls(create_engine(args))

    # ---- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="jaxvllm-step", daemon=True)
            self._thread.start()

    async def shutdown(self) -> None:
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 30)
            self._thread = None

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._error is None

    @property
    def errored(self) -> bool:
        return self._error is not None

    # ---- requests ----------------------------------------------------------------------------
    async def generate(self, prompt: PromptType, sampling_params: SamplingParams,
                       request_id: str, lora_request: Optional[LoRARequest] = None
                       ) -> AsyncIterator[RequestOutput]:
        """Cumulative RequestOutputs as tokens arrive (a slow consumer gets the newest one, skipping
        those it did not take in time); the last has finished=True. Raises
        ValueError/TypeError before yielding for an invalid request, NotServingError while the
        engine is asleep or mid weight update. Closing the iterator (or
        cancelling its consumer) aborts the request."""
        if self._error is not None:
            raise EngineDeadError(f"engine stopped: {self._error!r}")
        await self.start()
        await self._unpaused.wait()
        if self._error is not None:  # died while this request waited for resume_generation()
            raise EngineDeadError(f"engine stopped: {self._error!r}")
        if request_id in self._streams:
            raise ValueError(f"request_id {request_id!r} is already in use")
        prepared = self.engine.prepare_request(request_id, prompt, sampling_params,
                                               lora_request=lora_request)
        latest = _Latest(prepared.params.output_kind == RequestOutputKind.DELTA)
        with self._lock:  # the loop dies under it: it either fails this stream or we see _error
            if self._error is not None:
                raise EngineDeadError(f"engine stopped: {self._error!r}")
            self._streams[request_id] = (asyncio.get_running_loop(), latest)
        self._post("add", prepared)
        finished = False
        try:
            while True:
                item = await latest.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    break
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self._post("abort", request_id)

    async def abort(self, request_id: str) -> None:
        self._post("abort", request_id)

    # ---- a training loop's calls (vLLM's AsyncLLM names) -------------------------------------
    async def pause_generation(self, *, wait_for_inflight_requests: bool = False,
                               clear_cache: bool = True) -> None:
        """Stop generating so the weights can change: new generate() calls wait until
        resume_generation(); running requests either finish (wait_for_inflight_requests) or are
        retracted at once, their streams ending with what they generated so far and finish_reason
        "abort". Returns once no request runs; clear_cache drops the prefix cache then (its K/V
        would be stale after a weight update)."""
        await self.start()
        self._paused_on = asyncio.get_running_loop()
        self._unpaused.clear()
        if not wait_for_inflight_requests:
            fut = self._paused_on.create_future()
            self._post("retract", (self._paused_on, fut))
            await fut
        fut = self._paused_on.create_future()
        self._post("idle", (self._paused_on, fut))
        await fut
        if clear_cache:
            await self._call_engine("reset_prefix_cache")

    async def resume_generation(self) -> None:
        self._unpaused.set()

    def is_paused(self) -> bool:
        return not self._unpaused.is_set()

    async def reset_prefix_cache(self) -> None:
        await self._call_engine("reset_prefix_cache")

    async def update_weights(self, params: Any, reset_prefix_cache: bool = True) -> None:
        """LLM.update_weights (and a chunk of a chunked update), between steps; with requests
        running it raises RuntimeError: pause_generation() first."""
        await self._call_engine("update_weights", params, reset_prefix_cache)

    async def start_weight_update(self) -> None:
        await self._call_engine("start_weight_update")

    async def finish_weight_update(self, reset_prefix_cache: bool = True) -> None:
        await self._call_engine("finish_weight_update", reset_prefix_cache)

    async def sleep(self, level: int = 1) -> None:
        await self._call_engine("sleep", level)

    async def wake_up(self, tags: Optional[Sequence[str]] = None) -> None:
        await self._call_engine("wake_up", tags)

    async def is_sleeping(self) -> bool:
        return await self._call_engine("is_sleeping")

    async def _call_engine(self, method: str, *args: Any) -> Any:
        """engine.<method>(*args) on the step thread between steps; its result or its exception."""
        await self.start()
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._post("call", (method, args, loop, fut))
        return await fut

    def get_stats(self) -> SchedulerStats:
        # Read at scrape time from the event loop: plain counters, safe to read while the step
        # thread runs, so the step loop does no metrics work.
        return self.engine.get_stats()

    def get_replica_stats(self) -> list[SchedulerStats]:
        """Per data-parallel replica (one entry without data parallelism); read as get_stats."""
        return self.engine.replica_stats()

    def _post(self, kind: str, payload: object) -> None:
        with self._lock:
            # A call posted after the loop died would wait forever: the loop fails those it holds
            # under this lock.
            if kind in ("call", "idle", "retract") and self._error is not None:
                raise EngineDeadError(f"engine stopped: {self._error!r}")
            self._inbox.append((kind, payload))
        self._wake.set()

    # ---- the step thread ---------------------------------------------------------------------
    def _loop(self) -> None:
        engine = self.engine
        try:
            while not self._stop:
                self._drain_inbox()
                if not engine.has_unfinished_requests():
                    for loop, fut in self._idle_waiters:
                        resolve_future(loop, fut, None)
                    self._idle_waiters = []
                    self._wake.wait(0.5)
                    self._wake.clear()
                    continue
                outputs = engine.step()
                for out in outputs:
                    failed = out.finished and any(o.finish_reason == "error" for o in out.outputs)
                    self._deliver(out.request_id, RequestFailedError(
                        f"request {out.request_id} failed in the engine (see the server log)")
                        if failed else out)
            self.engine.abort_request(list(self._streams))  # shut down: nothing runs on
            dead = EngineDeadError("the engine was shut down")
        except BaseException as e:
            logger.exception("engine step loop failed")
            dead = EngineDeadError(f"engine stopped: {e!r}")
        # Stopped or dead, the engine must not leave clients waiting forever. Under the lock
        # generate() registers streams with, so none is registered after this snapshot.
        with self._lock:
            self._error = dead
            streams = list(self._streams)
            inbox, self._inbox = self._inbox, []
        for rid in streams:
            self._deliver(rid, dead)
        waiters = self._idle_waiters + [p[2:] for kind, p in inbox if kind == "call"]
        waiters += [p for kind, p in inbox if kind in ("idle", "retract")]
        for loop, fut in waiters:
            resolve_future(loop, fut, dead)
        if self._paused_on is not None:  # requests waiting for resume_generation() see the error
            self._paused_on.call_soon_threadsafe(self._unpaused.set)

    def _drain_inbox(self) -> None:
        with self._lock:
            inbox, self._inbox = self._inbox, []
        for kind, payload in inbox:
            if kind == "add":
                try:
                    self.engine.admit_request(payload)
                except (ValueError, TypeError, NotServingError) as e:
                    self._deliver(payload.request_id, e)
            elif kind == "abort":
                self.engine.abort_request(payload)
            elif kind == "idle":
                self._idle_waiters.append(payload)
            elif kind == "retract":  # pause: running requests end now, their streams told why
                loop, fut = payload
                try:
                    for out in self.engine.retract_requests():
                        self._deliver(out.request_id, out)
                except Exception as e:
                    resolve_future(loop, fut, e)
                    continue
                resolve_future(loop, fut, None)
            else:
                method, args, loop, fut = payload
                try:
                    result = getattr(self.engine, method)(*args)
                except Exception as e:  # the caller's error (bad weights, wrong state)
                    resolve_future(loop, fut, e)
                    continue
                resolve_future(loop, fut, result)

    def _deliver(self, request_id: str, item: object) -> None:
        stream = self._streams.get(request_id)
        if stream is None:
            return
        loop, latest = stream
        try:
            loop.call_soon_threadsafe(latest.put, item)
        except RuntimeError:  # the consumer's loop is closed
            pass


def resolve_future(loop: asyncio.AbstractEventLoop, fut: asyncio.Future, result: object) -> None:
    """Completes, from any thread, a future of `loop`: an exception result is raised there."""
    def done() -> None:
        if fut.done():  # its caller was cancelled
            return
        if isinstance(result, BaseException):
            fut.set_exception(result)
        else:
            fut.set_result(result)
    try:
        loop.call_soon_threadsafe(done)
    except RuntimeError:  # that loop is closed
        pass
