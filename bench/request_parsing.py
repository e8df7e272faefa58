"""What the server spends per request on parsing and validating it, before any tokenizing.

    python bench/request_parsing.py [--iters 20000] [--json]

For each body below: the raw bytes parsed and validated as the endpoint's request schema
(`protocol.parse`), and the request's `SamplingParams` (what a request costs the event loop before
it reaches the engine), timed in a loop on one thread. Prints microseconds per request and the share of one core that 1,000
requests per second would take. Bad bodies are timed to their 400.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import common

MESSAGES = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Summarize the plot of Hamlet in three sentences."},
            {"role": "assistant", "content": "Prince Hamlet seeks revenge for his father ..."},
            {"role": "user", "content": [{"type": "text", "text": "Now in one sentence."}]}]

BODIES = {
    "completion, short text": ("completion", {"model": "m", "prompt": "Hello, my name is",
                                              "max_tokens": 64}),
    "completion, 1k token ids": ("completion", {"model": "m", "prompt": list(range(1000)),
                                                "max_tokens": 64}),
    "completion, sampling fields": ("completion", {
        "model": "m", "prompt": ["a b c", "d e f"], "max_tokens": 32, "temperature": 0.7,
        "top_p": 0.9, "top_k": 40, "seed": 3, "stop": ["\n\n", "###"], "logprobs": 2,
        "presence_penalty": 0.5, "stream": True, "stream_options": {"include_usage": True}}),
    "chat, 4 messages": ("chat", {"model": "m", "messages": MESSAGES, "max_tokens": 128}),
    "chat, sampling fields": ("chat", {
        "model": "m", "messages": MESSAGES, "max_completion_tokens": 128, "temperature": 0.6,
        "top_p": 0.95, "logprobs": True, "top_logprobs": 5, "stop": "User:", "n": 2,
        "stream": True, "stream_options": {"include_usage": True}, "user": "u1"}),
    "bad: temperature as a string": ("completion", {"model": "m", "prompt": "x",
                                                    "temperature": "hot"}),
    "bad: message without content": ("chat", {"model": "m",
                                              "messages": [{"role": "user"}]}),
}


def parse_once(protocol, limits, kind: str, raw: bytes) -> bool:
    """True when the body is accepted."""
    schema = protocol.ChatCompletionRequest if kind == "chat" else protocol.CompletionRequest
    try:
        req = protocol.parse(schema, raw, limits)
        req.sampling_params(req.requested_max_tokens or 16, limits.sampling_defaults)
    except protocol.APIError:
        return False
    return True


def run(args: argparse.Namespace) -> int:
    from jaxvllm.entrypoints.openai import protocol
    limits = protocol.ServerLimits(max_model_len=4096, vocab_size=32000)
    rows, result = [], {}
    for name, (kind, body) in BODIES.items():
        raw = json.dumps(body).encode()
        accepted = parse_once(protocol, limits, kind, raw)
        assert accepted == (not name.startswith("bad")), name
        per_rep = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            for _ in range(args.iters):
                parse_once(protocol, limits, kind, raw)
            per_rep.append((time.perf_counter() - t0) / args.iters * 1e6)
        us = statistics.median(per_rep)
        result[name] = {"us_per_request": us, "core_share_at_1k_rps": us / 1000.0}
        rows.append([name, len(raw), us, f"{us / 10:.1f}%"])
    common.emit(result, args, common.table(
        rows, ["body", "bytes", "us / request (median of repeats)", "one core at 1k req/s"]))
    return 0


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--iters", type=int, default=20000, help="parses per repeat")
    parser.add_argument("--repeats", type=int, default=5)
    common.add_output_args(parser)


if __name__ == "__main__":
    raise SystemExit(common.script_main("request_parsing", __doc__, add_args, run))
