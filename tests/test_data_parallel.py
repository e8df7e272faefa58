"""Data parallelism (jaxvllm/engine/data_parallel.py, one process per replica) on 4 fake CPU devices.

As in test_tensor_parallel.py (whose tiny-model helper this reuses), the engines run in one
subprocess started with XLA_FLAGS set before JAX starts (the replica processes inherit them, so each
has the same 4 host devices and takes its group's ids); it writes a JSON report that the tests
below check. The router alone is tested in test_router.py.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
from typing import Any

import pytest

NUM_FAKE_DEVICES = 4
PROMPTS = [list(range(3, 3 + n)) for n in (5, 11, 20, 40, 7, 9)]
PREFIX = list(range(100, 148))   # three full blocks of 16
MAX_NUM_SEQS = 4                 # overload margin max(1, 4 // 8) = 1 sequence


# ---- the subprocess ------------------------------------------------------------------------------
def _llm(d: str, dp: int, tp: int, **kw: Any) -> Any:
    from jaxvllm import LLM
    return LLM(model=d, dtype="float32", data_parallel_size=dp, tensor_parallel_size=tp,
               max_model_len=128, max_num_seqs=MAX_NUM_SEQS, max_num_batched_tokens=32,
               num_gpu_blocks_override=32, enforce_eager=True, token_buckets=(8, 32),
               weights_cache_dir="none",
               compilation_cache_dir=os.environ.get("JAXVLLM_TEST_COMPILE_CACHE", "none"), **kw)


def _generate(llm: Any) -> dict[str, Any]:
    from jaxvllm import SamplingParams
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], sp, use_tqdm=False)
    res: dict[str, Any] = {"tokens": [list(o.outputs[0].token_ids) for o in outs],
                           "prompts": [[o.prompt, list(o.prompt_token_ids)] for o in outs]}
    engine = llm.llm_engine
    if hasattr(engine, "describe_replicas"):
        res["replicas"] = engine.describe_replicas()
    return res


def _updated(llm: Any, d: str) -> list[list[int]]:
    """Greedy tokens after a weight swap (unsharded params of the original config, scaled)."""
    import jax
    from converters import load_model
    from jaxvllm import SamplingParams
    base = load_model(d, dtype="float32", cache_dir=None, load_tokenizer=False).params
    llm.update_weights(jax.tree.map(lambda x: x * 1.25, base))
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], sp, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def _sleep_and_chunks(llm: Any, d: str) -> dict[str, Any]:
    """Sleep mode and a chunked weight update on every replica: asleep, a request is refused and
    the replicas hold less device memory; woken, the tokens are the same; the scaled weights of
    `_updated`, streamed layer by layer, give its tokens."""
    import jax
    from converters import load_model
    from jaxvllm import SamplingParams
    from jaxvllm.worker.weight_swap import weight_chunks
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)

    def run() -> list[list[int]]:
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], sp, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    def live() -> list[int]:
        return [sum(r["live_bytes"].values()) for r in llm.llm_engine.describe_replicas()]

    res: dict[str, Any] = {"live_awake": live()}
    llm.sleep(level=1)
    res["asleep"] = llm.is_sleeping()
    res["live_asleep"] = live()
    try:
        run()
        res["asleep_error"] = None
    except RuntimeError as e:
        res["asleep_error"] = str(e)
    llm.wake_up()
    res["awake"], res["tokens_after_wake"] = not llm.is_sleeping(), run()
    base = load_model(d, dtype="float32", cache_dir=None, load_tokenizer=False).params
    new = jax.tree.map(lambda x: x * 1.25, base)
    llm.start_weight_update()
    for chunk in weight_chunks(new):
        llm.update_weights(chunk)
    llm.finish_weight_update()
    res["tokens_after_chunks"] = run()
    llm.update_weights(base)  # back to the start for what follows
    return res


def _drain(engine: Any) -> dict[str, Any]:
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    return finished


def _affinity(llm: Any) -> dict[str, Any]:
    """A request runs prefix PREFIX on the idle engine; three more share it: the first two go to its
    replica (the second although the other replica is less loaded), the third finds that replica
    overloaded (2 unfinished against 0, margin 1) and goes to the other one."""
    from jaxvllm import SamplingParams
    engine = llm.llm_engine
    engine.add_request("a", {"prompt_token_ids": PREFIX + [1, 2]},
                       SamplingParams(temperature=0, max_tokens=2))
    holder = engine._owner["a"][0]
    _drain(engine)
    owners = []
    for i in range(3):
        engine.add_request(f"b{i}", {"prompt_token_ids": PREFIX + [7 + i] * 4},
                           SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
        owners.append(engine._owner[f"b{i}"][0])
    done = _drain(engine)
    return {"holder": holder, "owners": owners,
            "cached": [done[f"b{i}"].num_cached_tokens for i in range(3)]}


def _aborts(llm: Any) -> dict[str, Any]:
    """One request on each replica; the one on replica 1 is aborted after a step."""
    from jaxvllm import SamplingParams
    engine = llm.llm_engine
    sp = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    engine.add_request("keep", {"prompt_token_ids": list(range(200, 210))}, sp)
    engine.add_request("drop", {"prompt_token_ids": list(range(210, 220))}, sp)
    owners = {rid: engine._owner[rid][0] for rid in ("keep", "drop")}
    engine.step()
    engine.abort_request("drop")
    # Read from the replicas after the abort (each handles its commands in order).
    after_abort = [r["num_unfinished"] for r in engine.describe_replicas()]
    done = _drain(engine)
    return {"owners": owners, "unfinished_after_abort": after_abort, "finished": sorted(done),
            "keep_tokens": len(done["keep"].outputs[0].token_ids),
            "left": [r["num_unfinished"] for r in engine.describe_replicas()]}


def _id_reuse(llm: Any) -> dict[str, Any]:
    """A request id aborted and added again at once (to the same replica: both are idle): outputs
    the replica made for the old request before it saw the abort must not reach the new one."""
    import time

    from jaxvllm import SamplingParams
    engine = llm.llm_engine
    old, new = list(range(60, 70)), list(range(70, 75))
    engine.add_request("dup", {"prompt_token_ids": old},
                       SamplingParams(temperature=0, max_tokens=60, ignore_eos=True))
    engine.step()
    time.sleep(1.0)  # the replica goes on stepping: its outputs wait in the pipe
    engine.abort_request("dup")
    engine.add_request("dup", {"prompt_token_ids": new},
                       SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    seen = []
    while engine.has_unfinished_requests():
        seen += [(o.prompt_token_ids, len(o.outputs[0].token_ids), o.finished)
                 for o in engine.step() if o.request_id == "dup"]
    return {"prompts_seen": sorted({tuple(p) for p, _, _ in seen}), "last": seen[-1][1:],
            "new": new}


def _replica_death(llm: Any) -> dict[str, Any]:
    """Replica 1's process is killed while it runs a request: the next steps raise ReplicaError
    naming it (no hang), and shutdown still returns."""
    import time

    from jaxvllm import SamplingParams
    from jaxvllm.engine.data_parallel import ReplicaError
    engine = llm.llm_engine
    sp = SamplingParams(temperature=0, max_tokens=100, ignore_eos=True)
    engine.add_request("x0", {"prompt_token_ids": list(range(30, 40))}, sp)
    engine.add_request("x1", {"prompt_token_ids": list(range(40, 50))}, sp)
    victim = engine._owner["x1"][0]
    engine.step()
    engine.replicas[victim].process.kill()
    t0 = time.monotonic()
    error = None
    try:
        for _ in range(500):
            engine.step()
    except ReplicaError as e:
        error = str(e)
    seconds = time.monotonic() - t0
    engine.shutdown()
    return {"victim": victim, "error": error, "seconds": seconds,
            "alive": [r.process.is_alive() for r in engine.replicas]}


def _serve(llm: Any) -> dict[str, Any]:
    """Two concurrent streams through AsyncLLMEngine, and its per-replica stats."""
    import asyncio

    from jaxvllm import SamplingParams
    from jaxvllm.engine.async_llm_engine import AsyncLLMEngine

    async def run() -> dict[str, Any]:
        engine = AsyncLLMEngine(llm.llm_engine)
        sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)

        async def one(i: int) -> list[int]:
            last = None
            async for out in engine.generate({"prompt_token_ids": PROMPTS[i]}, sp, f"s{i}"):
                last = out
            return list(last.outputs[0].token_ids)

        tokens = await asyncio.gather(one(0), one(1))
        stats = [s.prefix_cache_queries for s in engine.get_replica_stats()]
        await engine.shutdown()
        return {"tokens": tokens, "replica_queries": stats}

    return asyncio.run(run())


def _lora(d: str, adapter: str, dp: int) -> dict[str, Any]:
    """Greedy tokens with an adapter on every prompt but the last (spread over the replicas by
    load, so each reads it), then a request naming a missing adapter."""
    from jaxvllm import LLM, LoRARequest, SamplingParams
    llm = LLM(model=d, dtype="float32", data_parallel_size=dp, max_model_len=128,
              max_num_seqs=MAX_NUM_SEQS, max_num_batched_tokens=32, num_gpu_blocks_override=32,
              enforce_eager=True, token_buckets=(8, 32), weights_cache_dir="none",
              compilation_cache_dir=os.environ.get("JAXVLLM_TEST_COMPILE_CACHE", "none"),
              enable_lora=True, max_loras=1, max_lora_rank=8)
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    lora = LoRARequest("adapter", 1, adapter)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], sp, use_tqdm=False,
                        lora_request=[lora] * (len(PROMPTS) - 1) + [None])
    res: dict[str, Any] = {"tokens": [list(o.outputs[0].token_ids) for o in outs]}
    try:
        llm.generate([{"prompt_token_ids": PROMPTS[0]}], sp, use_tqdm=False,
                     lora_request=LoRARequest("missing", 2, adapter + "-missing"))
        res["missing"] = None
    except ValueError as e:
        res["missing"] = str(e)
    res["after_missing"] = [list(o.outputs[0].token_ids) for o in llm.generate(
        [{"prompt_token_ids": PROMPTS[0]}], sp, use_tqdm=False, lora_request=lora)]
    if dp > 1:
        llm.llm_engine.shutdown()
    return res


def _worker(out_path: str) -> None:
    import jax
    from test_tensor_parallel import _save_model
    assert jax.device_count() == NUM_FAKE_DEVICES, jax.devices()
    report: dict[str, Any] = {"device_ids": [d.id for d in jax.devices()]}
    with tempfile.TemporaryDirectory() as tmp:
        d = os.path.join(tmp, "llama")
        _save_model(d, "llama", hidden=64, kv_heads=4)
        dp1 = _llm(d, 1, 1)
        report["dp1"] = _generate(dp1)
        report["dp1"]["updated"] = _updated(dp1, d)
        del dp1
        alone = _llm(d, 1, 1, engine_process=True)  # the one engine behind the front
        report["dp1proc"] = _generate(alone)
        report["dp1proc"]["pids"] = [os.getpid(), alone.llm_engine.replicas[0].info["pid"]]
        report["dp1proc"]["serve"] = _serve(alone)
        alone.llm_engine.shutdown()
        dp2 = _llm(d, 2, 1)
        report["dp2_at_start"] = dp2.llm_engine.describe_replicas()
        report["dp2"] = _generate(dp2)
        report["affinity"] = _affinity(dp2)
        report["aborts"] = _aborts(dp2)
        report["id_reuse"] = _id_reuse(dp2)
        report["serve"] = _serve(dp2)
        report["sleep_and_chunks"] = _sleep_and_chunks(dp2, d)
        report["dp2"]["updated"] = _updated(dp2, d)
        report["replica_death"] = _replica_death(dp2)
        dp2tp2 = _llm(d, 2, 2)
        report["dp2tp2_at_start"] = dp2tp2.llm_engine.describe_replicas()
        report["dp2tp2"] = _generate(dp2tp2)
        dp2tp2.llm_engine.shutdown()
        # Drafts under tensor parallelism, split over the target's mesh: the model itself, and
        # another with one KV head (replicated on both devices, as a target's would be).
        one_kv = os.path.join(tmp, "one-kv")
        _save_model(one_kv, "llama", hidden=64, kv_heads=1)
        for name, draft in (("tp2draft", d), ("tp2draft1kv", one_kv)):
            tp_draft = _llm(d, 1, 2, speculative_config={"model": draft,
                                                         "num_speculative_tokens": 3})
            report[name] = _generate(tp_draft)
            report[name]["spec"] = vars(tp_draft.llm_engine.get_stats().spec_decode)
            runner = tp_draft.llm_engine.runner
            report[name]["cache_spec"] = [list(x.sharding.spec) for x in
                                          jax.tree.leaves(runner.draft_kv_cache)]
            q = runner.drafter.params["layers"][0]["q"]
            report[name]["q_spec"] = [list(q.sharding.spec), len(q.sharding.device_set)]
            del tp_draft, runner
        # The model as its own draft: each replica loads it onto its own device.
        drafted = _llm(d, 2, 1, speculative_config={"model": d, "num_speculative_tokens": 3})
        report["dp2draft"] = _generate(drafted)
        report["dp2draft"]["spec"] = vars(drafted.llm_engine.get_stats().spec_decode)
        drafted.llm_engine.shutdown()
        from test_tensor_parallel import _save_adapter
        adapter = os.path.join(tmp, "adapter")
        _save_adapter(d, adapter)
        report["lora"] = {str(dp): _lora(d, adapter, dp) for dp in (1, 2)}
        try:
            _llm(d, 3, 2)
            report["too_many"] = None
        except ValueError as e:
            report["too_many"] = str(e)
        from jaxvllm import LLM
        try:  # a setting every replica refuses at start-up (a cache too small for max_model_len)
            LLM(model=d, dtype="float32", data_parallel_size=2, max_model_len=128,
                num_gpu_blocks_override=4, enforce_eager=True, weights_cache_dir="none")
            report["bad_setting"] = None
        except Exception as e:  # noqa: BLE001 - its type is what the test checks
            report["bad_setting"] = [type(e).__name__, str(e)]
    with open(out_path, "w") as f:
        json.dump(report, f)


# ---- the tests -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict[str, Any]:
    from test_tensor_parallel import run_script
    return run_script(__file__, str(tmp_path_factory.mktemp("dp") / "report.json"), NUM_FAKE_DEVICES)


@pytest.mark.parametrize("run", ["dp2", "dp2tp2", "dp2draft", "tp2draft", "tp2draft1kv"])
def test_greedy_tokens_match_dp1(report, run):
    assert report[run]["tokens"] == report["dp1"]["tokens"]


@pytest.mark.parametrize("run", ["dp1proc", "dp2"])
def test_outputs_carry_their_prompt(report, run):
    """Replicas send outputs without the prompt; the front puts back what it prepared."""
    assert report[run]["prompts"] == report["dp1"]["prompts"] == [[None, p] for p in PROMPTS]


def test_one_engine_in_a_process_of_its_own(report):
    """engine_process=True at data_parallel_size 1: the engine runs in a child process behind the
    front, offline and under AsyncLLMEngine, with the in-process engine's tokens."""
    r = report["dp1proc"]
    assert r["tokens"] == report["dp1"]["tokens"]
    assert r["serve"]["tokens"] == report["dp1"]["tokens"][:2]
    assert len(r["serve"]["replica_queries"]) == 1
    front, engine = r["pids"]
    assert engine != front


def test_a_draft_model_guesses_under_tensor_parallelism(report):
    """A draft split over the target's two devices (its cache over KV heads, as the target's):
    the greedy output is the target's (above); the model as its own draft has its guesses taken,
    and a one-KV-head draft (its head replicated) runs and guesses too."""
    spec = report["tp2draft"]["spec"]
    assert spec["num_draft_tokens"] >= spec["num_accepted_tokens"] > 0.8 * spec["num_draft_tokens"]
    assert report["tp2draft1kv"]["spec"]["num_draft_tokens"] > 0
    for run in ("tp2draft", "tp2draft1kv"):
        specs = report[run]["cache_spec"]
        assert specs and all(s == [None, None, "tp", None] for s in specs), (run, specs)
        assert report[run]["q_spec"] == [[None, "tp"], 2], run  # split by the target's rules


def test_each_replica_guesses_with_a_draft_model_of_its_own(report):
    r = report["dp2draft"]
    spec = r["spec"]
    assert spec["num_draft_tokens"] >= spec["num_accepted_tokens"] > 0.8 * spec["num_draft_tokens"]
    assert [x["draft"] for x in r["replicas"]] == [x["params"] for x in r["replicas"]] == [[0], [1]]


def test_lora_adapters_over_replicas_match_one_engine(report):
    """Each replica reads an adapter when it first runs a request of it: the same tokens as one
    engine; a missing adapter is refused at the front as a ValueError, the engine unharmed."""
    one, two = report["lora"]["1"], report["lora"]["2"]
    assert two["tokens"] == one["tokens"]
    assert two["tokens"][:-1] != report["dp1"]["tokens"][:-1]  # the adapter mattered
    assert two["tokens"][-1] == report["dp1"]["tokens"][-1]
    assert "adapter-missing" in two["missing"] and "adapter-missing" in one["missing"]
    assert two["after_missing"] == [two["tokens"][0]]


def test_weight_update_reaches_every_replica(report):
    assert report["dp2"]["updated"] == report["dp1"]["updated"]
    assert report["dp1"]["updated"] != report["dp1"]["tokens"]  # the update changed the model


def test_sleep_wake_and_chunked_updates_reach_every_replica(report):
    r = report["sleep_and_chunks"]
    assert r["asleep"] and r["awake"]
    assert "wake_up" in r["asleep_error"]
    assert all(a < b for a, b in zip(r["live_asleep"], r["live_awake"])), r
    assert r["tokens_after_wake"] == report["dp1"]["tokens"]
    assert r["tokens_after_chunks"] == report["dp1"]["updated"]


@pytest.mark.parametrize("run, tp", [("dp2", 1), ("dp2tp2", 2)])
def test_each_replica_runs_on_its_own_devices(report, run, tp):
    """Placed there at start-up (before any step could move them) and still there after steps;
    each replica process holds bytes on its own devices only, the same amount on each replica
    (its params and cache, or its shards of them): nothing stays behind on the default device."""
    ids = report["device_ids"]
    for i, (start, r) in enumerate(zip(report[f"{run}_at_start"], report[run]["replicas"])):
        group = sorted(ids[tp * i:tp * (i + 1)])
        assert r["prefix_cache_queries"] > 0, (run, i)         # it ran requests
        for where in (start, r):
            assert where["params"] == where["kv_cache"] == where["prev_sampled"] == group, \
                (run, i, where)
            assert where["mesh"] == (group if tp > 1 else None)
        held = {int(k): v for k, v in r["live_bytes"].items()}
        assert all(held[k] > 0 for k in group) and not any(held[k] for k in held if k not in group)
    a, b = ({int(k): v for k, v in r["live_bytes"].items()} for r in report[run]["replicas"])
    assert [a[k] for k in ids[:tp]] == [b[k] for k in ids[tp:2 * tp]]


def test_shared_prefix_goes_to_its_replica_unless_overloaded(report):
    a = report["affinity"]
    holder, other = a["holder"], 1 - a["holder"]
    assert a["owners"] == [holder, holder, other]
    assert a["cached"][0] == a["cached"][1] == len(PREFIX)   # the prefix's three blocks were hits
    assert a["cached"][2] == 0


def test_abort_reaches_its_replica(report):
    a = report["aborts"]
    assert sorted(a["owners"].values()) == [0, 1]              # one request on each replica
    unfinished = [1, 1]
    unfinished[a["owners"]["drop"]] = 0
    assert a["unfinished_after_abort"] == unfinished
    assert a["finished"] == ["keep"] and a["keep_tokens"] == 20
    assert a["left"] == [0, 0]


def test_an_aborted_id_reused_at_once_gets_only_its_own_outputs(report):
    r = report["id_reuse"]
    assert r["prompts_seen"] == [r["new"]]
    assert r["last"] == [3, True]


def test_async_engine_over_replicas(report):
    s = report["serve"]
    assert s["tokens"] == report["dp1"]["tokens"][:2]
    assert len(s["replica_queries"]) == 2


def test_a_dead_replica_fails_the_engine_loudly(report):
    r = report["replica_death"]
    assert r["error"] is not None and f"replica {r['victim']} exited" in r["error"], r
    assert r["seconds"] < 30
    assert r["alive"] == [False, False]   # shutdown stopped the survivor too


def test_a_setting_a_replica_refuses_is_a_value_error(report):
    kind, msg = report["bad_setting"]
    assert kind == "ValueError" and "failed to start" in msg and "max_model_len (128) needs" in msg


def test_too_few_devices_raise_at_startup(report):
    assert report["too_many"] == ("data_parallel_size (3) x tensor_parallel_size (2) = 6 exceeds "
                                  "the number of available devices (4)")


@pytest.mark.parametrize("bad", [0, -1, True, 1.5])
def test_data_parallel_size_must_be_a_positive_int(bad):
    from jaxvllm.config import EngineArgs
    with pytest.raises(ValueError, match="data_parallel_size must be a positive int"):
        EngineArgs(data_parallel_size=bad)


def test_metrics_have_a_series_per_replica():
    from jaxvllm.core.scheduler import SchedulerStats
    from jaxvllm.entrypoints.openai.metrics import ServerMetrics

    class TwoReplicas:
        def get_replica_stats(self) -> list[SchedulerStats]:
            return [SchedulerStats(3, 1, 0.5, 8, 8, 100, 40, 0),
                    SchedulerStats(2, 0, 0.25, 4, 12, 60, 0, 1)]

    text = ServerMetrics("m", TwoReplicas).render().decode()
    assert 'jaxvllm:num_requests_running{engine="0",model_name="m"} 3.0' in text
    assert 'jaxvllm:num_requests_running{engine="1",model_name="m"} 2.0' in text
    assert 'jaxvllm:prefix_cache_hits_total{engine="0",model_name="m"} 40.0' in text
    assert 'jaxvllm:num_preemptions_total{engine="1",model_name="m"} 1.0' in text


if __name__ == "__main__":
    _worker(sys.argv[1])
