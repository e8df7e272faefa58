"""Soak: a couple of thousand seeded random requests against the real engine behind the real OpenAI
server, on CPU (a tiny random Llama with a word-level tokenizer, in-process).

Sixteen client threads send a mix of non-streamed and streamed completions, with n > 1, penalties,
stop strings, batched prompts and long shared prefixes (prefix caching), and a KV cache small
enough that requests get preempted; some clients close their socket mid-stream, some before
reading any byte. Afterwards: every request the client did not abandon got a complete, well-formed
answer in time; the server and the engine drain to nothing (no request left running or waiting,
every KV block free, scheduler invariants hold, no admission, stream or engine-side request object
left behind); cancellations reached the engine as aborts of live requests; and the process's RSS
grew by less than a bound between the end of a warm-up and the end of the run (the engine runs with
enforce_eager, so the warm-up requests compile the programs that the rest of the run uses).
"""
from __future__ import annotations

import asyncio
import gc
import json
import random
import socket
import struct
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import pytest

from test_server_helpers import http, metric, raw_request, sse_events, wait_until
from test_tensor_parallel import _save_model

MODEL = "soak"
MAX_LEN = 256
NUM_REQUESTS = 2000
WARMUP = 200
CLIENTS = 16
CALL_TIMEOUT = 60.0          # per socket operation: a request that stalls this long has hung
# Generous (+15 to +60 MB seen): a leak of ~170 KB per request fails it; smaller leaks of request
# objects are caught by counting them instead.
RSS_GROWTH_BOUND_MB = 300.0
PREFIXES = 3                 # long shared prompt prefixes, 6-10 KV blocks each
C = "/v1/completions"


@dataclass
class Spec:
    """One client request: what is sent and how the client ends it."""
    index: int
    kind: str                  # full | stream | cancel_stream (after some events) | cancel_early
    body: dict
    cancel_after: int = 0      # cancel_stream: events read before closing
    delay: float = 0.0         # cancel_early: seconds between sending and closing
    reset: bool = False        # close with an RST instead of a FIN
    penalized: bool = False


# Token ids whose word ("t42") the tokenizer reads back as that id: 0 (unk) and 1 (EOS) are special
# tokens, which the tokenizer also finds inside words ("t15" is t1 + "5"), so no word starts with
# "t0" or "t1".
WORD_IDS = [i for i in range(2, 256) if not str(i).startswith(("0", "1"))]


def _ids(rng: random.Random, n: int) -> list[int]:
    return [rng.choice(WORD_IDS) for _ in range(n)]


def _workload(seed: int) -> list[Spec]:
    rng = random.Random(seed)
    prefixes = [_ids(rng, rng.randrange(96, 161)) for _ in range(PREFIXES)]
    specs = []
    for i in range(NUM_REQUESTS):
        max_tokens = rng.randint(1, 24)

        text = rng.random() < 0.3  # the word-level tokenizer reads text back as the same ids

        def prompt() -> Any:
            ids = (rng.choice(prefixes) + _ids(rng, rng.randint(1, 16)) if rng.random() < 0.6
                   else _ids(rng, rng.randint(1, 48)))
            return " ".join(f"t{t}" for t in ids) if text else ids

        # A few batched requests (several engine requests merged into one response).
        p = [prompt(), prompt()] if rng.random() < 0.05 else prompt()
        body: dict[str, Any] = {"model": MODEL, "prompt": p, "max_tokens": max_tokens,
                                "n": 1 if rng.random() < 0.7 else rng.randint(2, 4)}
        if rng.random() < 0.3:
            body["temperature"] = 0.0
        else:
            body["temperature"] = rng.uniform(0.7, 1.2)
            if rng.random() < 0.5:
                body["seed"] = rng.randrange(2 ** 31)
        penalized = rng.random() < 0.25
        if penalized:
            body["repetition_penalty"] = rng.uniform(1.05, 1.5)
            body["presence_penalty"] = rng.uniform(-1.0, 1.5)
            body["frequency_penalty"] = rng.uniform(-1.0, 1.5)
        if rng.random() < 0.2:
            body["stop"] = [f"t{t}" for t in _ids(rng, rng.randint(1, 2))]
        r = rng.random()
        kind = ("full" if r < 0.35 else "stream" if r < 0.7 else
                "cancel_stream" if r < 0.85 else "cancel_early")
        body["stream"] = kind in ("stream", "cancel_stream") or (
            kind == "cancel_early" and rng.random() < 0.5)
        if body["stream"] and rng.random() < 0.3:
            body["stream_options"] = {"include_usage": True}
        specs.append(Spec(i, kind, body, cancel_after=rng.randint(1, 3),
                          delay=rng.uniform(0.0, 0.05), reset=rng.random() < 0.5,
                          penalized=penalized))
    return specs


def _num_prompts(body: dict) -> int:
    p = body["prompt"]
    return len(p) if isinstance(p, list) and isinstance(p[0], (list, str)) else 1


def _check_text(spec: Spec, text: str) -> None:
    for s in spec.body.get("stop", ()):
        assert s not in text, f"stop string {s!r} in the output {text!r}"


def _check_full(spec: Spec, status: int, resp: Any) -> None:
    assert status == 200, (status, resp)
    want = _num_prompts(spec.body) * spec.body["n"]
    choices = resp["choices"]
    assert sorted(c["index"] for c in choices) == list(range(want)), choices
    mt = spec.body["max_tokens"]
    for c in choices:
        assert c["finish_reason"] in ("stop", "length"), c
        _check_text(spec, c["text"])
    n_length = sum(c["finish_reason"] == "length" for c in choices)
    # A choice that ended by length has exactly max_tokens tokens; none has more.
    assert n_length * mt <= resp["usage"]["completion_tokens"] <= want * mt, resp


def _check_stream(spec: Spec, events: list) -> None:
    assert events and events[-1] == "[DONE]", events[-3:]
    want = _num_prompts(spec.body) * spec.body["n"]
    texts: dict[int, str] = {i: "" for i in range(want)}
    finish: dict[int, str] = {}
    usage = None
    for e in events[:-1]:
        assert isinstance(e, dict) and "error" not in e, e
        if e.get("usage"):
            usage = e["usage"]
        for c in e["choices"]:
            i = c["index"]
            assert i in texts and i not in finish, f"choice {i} after its end: {c}"
            texts[i] += c["text"]
            if c["finish_reason"] is not None:
                finish[i] = c["finish_reason"]
    assert sorted(finish) == list(range(want)), finish
    assert set(finish.values()) <= {"stop", "length"}, finish
    for t in texts.values():
        _check_text(spec, t)
    if spec.body.get("stream_options"):
        mt = spec.body["max_tokens"]
        n_length = sum(r == "length" for r in finish.values())
        assert usage is not None and n_length * mt <= usage["completion_tokens"] <= want * mt, usage


def _close(s: socket.socket, reset: bool) -> None:
    if reset:  # linger 0: the close sends an RST, as a killed client would
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()


def _recv_until(s: socket.socket, got: bytes, done: Callable[[bytes], bool]) -> bytes:
    while not done(got):
        chunk = s.recv(4096)
        assert chunk, f"connection closed early: {got[-200:]!r}"
        got += chunk
    return got


def _run_one(srv: Any, spec: Spec) -> Optional[str]:
    """Send one request and end it as the spec says; the failure, or None."""
    try:
        if spec.kind == "full":
            status, _, resp = http("POST", srv.url + C, spec.body, timeout=CALL_TIMEOUT)
            _check_full(spec, status, resp)
        elif spec.kind == "stream":
            _check_stream(spec, sse_events(srv.url + C, spec.body, timeout=CALL_TIMEOUT))
        else:
            s = raw_request(srv.handle.host, srv.handle.port, "POST", C,
                            json.dumps(spec.body).encode())
            try:
                s.settimeout(CALL_TIMEOUT)
                if spec.kind == "cancel_stream":
                    got = _recv_until(s, b"", lambda g: b"\r\n\r\n" in g)
                    assert got.startswith(b"HTTP/1.1 200"), got[:300]
                    _recv_until(s, got, lambda g: g.count(b"data: ") >= spec.cancel_after
                                or b"[DONE]" in g)
                else:
                    time.sleep(spec.delay)
            finally:
                _close(s, spec.reset)
        return None
    except Exception as e:  # noqa: BLE001 - every failure is reported with its request
        return f"#{spec.index} {spec.kind} {json.dumps(spec.body)[:300]}: {e!r}"


def _rss_mb() -> float:
    gc.collect()
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS in /proc/self/status")


@pytest.fixture(scope="module")
def srv(tmp_path_factory) -> Iterator[Any]:
    from jaxvllm.config import EngineArgs
    from jaxvllm.entrypoints.openai.launch import ServerThread
    d = str(tmp_path_factory.mktemp("soak_llama"))
    _save_model(d, "llama", hidden=64, kv_heads=4)
    # 48 blocks of 16 tokens: one sequence needs at most 13 (a 160-token prefix, a 16-token suffix,
    # 24 new tokens), 16 running ones often more than the cache holds, so sequences get preempted.
    # Budget and buckets keep CPU steps short.
    args = EngineArgs(model=d, dtype="float32", max_model_len=MAX_LEN, max_num_seqs=16,
                      max_num_batched_tokens=64, num_gpu_blocks_override=48, enforce_eager=True,
                      token_buckets=(8, 16, 32, 64), weights_cache_dir="none",
                      compilation_cache_dir="none", disable_log_stats=True)
    s = ServerThread(args, ready_timeout=600, served_model_name=MODEL).start()
    yield s
    s.stop()


class _AbortCounter:
    """Wraps the engine's abort_request to count aborts that found their request still live: a
    cancellation that never reaches the engine leaves the request running to its end, which the
    drain checks alone would not notice."""

    def __init__(self, llm: Any) -> None:
        self.llm = llm
        self.real = llm.abort_request
        self.live = 0

    def __call__(self, request_id: str | list[str]) -> None:
        ids = [request_id] if isinstance(request_id, str) else request_id
        self.live += sum(rid in self.llm._parents for rid in ids)  # on the step thread only
        self.real(request_id)


def _live_objects() -> Counter:
    """Live engine-side request objects by class (after a collection): none may outlive its
    request, whatever its end was."""
    from jaxvllm.core.request import Request
    from jaxvllm.engine.detokenizer import IncrementalDetokenizer
    from jaxvllm.engine.llm_engine import _Child, _Parent
    classes = (Request, _Parent, _Child, IncrementalDetokenizer)
    gc.collect()
    return Counter(type(o).__name__ for o in gc.get_objects() if type(o) in classes)


async def _other_tasks() -> list[asyncio.Task]:
    return [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]


@pytest.mark.slow
def test_soak(srv, monkeypatch):
    llm = srv.engine.engine  # the LLMEngine under the AsyncLLMEngine
    aborts = _AbortCounter(llm)
    monkeypatch.setattr(llm, "abort_request", aborts)
    specs = _workload(seed=1234)
    t0 = time.monotonic()
    failures: list[str] = []
    with ThreadPoolExecutor(CLIENTS) as pool:
        failures += [f for f in pool.map(lambda sp: _run_one(srv, sp), specs[:WARMUP]) if f]
        rss_before = _rss_mb()
        failures += [f for f in pool.map(lambda sp: _run_one(srv, sp), specs[WARMUP:]) if f]
    clients_s = time.monotonic() - t0

    # Cancelled requests end on the server after their client has gone: wait for them. Handler
    # tasks of closed connections go too (only the load task, done, stays on the loop).
    drained = wait_until(lambda: not llm.has_unfinished_requests() and srv.server.serving.in_flight == 0
                         and not srv.server.serving.active_rids
                         and all(t.done() for t in srv.call(_other_tasks())), timeout=30)
    rss_after = _rss_mb()
    sched = llm.scheduler
    stats = sched.stats
    kinds = Counter(sp.kind for sp in specs)
    print(f"\nsoak: {len(specs)} requests {dict(kinds)} (cancelled by the client "
          f"{kinds['cancel_stream'] + kinds['cancel_early']}), "
          f"n>1 {sum(sp.body['n'] > 1 for sp in specs)}, "
          f"penalized {sum(sp.penalized for sp in specs)}; live aborts {aborts.live}, "
          f"preemptions {stats.num_preemptions}, "
          f"prefix-cache hit rate {stats.prefix_cache_hit_rate:.2f}; failures {len(failures)}; "
          f"clients {clients_s:.1f} s; RSS {rss_before:.0f} MB after {WARMUP} requests, "
          f"{rss_after:.0f} MB after {len(specs)} ({rss_after - rss_before:+.0f} MB)")

    assert not failures, f"{len(failures)} failed, e.g.:\n" + "\n".join(failures[:5])
    assert drained, (f"not drained: {llm.get_num_unfinished_requests()} engine requests, "
                     f"in_flight {srv.server.serving.in_flight}, active {len(srv.server.serving.active_rids)}, "
                     f"tasks {srv.call(_other_tasks())}")
    assert stats.num_running == 0 and stats.num_waiting == 0, stats
    assert stats.num_used_blocks == 0, stats
    assert stats.num_free_blocks == sched.config.num_blocks - 1, stats
    sched.check_invariants()
    assert not sched.requests and not llm._child_to_parent
    table = llm.runner.input_batch.token_table
    assert table.num_free == table.num_slots
    assert not srv.engine._streams and not srv.server.serving.active_tasks
    assert not _live_objects(), _live_objects()
    # Cancellations reached the engine while their requests still ran.
    assert aborts.live >= kinds["cancel_stream"] // 4, aborts.live
    assert metric(srv.url, "jaxvllm:request_success_total", {"finished_reason": "abort"}) >= 1
    # The workload did what it is for.
    assert stats.num_preemptions > 0 and stats.prefix_cache_hit_rate > 0.2, stats
    # The engine still serves after it all.
    status, _, resp = http("POST", srv.url + C, {"model": MODEL, "prompt": [5, 6, 7],
                                                 "max_tokens": 4, "temperature": 0,
                                                 "ignore_eos": True})
    assert status == 200 and resp["usage"]["completion_tokens"] == 4, resp
    assert rss_after - rss_before < RSS_GROWTH_BOUND_MB, (rss_before, rss_after)
