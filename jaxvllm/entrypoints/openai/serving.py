"""Request handling: the engine once loaded, admission of sequences, prompts from text or messages,
and the handlers of /v1/completions and /v1/chat/completions (full responses or SSE streams),
/tokenize and /detokenize. The routes and the engine's lifecycle are server.py's.

Each prompt of a request is one engine request; their outputs are merged as they come.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Iterator, Optional

from aiohttp import web

from jaxvllm.config import EngineArgs
from jaxvllm.engine.async_llm_engine import EngineDeadError
from jaxvllm.engine.llm_engine import NotServingError
from jaxvllm.entrypoints.openai import protocol
from jaxvllm.entrypoints.openai.logprobs import (chat_logprobs, completion_logprobs, decode_token,
                                                 prompt_logprobs)
from jaxvllm.entrypoints.openai.metrics import ServerMetrics
from jaxvllm.entrypoints.openai.protocol import (APIError, ChatCompletionRequest, CompletionRequest,
                                                 DetokenizeRequest, NamedToolChoice, ServerLimits,
                                                 TokenizeRequest, bad_request)
from jaxvllm.entrypoints.openai.chat_output import ChatOutput
from jaxvllm.entrypoints.openai.reasoning import check_parser as check_reasoning_parser
from jaxvllm.lora.request import LoRARequest
from jaxvllm.entrypoints.openai.tool_parsers import check_parser as check_tool_call_parser
from jaxvllm.entrypoints.openai.responses import internal_error, json_response

# Keys the chat template call sets itself: a request's chat_template_kwargs cannot override them.
_CHAT_TEMPLATE_RESERVED = frozenset({
    "conversation", "tools", "documents", "chat_template", "add_generation_prompt",
    "continue_final_message", "tokenize", "padding", "truncation", "max_length", "return_tensors",
    "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs"})


@dataclass
class _Choice:
    """Streaming state of one choice."""
    sent_text: int = 0
    started: bool = False
    finished: bool = False
    chat: Optional[ChatOutput] = None           # chat: its text split into message parts


def engine_stopped(e: EngineDeadError) -> APIError:
    return APIError(f"The engine has stopped: {e}", 503, "ServiceUnavailableError")


class OpenAIServing:
    """The request handlers of one server and the state they share."""

    def __init__(self, engine_args: EngineArgs, served_names: list[str], metrics: ServerMetrics, *,
                 max_waiting: int, max_body: int, stream_write_timeout: float,
                 reasoning_parser: Optional[str] = None, tool_call_parser: Optional[str] = None,
                 lora_modules: Optional[list[LoRARequest]] = None):
        self.engine_args = engine_args
        # The adapters the `model` field may name (--lora-modules).
        self.lora_modules = {lora.lora_name: lora for lora in lora_modules or ()}
        self.reasoning_parser = check_reasoning_parser(reasoning_parser)
        # Set: tool_choice "auto" reads calls out of the text with it (--enable-auto-tool-choice).
        self.tool_call_parser = check_tool_call_parser(tool_call_parser)
        self.served_names = served_names
        self.metrics = metrics
        self.max_waiting = max_waiting
        self.max_body = max_body
        self.stream_write_timeout = stream_write_timeout
        self.engine: Any = None
        self.limits: Optional[ServerLimits] = None
        self.ready = asyncio.Event()
        self.draining = False
        self.in_flight = 0                           # admitted sequences (prompts x n), not finished
        self.active_tasks: set[asyncio.Task] = set()  # handler tasks of admitted requests
        self.active_rids: set[str] = set()           # engine requests running, aborted by a drain

    def attach(self, engine: Any) -> None:
        """Serve `engine` (started); the limits requests are checked against come from it."""
        # Token ids are checked against the model's embedding rows (what the engine checks too),
        # never a guess that would let bad ids through to the model.
        vocab_size = getattr(getattr(engine, "model_config", None), "vocab_size", None)
        if not vocab_size:
            raise ValueError(f"the engine's model config has no vocab_size (got {vocab_size!r})")
        self.engine = engine
        self.limits = ServerLimits(
            max_model_len=int(engine.max_model_len), vocab_size=int(vocab_size),
            max_logprobs=self.engine_args.max_logprobs,
            sampling_defaults=dict(getattr(engine, "default_sampling", {})))
        self.ready.set()

    @property
    def capacity(self) -> int:
        # Every data-parallel replica runs max_num_seqs sequences at once.
        return self.engine_args.max_num_seqs * self.engine_args.data_parallel_size + self.max_waiting

    # ------------------------------------------------------------------------------------------
    # What every handler does first
    # ------------------------------------------------------------------------------------------
    def require_ready(self) -> None:
        if self.draining:
            raise APIError("The server is shutting down.", 503, "ServiceUnavailableError",
                           headers={"Retry-After": "5"})
        if not self.ready.is_set():
            raise APIError("The model is still loading.", 503, "ServiceUnavailableError",
                           headers={"Retry-After": "5"})

    async def read_request(self, request: web.Request, schema: type[protocol.Request]) -> Any:
        """The ready server's request body, validated as `schema`."""
        self.require_ready()
        cl = request.content_length
        if cl is not None and cl > self.max_body:
            raise APIError(f"The request body ({cl} bytes) is larger than the limit of "
                           f"{self.max_body} bytes.", 413, "RequestEntityTooLarge")
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise APIError(f"The request body is larger than the limit of {self.max_body} bytes.",
                           413, "RequestEntityTooLarge") from None
        return protocol.parse(schema, raw, self.limits)

    def check_model(self, model: Optional[str]) -> str:
        if model is None:
            return self.served_names[0]
        if (model in self.served_names or model in self.lora_modules
                or (self.engine_args.model and model == self.engine_args.model)):
            return model
        raise protocol.not_found(f"The model `{model}` does not exist.", "model")

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

    def render_chat(self, req: ChatCompletionRequest | TokenizeRequest) -> str:
        tok = self.tokenizer("messages")
        if getattr(tok, "chat_template", None) is None:
            raise bad_request("The model's tokenizer has no chat template; use /v1/completions.",
                              "messages")
        kwargs = {k: v for k, v in (req.chat_template_kwargs or {}).items()
                  if k not in _CHAT_TEMPLATE_RESERVED}
        try:
            tools = getattr(req, "tools", None)
            if tools:
                kwargs["tools"] = [t.model_dump(exclude_none=True) for t in tools]
            text = tok.apply_chat_template(
                [m.for_template() for m in req.messages], tokenize=False,
                add_generation_prompt=req.add_generation_prompt,
                continue_final_message=req.continue_final_message, **kwargs)
        except Exception as e:  # jinja raise_exception(), template errors
            raise bad_request(f"The chat template could not be applied: {e}", "messages") from None
        if not isinstance(text, str):
            raise bad_request("The chat template did not render to text.", "messages")
        return text

    @contextlib.contextmanager
    def admitted(self, count: int) -> Iterator[None]:
        """Count `count` engine requests in flight, refusing them with 503 when over capacity, and
        track the current handler task so that a drain can wait for it. A request that alone asks
        for more than the capacity is a 400: no wait would ever admit it."""
        if count > self.capacity:
            raise bad_request(f"This request asks for {count} sequences (prompts x n); the server "
                              f"runs at most {self.capacity} at once (max_num_seqs x "
                              f"data_parallel_size + max_waiting_requests).", "n")
        if self.in_flight > 0 and self.in_flight + count > self.capacity:
            self.metrics.rejected.labels(self.served_names[0]).inc()
            raise APIError(f"The server is overloaded ({self.in_flight} requests in flight); "
                           "retry later.", 503, "ServiceUnavailableError",
                           headers={"Retry-After": "1"})
        self.in_flight += count
        task = asyncio.current_task()
        self.active_tasks.add(task)
        try:
            yield
        finally:
            self.in_flight -= count
            self.active_tasks.discard(task)

    # ------------------------------------------------------------------------------------------
    # /tokenize and /detokenize
    # ------------------------------------------------------------------------------------------
    async def tokenize(self, request: web.Request) -> web.Response:
        req = await self.read_request(request, TokenizeRequest)
        self.check_model(req.model)
        if req.messages is not None:
            special = bool(req.add_special_tokens)
            ids = await asyncio.to_thread(lambda: self.encode(self.render_chat(req), special))
        else:
            special = req.add_special_tokens is not False
            ids = await asyncio.to_thread(self.encode, req.prompt, special)
        res = {"count": len(ids), "max_model_len": self.limits.max_model_len, "tokens": ids,
               "token_strs": None}
        if req.return_token_strs:
            tok = self.engine.tokenizer
            conv = getattr(tok, "convert_ids_to_tokens", None)
            res["token_strs"] = list(conv(ids)) if conv else [decode_token(tok, t) for t in ids]
        return json_response(res)

    async def detokenize(self, request: web.Request) -> web.Response:
        req = await self.read_request(request, DetokenizeRequest)
        self.check_model(req.model)
        return json_response({"prompt": self.tokenizer("tokens").decode(req.tokens)})

    # ------------------------------------------------------------------------------------------
    # Generation
    # ------------------------------------------------------------------------------------------
    async def completions(self, request: web.Request) -> web.StreamResponse:
        req = await self.read_request(request, CompletionRequest)
        model = self.check_model(req.model)
        if req.echo:
            self.tokenizer("echo")  # the echoed prompt is text: a 400 for a model without a tokenizer
        # Tokenizing up to MAX_PROMPTS prompts (and rendering chat templates, below) takes CPU time
        # the event loop needs for every other connection: it runs on a worker thread.
        prompts = await asyncio.to_thread(self._tokenize, req)
        return await self._generate(request, req, model, prompts, "prompt")

    def _tokenize(self, req: CompletionRequest) -> list[tuple[Optional[str], list[int]]]:
        return [(p, self.encode(p, req.add_special_tokens)) if isinstance(p, str) else (None, p)
                for p in req.prompts]

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        req = await self.read_request(request, ChatCompletionRequest)
        model = self.check_model(req.model)
        if req.tool_choice == "auto" and self.tool_call_parser is None:
            raise bad_request('tool_choice "auto" needs the server started with '
                              "--enable-auto-tool-choice and --tool-call-parser.", "tool_choice")
        text, ids = await asyncio.to_thread(self._render, req)
        return await self._generate(request, req, model, [(text, ids)], "messages")

    def _chat_output(self, req: ChatCompletionRequest) -> ChatOutput:
        choice = req.effective_tool_choice
        forced = (choice.function.name if isinstance(choice, NamedToolChoice)
                  else "required" if choice == "required" else None)
        parser = self.tool_call_parser if choice == "auto" else None
        return ChatOutput(self.reasoning_parser, parser, forced, req.parallel_tool_calls)

    def _render(self, req: ChatCompletionRequest) -> tuple[str, list[int]]:
        text = self.render_chat(req)
        return text, self.encode(text, req.add_special_tokens)

    def _max_tokens_for(self, prompt_len: int, requested: Optional[int], param: str) -> int:
        L = self.limits.max_model_len
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

    async def _generate(self, request: web.Request, req: CompletionRequest | ChatCompletionRequest,
                        model: str,
                        prompts: list, param: str) -> web.StreamResponse:
        items = []
        base = protocol.random_id("chatcmpl" if isinstance(req, ChatCompletionRequest) else "cmpl")
        for i, (_, ids) in enumerate(prompts):
            max_tokens = self._max_tokens_for(len(ids), req.requested_max_tokens, param)
            sp = req.sampling_params(max_tokens, self.limits.sampling_defaults)
            items.append((f"{base}-{i}", ids, sp, req.structured_outputs_field,
                          self.lora_modules.get(model)))
        with self.admitted(len(items) * req.n):
            if req.stream:
                return await self._stream(request, req, model, base, prompts, items)
            return await self._full(req, model, base, prompts, items)

    def _ended_by_shutdown(self) -> APIError:
        """Called in a handler's `except asyncio.CancelledError`: drain() cancelled it, so the
        request ends with a 503 (the cancellation is consumed); any other cancellation is a client
        that went away and propagates."""
        if not self.draining:
            raise asyncio.CancelledError
        asyncio.current_task().uncancel()
        return APIError("The server is shutting down; the request was not finished.", 503,
                        "ServiceUnavailableError", headers={"Retry-After": "1"})

    # ------------------------------------------------------------------------------------------
    # Engine requests
    # ------------------------------------------------------------------------------------------
    async def _engine_stream(self, rid: str, prompt_ids: list[int], sp,
                             constraint_field: Optional[str],
                             lora_request: Optional[LoRARequest]) -> AsyncIterator[Any]:
        """One engine request, with abort on early exit and metrics on the way. A grammar the
        engine refuses is reported as `constraint_field`'s."""
        engine, metrics = self.engine, self.metrics
        agen = engine.generate(prompt_ids, sp, rid, lora_request=lora_request)
        finished = False
        last_t, gen = None, 0
        out = None
        self.active_rids.add(rid)
        try:
            while True:
                try:
                    out = await anext(agen)
                except StopAsyncIteration:
                    break
                except (ValueError, TypeError) as e:
                    # The engine refused the request (validation). Only these become a 400: the
                    # same exceptions from our own code are server bugs, answered with a 500.
                    msg = str(e)
                    param = ("max_tokens" if "max_tokens" in msg else
                             constraint_field if "structured_outputs" in msg else None)
                    raise bad_request(msg, param) from None
                except NotServingError as e:  # asleep or mid weight update: a passing state
                    raise APIError(str(e), 503, "ServiceUnavailableError") from None
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
            self.active_rids.discard(rid)
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

    async def _merged(self, items: list[tuple]) -> AsyncIterator[tuple[int, Any]]:
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
        tok = self.engine.tokenizer
        chat = isinstance(req, ChatCompletionRequest)
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
                if chat:
                    lps = (chat_logprobs(tok, o.token_ids, o.logprobs, req.num_logprobs)
                           if req.num_logprobs is not None else None)
                    parts = self._chat_output(req)
                    reasoning, content, _ = parts.update(o.text, final=True)
                    calls = parts.calls
                    message = {"role": "assistant",
                               "content": content or (None if calls or self.reasoning_parser
                                                      else content)}
                    if self.reasoning_parser is not None:
                        message["reasoning_content"] = reasoning or None
                    if calls:
                        message["tool_calls"] = [c.to_openai() for c in calls]
                    choices.append({"index": i * n + o.index, "message": message,
                                    "logprobs": lps,
                                    "finish_reason": parts.finish_reason(o.finish_reason),
                                    "stop_reason": o.stop_reason})
                else:
                    text = o.text
                    lps = None
                    if req.echo:
                        ptext = prompt_text if prompt_text is not None else tok.decode(ids)
                        text = ptext + text
                    if req.num_logprobs is not None:
                        tids, steps = list(o.token_ids), list(o.logprobs or [])
                        if req.echo:
                            prompt_lps = list(out.prompt_logprobs or [None] * len(ids))
                            tids, steps = list(ids) + tids, prompt_lps + steps
                        lps = completion_logprobs(tok, tids, steps, req.num_logprobs, 0)
                    choices.append({"index": i * n + o.index, "text": text, "logprobs": lps,
                                    "finish_reason": o.finish_reason, "stop_reason": o.stop_reason,
                                    **({"prompt_logprobs": prompt_logprobs(tok, out)}
                                       if req.num_prompt_logprobs is not None and not req.echo
                                       else {})})
        resp = {"id": base, "object": "chat.completion" if chat else "text_completion",
                "created": protocol.now(), "model": model, "choices": choices,
                "usage": protocol.usage(prompt_tokens, completion_tokens, cached)}
        if chat:
            resp["system_fingerprint"] = None
        return json_response(resp)

    async def _stream(self, request, req, model, base, prompts, items) -> web.StreamResponse:
        tok = self.engine.tokenizer
        chat = isinstance(req, ChatCompletionRequest)
        n = req.n
        created = protocol.now()
        obj = "chat.completion.chunk" if chat else "text_completion"
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
                    async with asyncio.timeout(self.stream_write_timeout):
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

            if chat:
                for i in range(len(items)):
                    for j in range(n):
                        states[i * n + j] = _Choice(started=True, chat=self._chat_output(req))
                        await send(chunk([{"index": i * n + j,
                                           "delta": {"role": "assistant", "content": ""},
                                           "logprobs": None, "finish_reason": None}]))

            async def emit(i: int, out) -> None:
                prompt_text, ids = prompts[i]
                for o in sorted(out.outputs, key=lambda o: o.index):
                    idx = i * n + o.index
                    choice_state = states.setdefault(idx, _Choice())
                    if choice_state.finished:
                        continue
                    # DELTA outputs: each holds this choice's new text, tokens and logprobs.
                    gen_tokens[idx] = gen_tokens.get(idx, 0) + len(o.token_ids)
                    delta = o.text
                    new_ids = list(o.token_ids)
                    steps = list(o.logprobs or [])
                    done = o.finish_reason is not None
                    if not delta and not new_ids and not done and choice_state.started:
                        continue
                    if chat:
                        parts = choice_state.chat
                        reasoning, content, calls = parts.update(delta, final=done)
                        delta_msg = {k: v for k, v in (("reasoning_content", reasoning),
                                                       ("content", content)) if v}
                        if calls:
                            delta_msg["tool_calls"] = [c.to_openai() for c in calls]
                        choice = {"index": idx, "delta": delta_msg,
                                  "logprobs": (chat_logprobs(tok, new_ids, steps, req.num_logprobs)
                                               if req.num_logprobs is not None and new_ids
                                               else None),
                                  "finish_reason": parts.finish_reason(o.finish_reason)}
                        if done:
                            choice["stop_reason"] = o.stop_reason
                    else:
                        lps = None
                        prefix = ""
                        if not choice_state.started and req.echo:
                            prefix = prompt_text if prompt_text is not None else tok.decode(ids)
                            if req.num_logprobs is not None:
                                prompt_lps = list(out.prompt_logprobs or [None] * len(ids))
                                new_ids, steps = list(ids) + new_ids, prompt_lps + steps
                        if req.num_logprobs is not None:
                            lps = completion_logprobs(tok, new_ids, steps, req.num_logprobs,
                                                      choice_state.sent_text)
                        choice = {"index": idx, "text": prefix + delta, "logprobs": lps,
                                  "finish_reason": o.finish_reason}
                        if done:
                            choice["stop_reason"] = o.stop_reason
                    choice_state.started = True
                    choice_state.sent_text += len(delta)
                    choice_state.finished = done
                    usage = None
                    if req.include_usage and req.continuous_usage:
                        g = sum(gen_tokens.values())
                        usage = protocol.usage(prompt_tokens, g)
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
            except EngineDeadError as e:
                await send({"error": engine_stopped(e).body()["error"]})
            except Exception:
                await send({"error": internal_error("while streaming").body()["error"]})
            if req.include_usage:
                await send(chunk([], protocol.usage(prompt_tokens, sum(gen_tokens.values()))))
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

