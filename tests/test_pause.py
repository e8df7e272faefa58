"""pause_generation / resume_generation (vLLM's AsyncLLM names) on the default model, through the
async engine and the offline LLM: running requests are retracted (ending with what they have,
finish_reason "abort") or drained, new ones wait, the weights change in between."""
from __future__ import annotations

import asyncio
import threading
import time

import jax
import numpy as np
import pytest

from jaxvllm import LLM, SamplingParams
from jaxvllm.engine.async_llm_engine import AsyncLLMEngine

# Longer than two KV blocks (16 tokens): its full blocks enter the prefix cache.
PROMPT = ("The capital of France is Paris, the capital of Germany is Berlin, the capital of Italy "
          "is Rome, and the capital of Spain is")
LONG = SamplingParams(temperature=0, max_tokens=100, ignore_eos=True)
SHORT = SamplingParams(temperature=0, max_tokens=5)


@pytest.fixture(scope="module")
def llm():
    return LLM(dtype="float32", max_model_len=256, max_num_seqs=4, max_num_batched_tokens=64,
               num_gpu_blocks_override=64, enforce_eager=True, token_buckets=(8, 64),
               enable_prefix_caching=True)


def _until_shutdown(engine: AsyncLLMEngine, body):
    """asyncio.run(body()), the engine's step thread stopped after (also when an assert fails:
    the next test drives the same engine)."""
    async def main():
        try:
            return await body()
        finally:
            await engine.shutdown()
    return asyncio.run(main())


def _tokens(llm: LLM, prompt: str = PROMPT) -> list[int]:
    return llm.generate([prompt], SHORT, use_tqdm=False)[0].outputs[0].token_ids


def test_async_pause_retracts_holds_new_requests_and_resumes(llm):
    """Two running streams end at once with finish_reason "abort" and the tokens they had; a
    request sent while paused waits, sees the weights pushed during the pause, and runs after
    resume_generation; the pause dropped the prefix cache."""
    want = _tokens(llm)
    params = jax.tree.map(np.asarray, llm.llm_engine.runner.params)
    scaled = jax.tree.map(lambda a: a * 1.25 if a.ndim > 1 else a, params)
    engine = AsyncLLMEngine(llm.llm_engine)

    async def consume(gen):
        outs = [out async for out in gen]
        return outs[-1]

    async def run():
        running = [asyncio.create_task(consume(engine.generate(PROMPT, LONG, f"r{i}")))
                   for i in range(2)]
        while llm.llm_engine.scheduler.stats.num_running < 2:
            await asyncio.sleep(0.01)
        await engine.pause_generation()
        assert engine.is_paused() and all(t.done() for t in running)
        cut = [t.result() for t in running]
        late = asyncio.create_task(consume(engine.generate(PROMPT, SHORT, "late")))
        await asyncio.sleep(0.3)
        assert not late.done()  # held while paused
        with pytest.raises(ValueError, match="level"):  # an engine call's error reaches the caller
            await engine.sleep(level=3)
        await engine.update_weights(scaled, reset_prefix_cache=False)  # the pause dropped it
        await engine.resume_generation()
        got = await late
        await engine.update_weights(params)
        return cut, got

    cut, got = _until_shutdown(engine, run)
    for out in cut:
        c = out.outputs[0]
        assert out.finished and c.finish_reason == "abort" and 0 < len(c.token_ids) < 100
    assert got.finished and got.outputs[0].token_ids != want
    assert got.num_cached_tokens == 0
    assert _tokens(llm) == want  # the old weights are back


def test_async_pause_waits_for_running_requests(llm):
    engine = AsyncLLMEngine(llm.llm_engine)

    async def run():
        outs = []

        async def consume():
            async for out in engine.generate(PROMPT, SamplingParams(temperature=0, max_tokens=20,
                                                                    ignore_eos=True), "w"):
                outs.append(out)
        stream = asyncio.create_task(consume())
        while not outs:
            await asyncio.sleep(0.01)
        await engine.pause_generation(wait_for_inflight_requests=True, clear_cache=False)
        assert stream.done() and not llm.llm_engine.has_unfinished_requests()
        await engine.resume_generation()
        assert not engine.is_paused()
        return outs[-1]

    last = _until_shutdown(engine, run)
    assert last.finished and last.outputs[0].finish_reason == "length"
    assert len(last.outputs[0].token_ids) == 20


def test_offline_pause_from_another_thread(llm):
    """A generate() running on one thread returns early when another thread pauses; generate on
    the pausing thread is refused until resume_generation, and on another one waits for it."""
    result = {}
    thread = threading.Thread(
        target=lambda: result.setdefault("cut", llm.generate([PROMPT, "def f(x):"], LONG,
                                                             use_tqdm=False)))
    thread.start()
    engine = llm.llm_engine
    while engine.scheduler.stats.num_running < 2:
        time.sleep(0.005)
    llm.pause_generation()
    thread.join(10)
    assert llm.is_paused() and not thread.is_alive()
    for out in result["cut"]:
        assert out.finished and out.outputs[0].finish_reason == "abort"
        assert 0 < len(out.outputs[0].token_ids) < 100
    with pytest.raises(RuntimeError, match="resume_generation"):
        llm.generate([PROMPT], SHORT, use_tqdm=False)
    waiter = threading.Thread(target=lambda: result.setdefault("late", _tokens(llm)))
    waiter.start()
    waiter.join(0.5)
    assert waiter.is_alive() and "late" not in result  # held while paused
    llm.resume_generation()
    waiter.join(60)
    assert result["late"] == _tokens(llm)
    assert not llm.is_paused()
