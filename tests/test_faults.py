"""Fault injection on the real engine (embedded SmolLM2, float32, CPU): a fault fails what it must,
and the engine neither serves wrong tokens afterwards nor leaves a request waiting forever."""
from __future__ import annotations

import asyncio

import pytest

from jaxvllm import LLM, SamplingParams
from jaxvllm.engine.async_llm_engine import AsyncLLMEngine, EngineDeadError

# 3 full blocks of 16 tokens and more: the step that computes them registers them in the prefix cache.
PREFIX = "The history of the city begins with a small settlement on the river bank, where " * 3


@pytest.fixture(scope="module")
def llm():
    return LLM(dtype="float32", max_model_len=256, max_num_seqs=8, max_num_batched_tokens=64,
               num_gpu_blocks_override=96, enforce_eager=True, token_buckets=(8, 16, 32, 64))


def greedy(max_tokens=8):
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_failed_dispatch_leaves_no_prefix_cache_entry(llm, monkeypatch, error):
    engine = llm.llm_engine
    prefix = f"{error.__name__}. " + PREFIX  # no block shared with the other case
    pool = engine.scheduler.kv_cache_manager.block_pool
    llm.generate(["An unrelated warm-up prompt."], greedy(2))  # a step that did run: its hashes stay
    hashes_before = dict(pool.cached_block_hash_to_block)

    real_dispatch = engine.runner.dispatch

    def fail_once(so):
        monkeypatch.setattr(engine.runner, "dispatch", real_dispatch)
        raise error("injected dispatch failure")

    monkeypatch.setattr(engine.runner, "dispatch", fail_once)
    with pytest.raises(error, match="injected dispatch failure"):
        llm.generate([prefix + "Question one?"], greedy())
    assert not engine.has_unfinished_requests()
    assert engine.scheduler.get_num_unfinished_requests() == 0
    assert pool.cached_block_hash_to_block == hashes_before  # nothing of the failed step's blocks
    engine.scheduler.check_invariants()

    prompt = prefix + "Question two?"
    after = llm.generate([prompt], greedy())[0].outputs[0].token_ids
    engine.scheduler.reset_prefix_cache()
    fresh = llm.generate([prompt], greedy())[0].outputs[0].token_ids
    assert after == fresh


def test_failed_launch_is_a_failed_dispatch(llm, monkeypatch):
    """A step whose programs fail to reach the device (raised on the launch thread, seen when its
    samples are collected) fails its requests and leaves the queue, as a failed dispatch does (the
    step dispatched after it stays queued, collected as usual): the next generate gives the tokens
    of a clean run and the engine drains."""
    engine = llm.llm_engine
    clean = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, PARAMS)]
    real_sample = engine.runner._sample
    calls = {"n": 0}

    def fail_second(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("injected launch failure")
        return real_sample(*args, **kw)

    monkeypatch.setattr(engine.runner, "_sample", fail_second)
    with pytest.raises(RuntimeError, match="injected launch failure"):
        llm.generate(PROMPTS, PARAMS)
    assert not engine.has_unfinished_requests()
    assert not any(h.launch_failed for _, h in engine._inflight)
    assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS, PARAMS)] == clean
    _drained(engine)


def test_generate_racing_a_dying_loop_gets_engine_dead_error(llm, monkeypatch):
    """The loop dies right after generate() checked for a dead engine and before it registered its
    stream: the request must fail, not wait forever."""
    engine = llm.llm_engine
    aengine = AsyncLLMEngine(engine)
    real_prepare = engine.prepare_request

    def broken_loop():
        raise RuntimeError("injected loop failure")

    def prepare_then_kill_loop(*args, **kw):
        prepared = real_prepare(*args, **kw)
        monkeypatch.setattr(engine, "has_unfinished_requests", broken_loop)
        aengine._wake.set()
        aengine._thread.join(10)
        assert not aengine._thread.is_alive()
        return prepared

    async def main():
        await aengine.start()
        monkeypatch.setattr(engine, "prepare_request", prepare_then_kill_loop)
        with pytest.raises(EngineDeadError, match="injected loop failure"):
            async for _ in aengine.generate("Hello", greedy(), "r1"):
                pass

    asyncio.run(asyncio.wait_for(main(), 10))


def _detok_fails_for(monkeypatch, marker: str):
    """Detokenization raises for requests whose prompt contains `marker` (and only for those)."""
    from jaxvllm.engine import detokenizer

    real_init = detokenizer.IncrementalDetokenizer.__init__
    real_update = detokenizer.IncrementalDetokenizer.update

    def init(self, tokenizer, params, prompt_token_ids):
        real_init(self, tokenizer, params, prompt_token_ids)
        self.doomed = marker in tokenizer.decode(prompt_token_ids)

    def update(self, new_token_ids, num_output_tokens):
        if self.doomed and num_output_tokens >= 3:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "injected detokenizer fault")
        return real_update(self, new_token_ids, num_output_tokens)

    monkeypatch.setattr(detokenizer.IncrementalDetokenizer, "__init__", init)
    monkeypatch.setattr(detokenizer.IncrementalDetokenizer, "update", update)


def test_a_detokenizer_fault_fails_only_its_request(llm, monkeypatch, caplog):
    engine = llm.llm_engine
    good = ["Tell me about rivers.", "Name three colours."]
    clean = [o.outputs[0].token_ids for o in llm.generate(good, greedy(8))]
    _detok_fails_for(monkeypatch, "DOOMED")
    sp = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, n=2)
    outs = llm.generate([good[0], "DOOMED prompt here.", good[1]], [greedy(8), sp, greedy(8)])
    assert [o.outputs[0].token_ids for o in (outs[0], outs[2])] == clean
    assert [c.finish_reason for c in outs[1].outputs] == ["error", "error"]
    # The first sample failed at its third token; the other stopped in the same step. Token ids
    # are what was sampled (the scheduler's), text what was decoded before the fault.
    assert outs[1].finished and [len(c.token_ids) for c in outs[1].outputs] == [3, 3]
    assert "failed while processing its output" in caplog.text and "DOOMED" not in caplog.text
    assert not engine.has_unfinished_requests()
    assert engine.get_stats().num_used_blocks == 0  # the failed request's blocks were freed
    engine.scheduler.check_invariants()
    assert [o.outputs[0].token_ids for o in llm.generate(good, greedy(8))] == clean


def test_a_detokenizer_fault_fails_only_its_stream(llm, monkeypatch):
    from jaxvllm.engine.async_llm_engine import RequestFailedError
    _detok_fails_for(monkeypatch, "DOOMED")

    async def run():
        aengine = AsyncLLMEngine(llm.llm_engine)

        async def one(prompt, rid):
            last = None
            async for out in aengine.generate(prompt, greedy(8), rid):
                last = out
            return last

        res = await asyncio.gather(one("Tell me about rivers.", "ok"),
                                   one("DOOMED prompt here.", "bad"), return_exceptions=True)
        alive = aengine.is_running
        await aengine.shutdown()
        return res, alive

    (ok, bad), alive = asyncio.run(run())
    assert isinstance(bad, RequestFailedError) and "request bad failed" in str(bad)
    assert ok.finished and len(ok.outputs[0].token_ids) == 8
    assert alive


@pytest.mark.parametrize("stage", ["schedule", "sample"])
def test_a_fault_in_the_step_fails_every_stream_and_marks_the_engine_dead(llm, monkeypatch, stage):
    """An exception in the scheduler or the sampler is an engine fault (its state is unknown): every
    stream in flight gets EngineDeadError naming it, the engine reports itself dead (the server then
    exits 1), and nothing waits forever."""
    engine = llm.llm_engine
    target, name = (engine.scheduler, "schedule") if stage == "schedule" else (engine.runner, "_sample")
    real = getattr(target, name)
    calls = {"n": 0}

    def fail_on_third(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError(f"injected {stage} fault")
        return real(*args, **kw)

    async def main():
        aengine = AsyncLLMEngine(engine)

        async def one(rid):
            async for _ in aengine.generate(f"Question {rid}?", greedy(16), rid):
                pass

        monkeypatch.setattr(target, name, fail_on_third)
        res = await asyncio.gather(one("a"), one("b"), return_exceptions=True)
        return res, aengine.errored, aengine.is_running

    res, errored, running = asyncio.run(asyncio.wait_for(main(), 60))
    assert all(isinstance(e, EngineDeadError) and f"injected {stage} fault" in str(e) for e in res), res
    assert errored and not running
    monkeypatch.setattr(target, name, real)
    engine.abort_request(["a", "b"])  # the module's engine goes on serving the other tests
    assert not engine.has_unfinished_requests()


def _interrupt_fetch(monkeypatch, engine, calls_to_fail: set[int]) -> None:
    """Ctrl-C (KeyboardInterrupt) during the chosen waits for a step's samples."""
    real_fetch = engine.runner._fetch
    calls = {"n": 0}

    def fetch(h):
        calls["n"] += 1
        if calls["n"] in calls_to_fail:
            raise KeyboardInterrupt
        return real_fetch(h)

    monkeypatch.setattr(engine.runner, "_fetch", fetch)


def _drained(engine) -> None:
    assert not engine.has_unfinished_requests() and not engine._inflight
    assert engine.get_stats().num_used_blocks == 0
    engine.scheduler.check_invariants()


PROMPTS = ["Tell me about rivers.", "Name three colours."]
PARAMS = [greedy(10), SamplingParams(temperature=0.9, seed=7, max_tokens=10, ignore_eos=True,
                                     repetition_penalty=1.2)]


def test_an_interrupted_wait_for_the_device_loses_no_step(llm, monkeypatch):
    """Ctrl-C while the engine waits for a step's samples leaves that step queued: stepping on
    gives the tokens of an uninterrupted run (greedy, and seeded with a penalty), also after two
    interrupts in a row (two steps queued), and the engine drains."""
    engine = llm.llm_engine
    clean = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, PARAMS)]
    _interrupt_fetch(monkeypatch, engine, {3, 4})
    for i, (p, sp) in enumerate(zip(PROMPTS, PARAMS)):
        engine.add_request(f"int-{i}", p, sp)
    final, interrupts = {}, 0
    for _ in range(100):
        if not engine.has_unfinished_requests():
            break
        try:
            for out in engine.step():
                if out.finished:
                    final[out.request_id] = out.outputs[0].token_ids
        except KeyboardInterrupt:
            interrupts += 1
    assert interrupts == 2
    assert [final.get("int-0"), final.get("int-1")] == clean
    _drained(engine)


def test_ctrl_c_in_generate_while_waiting_for_the_device(llm, monkeypatch):
    """LLM.generate interrupted in the wait raises KeyboardInterrupt and aborts its requests; the
    next call gives the uninterrupted tokens and the engine drains."""
    engine = llm.llm_engine
    clean = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, PARAMS)]
    _interrupt_fetch(monkeypatch, engine, {3})
    with pytest.raises(KeyboardInterrupt):
        llm.generate(PROMPTS, PARAMS)
    assert not engine.has_unfinished_requests()
    real_step, steps = engine.step, {"n": 0}

    def bounded_step():  # a lost step would leave generate() stepping forever
        steps["n"] += 1
        assert steps["n"] < 100, "generate() does not finish"
        return real_step()

    monkeypatch.setattr(engine, "step", bounded_step)
    assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS, PARAMS)] == clean
    _drained(engine)


@pytest.mark.parametrize("error", [ConnectionResetError, BrokenPipeError, RuntimeError])
def test_a_stream_write_fault_aborts_only_its_request(real_srv, monkeypatch, error):
    """An exception while the server writes a stream to its client ends that stream and aborts its
    engine request: a connection error (reset, broken pipe) as a client gone, with no more bytes;
    anything else as an internal error, told in a last error event. Either way the engine drains,
    its blocks are free, and the server answers the next request."""
    import json
    import socket
    from aiohttp import web
    from test_server_helpers import http, raw_request, wait_until

    real_write = web.StreamResponse.write
    events = {"n": 0}

    async def write(self, data):
        if data.startswith(b"data: "):
            events["n"] += 1
            if events["n"] == 3:
                raise error("injected stream write fault")
        return await real_write(self, data)

    engine = real_srv.engine.engine
    monkeypatch.setattr(web.StreamResponse, "write", write)
    body = json.dumps({"model": "SmolLM2-135M-Instruct", "prompt": "Tell me a long story.",
                       "max_tokens": 200, "stream": True, "temperature": 0,
                       "ignore_eos": True}).encode()
    s = raw_request(real_srv.handle.host, real_srv.handle.port, "POST", "/v1/completions", body)
    got = b""
    try:
        while chunk := s.recv(65536):  # the server ends the connection
            got += chunk
    except (socket.timeout, OSError):
        pass
    finally:
        s.close()
    assert got.startswith(b"HTTP/1.1 200"), got[:100]
    if issubclass(error, ConnectionError):
        assert got.count(b"data: ") == 2, got[-300:]
    else:  # two chunks, the error, [DONE]
        assert got.count(b"data: ") == 4 and b'"code": 500' in got and b"[DONE]" in got, got[-300:]
    assert wait_until(lambda: not engine.has_unfinished_requests(), 10), "request not aborted"
    assert engine.get_stats().num_used_blocks == 0
    monkeypatch.setattr(web.StreamResponse, "write", real_write)
    status, _, resp = http("POST", real_srv.url + "/v1/completions",
                           {"model": "SmolLM2-135M-Instruct", "prompt": "Hello", "max_tokens": 3},
                           timeout=60)
    assert status == 200 and resp["usage"]["completion_tokens"] == 3
