"""The generation path: /v1/completions and /v1/chat/completions, as full responses or SSE streams.

Each prompt of a request is one engine request; their outputs are merged as they come.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, AsyncIterator, Optional

from aiohttp import web

from jaxvllm.entrypoints.openai import protocol as P
from jaxvllm.entrypoints.openai.logprobs import chat_logprobs, completion_logprobs, prompt_logprobs
from jaxvllm.entrypoints.openai.protocol import APIError, bad_request
from jaxvllm.entrypoints.openai.responses import internal_error, json_response

if TYPE_CHECKING:
    from jaxvllm.entrypoints.openai.server import OpenAIServer


@dataclass
class _Choice:
    """Streaming state of one choice."""
    sent_text: int = 0
    started: bool = False
    finished: bool = False


class OpenAIServing:
    """The generation handlers of one OpenAIServer, whose engine, limits, metrics and admission
    they use."""

    def __init__(self, server: OpenAIServer):
        self.server = server

    async def completions(self, request: web.Request) -> web.StreamResponse:
        s = self.server
        s.require_ready()
        body = await s.read_json(request)
        req = P.parse_completion_request(body, s.limits)
        model = s.check_model(req.model)
        if req.echo:
            s.tokenizer("echo")  # the echoed prompt is text: a 400 for a model without a tokenizer
        # Tokenizing up to MAX_PROMPTS prompts (and rendering chat templates, below) takes CPU time
        # the event loop needs for every other connection: it runs on a worker thread.
        prompts = await asyncio.to_thread(self._tokenize, req)
        return await self._generate(request, req, model, prompts, "prompt")

    def _tokenize(self, req: P.GenerationRequest) -> list[tuple[Optional[str], list[int]]]:
        return [(p, self.server.encode(p, req.add_special_tokens)) if isinstance(p, str) else (None, p)
                for p in req.prompts]

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        s = self.server
        s.require_ready()
        body = await s.read_json(request)
        req = P.parse_chat_request(body, s.limits)
        model = s.check_model(req.model)
        text, ids = await asyncio.to_thread(self._render, req)
        return await self._generate(request, req, model, [(text, ids)], "messages")

    def _render(self, req: P.GenerationRequest) -> tuple[str, list[int]]:
        text = self.server.render_chat(req)
        return text, self.server.encode(text, req.add_special_tokens)

    def _max_tokens_for(self, prompt_len: int, requested: Optional[int], param: str) -> int:
        L = self.server.limits.max_model_len
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

    async def _generate(self, request: web.Request, req: P.GenerationRequest, model: str,
                        prompts: list, param: str) -> web.StreamResponse:
        items = []
        base = P.random_id("chatcmpl" if req.kind == "chat" else "cmpl")
        for i, (_, ids) in enumerate(prompts):
            mt = self._max_tokens_for(len(ids), req.max_tokens, param)
            sp = P.build_sampling_params(req, mt)
            items.append((f"{base}-{i}", ids, sp))
        with self.server.admitted(len(items) * req.n):
            if req.stream:
                return await self._stream(request, req, model, base, prompts, items)
            return await self._full(req, model, base, prompts, items)

    def _ended_by_shutdown(self) -> APIError:
        """Called in a handler's `except asyncio.CancelledError`: drain() cancelled it, so the
        request ends with a 503 (the cancellation is consumed); any other cancellation is a client
        that went away and propagates."""
        if not self.server.draining:
            raise asyncio.CancelledError
        asyncio.current_task().uncancel()
        return APIError("The server is shutting down; the request was not finished.", 503,
                        "ServiceUnavailableError", headers={"Retry-After": "1"})

    # ------------------------------------------------------------------------------------------
    # Engine requests
    # ------------------------------------------------------------------------------------------
    async def _engine_stream(self, rid: str, prompt_ids: list[int], sp) -> AsyncIterator[Any]:
        """One engine request, with abort on early exit and metrics on the way."""
        engine, metrics = self.server.engine, self.server.metrics
        agen = engine.generate(prompt_ids, sp, rid)
        finished = False
        last_t, gen = None, 0
        out = None
        self.server.active_rids.add(rid)
        try:
            while True:
                try:
                    out = await anext(agen)
                except StopAsyncIteration:
                    break
                except (ValueError, TypeError) as e:
                    # The engine refused the request (validation). Only these become a 400: the
                    # same exceptions from our own code are server bugs, answered with a 500.
                    raise bad_request(str(e), "max_tokens" if "max_tokens" in str(e) else None) \
                        from None
                t = time.monotonic()
                new = sum(len(o.token_ids) for o in out.outputs)  # DELTA outputs
                if new > 0:
                    if last_t is not None:
                        metrics.observe_itl((t - last_t) / new, new)
                    last_t, gen = t, gen + new
                if out.finished:
                    finished = True
                yield out
                if finished:
                    break
        finally:
            self.server.active_rids.discard(rid)
            with contextlib.suppress(BaseException):
                await agen.aclose()
            if not finished:
                with contextlib.suppress(BaseException):
                    await engine.abort(rid)
            metrics.observe_tokens(len(prompt_ids) if out is not None else 0, gen)
            if out is not None:
                reasons = [o.finish_reason if finished else (o.finish_reason or "abort")
                           for o in out.outputs]
                metrics.observe_finished(out.metrics if finished else None, reasons)

    async def _merged(self, items: list[tuple[str, list[int], Any]]) -> AsyncIterator[tuple[int, Any]]:
        """Outputs of several engine requests, as they come: (prompt index, RequestOutput)."""
        if len(items) == 1:
            async with contextlib.aclosing(self._engine_stream(*items[0])) as it:
                async for out in it:
                    yield 0, out
            return
        # Per prompt, what has not been taken yet, as one output: a consumer that falls behind (a
        # client that stops reading) takes the deltas merged instead of a backlog of them.
        latest: dict[int, Any] = {}
        errors: list[BaseException] = []
        ready = asyncio.Event()
        ended = 0

        async def pump(i: int, item) -> None:
            nonlocal ended
            try:
                async with contextlib.aclosing(self._engine_stream(*item)) as it:
                    async for out in it:
                        if i in latest:
                            latest[i].add(out)
                        else:
                            latest[i] = out
                        ready.set()
            except asyncio.CancelledError:
                raise
            except BaseException as e:  # noqa: BLE001 - re-raised by the consumer
                errors.append(e)
            finally:
                ended += 1
                ready.set()

        tasks = [asyncio.create_task(pump(i, it)) for i, it in enumerate(items)]
        try:
            while ended < len(tasks) or latest:
                await ready.wait()
                ready.clear()
                if errors:
                    raise errors[0]
                taken = sorted(latest.items())
                latest.clear()
                for i, out in taken:
                    yield i, out
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    # ------------------------------------------------------------------------------------------
    # Responses
    # ------------------------------------------------------------------------------------------
    async def _full(self, req, model, base, prompts, items) -> web.Response:
        finals: dict[int, Any] = {}  # per prompt, its deltas added up
        try:
            async with contextlib.aclosing(self._merged(items)) as it:
                async for i, out in it:
                    if i in finals:
                        finals[i].add(out)
                    else:
                        finals[i] = out
        except asyncio.CancelledError:
            raise self._ended_by_shutdown() from None
        tok = self.server.engine.tokenizer
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
                    lps = (chat_logprobs(tok, o.token_ids, o.logprobs, req.logprobs or 0)
                           if req.want_logprobs else None)
                    choices.append({"index": i * n + o.index,
                                    "message": {"role": "assistant", "content": o.text},
                                    "logprobs": lps, "finish_reason": o.finish_reason,
                                    "stop_reason": o.stop_reason})
                else:
                    text = o.text
                    lps = None
                    if req.echo:
                        ptext = prompt_text if prompt_text is not None else tok.decode(ids)
                        text = ptext + text
                    if req.logprobs is not None:
                        tids, steps = list(o.token_ids), list(o.logprobs or [])
                        if req.echo:
                            plp = list(out.prompt_logprobs or [None] * len(ids))
                            tids, steps = list(ids) + tids, plp + steps
                        lps = completion_logprobs(tok, tids, steps, req.logprobs, 0)
                    choices.append({"index": i * n + o.index, "text": text, "logprobs": lps,
                                    "finish_reason": o.finish_reason, "stop_reason": o.stop_reason,
                                    **({"prompt_logprobs": prompt_logprobs(tok, out)}
                                       if req.prompt_logprobs is not None and not req.echo else {})})
        resp = {"id": base, "object": "chat.completion" if req.kind == "chat" else "text_completion",
                "created": P.now(), "model": model, "choices": choices,
                "usage": P.usage(prompt_tokens, completion_tokens, cached)}
        if req.kind == "chat":
            resp["system_fingerprint"] = None
        return json_response(resp)

    async def _stream(self, request, req, model, base, prompts, items) -> web.StreamResponse:
        tok = self.server.engine.tokenizer
        n = req.n
        created = P.now()
        obj = "chat.completion.chunk" if req.kind == "chat" else "text_completion"
        it = self._merged(items)
        resp = None
        try:
            # Pull the first output before committing to a 200, so that engine-side validation
            # errors still become a proper 400.
            try:
                first = await it.__anext__()
            except StopAsyncIteration:
                first = None
            except asyncio.CancelledError:
                raise self._ended_by_shutdown() from None

            resp = web.StreamResponse(status=200, headers={
                "Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no"})
            await resp.prepare(request)

            async def send(payload: Any) -> None:
                data = payload if isinstance(payload, str) else json.dumps(payload, allow_nan=False)
                try:
                    # A client that takes no bytes for this long holds its admission and its
                    # engine requests for nothing: treat it as gone. (asyncio.timeout, unlike
                    # wait_for on Python 3.11, starts no task per chunk.)
                    async with asyncio.timeout(self.server.stream_write_timeout):
                        await resp.write(f"data: {data}\n\n".encode("utf-8"))
                except TimeoutError:
                    raise ConnectionResetError("the client stopped reading the stream") from None

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
                    # DELTA outputs: each holds this choice's new text, tokens and logprobs.
                    gen_tokens[idx] = gen_tokens.get(idx, 0) + len(o.token_ids)
                    delta = o.text
                    new_ids = list(o.token_ids)
                    steps = list(o.logprobs or [])
                    done = o.finish_reason is not None
                    if not delta and not new_ids and not done and st.started:
                        continue
                    if req.kind == "chat":
                        choice = {"index": idx, "delta": {"content": delta} if delta else {},
                                  "logprobs": (chat_logprobs(tok, new_ids, steps, req.logprobs or 0)
                                               if req.want_logprobs and new_ids else None),
                                  "finish_reason": o.finish_reason}
                        if done:
                            choice["stop_reason"] = o.stop_reason
                    else:
                        lps = None
                        prefix = ""
                        if not st.started and req.echo:
                            prefix = prompt_text if prompt_text is not None else tok.decode(ids)
                            if req.logprobs is not None:
                                plp = list(out.prompt_logprobs or [None] * len(ids))
                                new_ids, steps = list(ids) + new_ids, plp + steps
                        if req.logprobs is not None:
                            lps = completion_logprobs(tok, new_ids, steps, req.logprobs,
                                                      st.sent_text)
                        choice = {"index": idx, "text": prefix + delta, "logprobs": lps,
                                  "finish_reason": o.finish_reason}
                        if done:
                            choice["stop_reason"] = o.stop_reason
                    st.started = True
                    st.sent_text += len(delta)
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
            except APIError as e:
                await send({"error": e.body()["error"]})
            except ConnectionError:  # reset, broken pipe, aborted: the client is gone
                raise
            except asyncio.CancelledError:
                await send({"error": self._ended_by_shutdown().body()["error"]})
            except Exception as e:
                if type(e).__name__ == "EngineDeadError":
                    err = APIError(f"The engine has stopped: {e}", 503, "ServiceUnavailableError")
                else:
                    err = internal_error("while streaming")
                await send({"error": err.body()["error"]})
            if req.include_usage:
                await send(chunk([], P.usage(prompt_tokens, sum(gen_tokens.values()))))
            await send("[DONE]")
            await resp.write_eof()
            return resp
        except ConnectionError:
            if resp is None:
                raise
            # Gone, or stalled past stream_write_timeout: close the connection (aiohttp then finds it
            # closed and only logs the access); the finally aborts the engine requests.
            if request.transport is not None:
                request.transport.close()
            return resp
        finally:
            await it.aclose()

