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
- Backpressure: the server counts sequences (prompts x n of a request) admitted and not yet
  finished. A request that would take that count above `max_num_seqs x data_parallel_size +
  --max-waiting-requests` is refused with 503 and a Retry-After header (a single request is always
  admitted when nothing else is in flight); one that alone asks for more than that is a 400.
- A client that disconnects aborts its engine requests at once (handler cancellation for plain
  responses, a failed write for streams); so does a streaming client that accepts no bytes for
  `--stream-write-timeout` seconds (its connection is closed).
- SIGTERM/SIGINT: stop listening, refuse new requests with 503, let in-flight requests finish for up
  to `--shutdown-timeout` seconds, then end the rest with a 503 (a final error event and [DONE] for
  streams), shut the engine down and exit 0.
- A dead engine (a step raised): in-flight requests end with a 503 (streams: an error event and
  [DONE]), /health answers 503, and the server shuts down as on SIGTERM but exits 1, so that a
  supervisor restarts it.
- An unexpected exception in a handler is a 500 whose message carries an error id, logged with the
  traceback under the same id; only request validation (parsing, engine input checks) is a 4xx.

Modules: server.py (the application, its lifecycle and small endpoints), serving.py (generation),
logprobs.py, responses.py, protocol.py (request parsing), metrics.py, launch.py (in-process start:
start_server, ServerThread, also for tests and benchmarks); this one is the command line.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from typing import Any, Callable, Optional

from jaxvllm.config import EngineArgs
from jaxvllm.entrypoints.openai.launch import start_server
from jaxvllm.entrypoints.openai.reasoning import PARSERS
from jaxvllm.entrypoints.openai.tool_parsers import PARSERS as TOOL_PARSERS
from jaxvllm.lora.request import LoRARequest
from jaxvllm.entrypoints.openai.server import (DEFAULT_MAX_BODY, DEFAULT_MAX_WAITING,
                                               DEFAULT_MODEL_NAME, DEFAULT_STREAM_WRITE_TIMEOUT)

logger = logging.getLogger("jaxvllm.server")


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
                   help="Sequences (prompts x n) allowed in flight beyond --max-num-seqs; more "
                        "get 503 with Retry-After (default %(default)s).")
    g.add_argument("--max-request-body-bytes", type=int, default=DEFAULT_MAX_BODY,
                   help="Largest request body; larger ones get 413 (default %(default)s).")
    g.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="Seconds in-flight requests may run after SIGTERM/SIGINT before they are "
                        "ended with 503 (default %(default)s).")
    g.add_argument("--stream-write-timeout", type=float, default=DEFAULT_STREAM_WRITE_TIMEOUT,
                   help="Seconds a streaming client may accept no data before its request is "
                        "aborted and its connection closed (default %(default)s).")
    g.add_argument("--reasoning-parser", choices=PARSERS, default=None,
                   help="Split <think>...</think> out of chat completions into reasoning_content "
                        "(deepseek_r1: the template opens the block; qwen3: the output does).")
    g.add_argument("--enable-auto-tool-choice", action="store_true",
                   help='Let tool_choice "auto" (the default with tools) read tool calls out of the '
                        "output, with --tool-call-parser.")
    g.add_argument("--tool-call-parser", choices=TOOL_PARSERS, default=None,
                   help="The tool-call format of the model: hermes (Qwen2.5/Qwen3), llama3_json, "
                        "mistral.")
    g.add_argument("--lora-modules", nargs="+", default=None, metavar="NAME=PATH",
                   help="LoRA adapters (PEFT directories) the `model` field may name, with "
                        "--enable-lora.")
    g.add_argument("--log-level", default="info",
                   choices=["debug", "info", "warning", "error"], help="Server log level.")
    g.add_argument("--access-log", action=argparse.BooleanOptionalAction, default=False,
                   help="Log every HTTP request.")
    return parser


def parse_lora_modules(specs: Optional[list[str]], enable_lora: bool) -> list[LoRARequest]:
    """--lora-modules NAME=PATH ...: adapters with ids 1, 2, ... in the order given."""
    if not specs:
        return []
    if not enable_lora:
        raise SystemExit("--lora-modules needs --enable-lora")
    out = []
    for i, spec in enumerate(specs, 1):
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--lora-modules: expected NAME=PATH, got {spec!r}")
        if not os.path.isfile(os.path.join(path, "adapter_config.json")):
            raise SystemExit(f"--lora-modules {name}: {path!r} is not a PEFT adapter directory "
                             "(no adapter_config.json)")
        out.append(LoRARequest(name, i, path))
    if len({lora.lora_name for lora in out}) < len(out):
        raise SystemExit("--lora-modules: each NAME once")
    return out


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
    if args.enable_auto_tool_choice and args.tool_call_parser is None:
        raise SystemExit("--enable-auto-tool-choice needs --tool-call-parser")
    lora_modules = parse_lora_modules(args.lora_modules, engine_args.enable_lora)
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
            shutdown_timeout=args.shutdown_timeout,
            stream_write_timeout=args.stream_write_timeout,
            reasoning_parser=args.reasoning_parser,
            tool_call_parser=args.tool_call_parser if args.enable_auto_tool_choice else None,
            lora_modules=lora_modules)
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
        dead = asyncio.ensure_future(handle.server.wait_engine_dead())
        await asyncio.wait({stopping, dead}, return_when=asyncio.FIRST_COMPLETED)
        if dead.done():
            # A dead engine never recovers in this process: exit non-zero so that a supervisor
            # restarts the server, instead of answering 503 forever.
            logger.error("the engine is dead; shutting down")
            code = 1
        else:
            dead.cancel()
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
    engine_args = _engine_args_from(args)
    if engine_args.node_rank > 0:  # multi-host: rank 0 serves, this rank only follows its steps
        from jaxvllm.engine.multihost import run_follower
        from jaxvllm.engine.setup import use_server_defaults
        use_server_defaults(engine_args)  # as rank 0's server engine
        return run_follower(engine_args)
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
