"""Multi-host engines (`nnodes > 1`, jaxvllm/engine/multihost.py) as two processes on this machine.

Each process gets 4 fake CPU devices and the two join through jax.distributed (CPU collectives over
gloo), so tensor parallelism 8 spans both: rank 0 runs the engine, rank 1 follows its steps. The
processes run this file as a script; rank 0 writes a JSON report that the tests check. The tiny
random Llama and the prompts are test_tensor_parallel.py's.
"""
from __future__ import annotations

import collections
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from typing import Any, Callable, Optional

import pytest

from test_tensor_parallel import ALLOWED, PROMPTS, _save_model

DEVICES_PER_PROCESS = 4
TIMEOUT_S = 300


def _engine_kwargs(tp: int, blocks: Optional[int] = 32) -> dict[str, Any]:
    return dict(dtype="float32", tensor_parallel_size=tp, max_model_len=128, max_num_seqs=4,
                max_num_batched_tokens=32, num_gpu_blocks_override=blocks, enforce_eager=True,
                token_buckets=(8, 32), weights_cache_dir="none",
                compilation_cache_dir=os.environ.get("JAXVLLM_TEST_COMPILE_CACHE", "none"))


def _node_kwargs(addr: str, rank: int) -> dict[str, Any]:
    return dict(nnodes=2, node_rank=rank, dist_init_addr=addr, step_timeout=120.0)


# ---- the processes -------------------------------------------------------------------------------
def _greedy(llm: Any, lora: Any = None, **params: Any) -> dict[str, Any]:
    """The prompts greedy; with `lora`, every other one with that adapter."""
    from jaxvllm import SamplingParams
    sp = SamplingParams(**{"temperature": 0, "max_tokens": 8, "ignore_eos": True, "logprobs": 1,
                           **params})
    loras = None if lora is None else [lora if i % 2 == 0 else None for i in range(len(PROMPTS))]
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], sp, use_tqdm=False,
                        lora_request=loras)
    return {"tokens": [list(o.outputs[0].token_ids) for o in outs],
            "cum_logprobs": [o.outputs[0].cumulative_logprob for o in outs]}


def _both(llm: Any) -> dict[str, Any]:
    """Plain greedy, and greedy with a penalty: the penalty reads each request's earlier tokens on
    the host, so it also checks that the follower appends the same samples as rank 0."""
    return {"plain": _greedy(llm), "penalty": _greedy(llm, max_tokens=24, frequency_penalty=1.0),
            "masked": _greedy(llm, allowed_token_ids=ALLOWED)}


def _lead(model: str, addr: str, out: str) -> None:
    """Rank 0: TP 8 over both processes, then TP 1 on one device of this process as the reference."""
    import jax

    from jaxvllm import LLM
    llm = LLM(model=model, **_engine_kwargs(8), **_node_kwargs(addr, 0))
    report = {"devices": [d.id for d in llm.llm_engine.runner.shardings.mesh.devices.flat],
              "processes": jax.process_count(), "tp8": _both(llm)}
    llm.llm_engine.runner.close()  # the follower exits now, while this process goes on alone
    report["tp1"] = _both(LLM(model=model, **_engine_kwargs(1)))
    with open(out, "w") as f:
        json.dump(report, f)


LORA = dict(enable_lora=True, max_loras=1, max_lora_rank=8)


def _adapter_dir(model: str) -> str:
    return os.path.join(os.path.dirname(model), "adapter")


def _research(llm: Any, model: str, new_weights: dict[str, Any]) -> dict[str, Any]:
    """What an RL loop asks of the engine between its steps, each followed by greedy outputs:
    two adapter ids taking turns in one slot, sleep at both levels, new weights whole and
    streamed, and refused chunks that leave the engine running."""
    import numpy as np

    from jaxvllm import LoRARequest
    from jaxvllm.worker.weight_swap import weight_chunks
    adapters = [LoRARequest(f"adapter{i}", i, _adapter_dir(model)) for i in (1, 2)]
    rep = {"plain": _greedy(llm), "lora": [_greedy(llm, a) for a in adapters + adapters[:1]]}
    llm.sleep(level=1)
    llm.wake_up()
    rep["after_sleep1"] = _greedy(llm, adapters[1])
    llm.sleep(level=2)
    llm.wake_up(tags=["weights"])
    llm.update_weights(new_weights)
    llm.wake_up(tags=["kv_cache"])
    rep["updated"] = _greedy(llm)
    old = {n: w / np.float32(0.75) if n.startswith("layers.") else w
           for chunk in weight_chunks(new_weights) for n, w in chunk.items()}
    llm.start_weight_update()
    refused = []
    for bad in ({"layers.0.q": np.zeros((3, 3), np.float32)}, {"layers.0.nope": old["embed"]}):
        try:
            llm.update_weights(bad)
        except ValueError as e:
            refused.append(str(e))
    for i in range(len(new_weights["layers"])):
        llm.update_weights({n: w for n, w in old.items() if n.startswith(f"layers.{i}.")})
    llm.finish_weight_update()
    rep["refused"], rep["restored"] = refused, _greedy(llm)
    try:
        llm.update_weights(llm.llm_engine.loaded.params)
        rep["global_arrays"] = None
    except ValueError as e:
        rep["global_arrays"] = str(e)
    return rep


def _lead_research(model: str, addr: str, out: str) -> None:
    """Rank 0: `_research` at TP 8 over both processes, then at TP 1 on one device of this
    process (built second: the multi-host engine joins jax.distributed before any JAX call). The
    new weights: the TP 1 engine's own with every layer's scaled by 0.75."""
    import jax
    import numpy as np

    from jaxvllm import LLM
    llm = LLM(model=model, **_engine_kwargs(8), **LORA, **_node_kwargs(addr, 0))
    tp1 = LLM(model=model, **_engine_kwargs(1), **LORA)
    params = jax.tree.map(np.asarray, tp1.llm_engine.loaded.params)
    new = {**params, "layers": jax.tree.map(lambda w: w * np.float32(0.75), params["layers"])}
    report = {"tp8": _research(llm, model, new)}
    llm.llm_engine.runner.close()
    report["tp1"] = _research(tp1, model, new)
    with open(out, "w") as f:
        json.dump(report, f)


def _lead_until_follower_dies(model: str, addr: str, out: str) -> None:
    """Rank 0: one batch, during which the follower stops and is killed (see _follow)."""
    from jaxvllm import LLM
    llm = LLM(model=model, **_engine_kwargs(8), **_node_kwargs(addr, 0))
    try:
        _greedy(llm)
        report = {"error": None}
    except Exception as e:  # noqa: BLE001 (the report says which)
        report = {"error": f"{type(e).__name__}: {e}", "time": time.time()}
    with open(out, "w") as f:
        json.dump(report, f)


def _lead_until_step_fails(model: str, addr: str, out: str) -> None:
    """Rank 0 with a fault injected into its runner (see FAULTS): two batches, the first meets the
    fault, the second finds the engine dead."""
    from jaxvllm import LLM
    llm = LLM(model=model, **_engine_kwargs(8), **_node_kwargs(addr, 0))
    errors: list[Optional[dict]] = []
    for _ in range(2):
        t0 = time.monotonic()
        try:
            _greedy(llm)
            errors.append(None)
        except BaseException as e:  # noqa: BLE001 (Ctrl-C is one of the faults)
            errors.append({"error": f"{type(e).__name__}: {e}", "cause": repr(e.__cause__),
                           "seconds": time.monotonic() - t0})
    with open(out, "w") as f:
        json.dump({"errors": errors}, f)


def _lead_through_startup(model: str, addr: str, out: str) -> None:
    """Rank 0 whose start-up meets a fault on one of the ranks (see FAULTS)."""
    from jaxvllm import LLM
    LLM(model=model, **_engine_kwargs(8, blocks=None), **_node_kwargs(addr, 0))


def _follow(model: str, addr: str, blocks: Optional[int] = 32, **engine: Any) -> int:
    from jaxvllm.config import EngineArgs
    from jaxvllm.engine.multihost import run_follower
    return run_follower(EngineArgs(model=model, **_engine_kwargs(8, blocks), **engine,
                                   **_node_kwargs(addr, 1)))


def _record_memory(out: str) -> None:
    """This process's bytes in live device arrays (not host copies) after each sleep and wake_up of its runner,
    written to `out` at exit: a follower's memory is only seen from inside it."""
    import atexit

    import jax

    from jaxvllm.worker.model_runner import ModelRunner
    record: list[list] = []
    for name in ("sleep", "wake_up"):
        def wrapped(self: ModelRunner, *args: Any, _real: Callable = getattr(ModelRunner, name),
                    _name: str = name) -> Any:
            _real(self, *args)
            live = collections.Counter()
            for a in jax.live_arrays():
                live[str(a.sharding.memory_kind)] += sum(s.data.nbytes for s in a.addressable_shards)
            held = sum(s.data.nbytes for a in jax.tree.leaves((self.params, self.kv_cache))
                       for s in a.addressable_shards)
            record.append([_name, dict(live), held])
        setattr(ModelRunner, name, wrapped)

    def write() -> None:
        with open(out, "w") as f:
            json.dump(record, f)
    atexit.register(write)


def _inject(call: str, at: int, fault: Callable[[], None]) -> None:
    """ModelRunner's method `call` runs `fault` first at its `at`-th call in this process."""
    from jaxvllm.worker.model_runner import ModelRunner
    real, calls = getattr(ModelRunner, call), []

    def wrapped(self: ModelRunner, *args: Any) -> Any:
        calls.append(args)
        if len(calls) == at:
            fault()
        return real(self, *args)

    setattr(ModelRunner, call, wrapped)


def _stop() -> None:
    os.kill(os.getpid(), signal.SIGSTOP)


def _raise(exc: type) -> Callable[[], None]:
    def fault() -> None:
        raise exc("injected fault")
    return fault


def _hold() -> None:
    time.sleep(TIMEOUT_S)


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


# Role -> (the runner call, at which call, the fault). follow_then_stop: rank 1 stops (SIGSTOP) as
# the step arrives, before running it: rank 0 runs it and waits in its collectives for this process,
# which the test then kills. The *_in_startup roles size the KV cache from memory (no
# num_gpu_blocks_override): there one rank fails and the other is held, as on GPUs, where the ranks
# meet in a collective (the allgather of the cache budget) that the failed rank never joins.
FAULTS = {"follow_then_stop": ("dispatch", 3, _stop),
          "follow_then_interrupt": ("dispatch", 3, _raise(KeyboardInterrupt)),
          "lead_then_dispatch_fails": ("dispatch", 3, _raise(RuntimeError)),
          "lead_then_collect_interrupted": ("collect", 3, _raise(KeyboardInterrupt)),
          **{role: ("_profile_num_blocks", 1, fault) for role, fault in [
              ("lead_held_in_startup", _hold), ("lead_killed_in_startup", _die),
              ("lead_fails_in_startup", _raise(RuntimeError)),
              ("follow_held_in_startup", _hold), ("follow_fails_in_startup", _raise(RuntimeError))]}}


# ---- the test side -------------------------------------------------------------------------------
def _free_port_pair() -> int:
    """A port p with p + 1 free as well (the coordinator and the step channel)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
        if p < 65534:
            try:
                with socket.socket() as a, socket.socket() as b:
                    a.bind(("127.0.0.1", p))
                    b.bind(("127.0.0.1", p + 1))
                return p
            except OSError:
                continue
    raise RuntimeError("no two consecutive free ports")


def _spawn(role: str, model: str, addr: str, out: str, log: str) -> subprocess.Popen:
    return _spawn_cmd([os.path.abspath(__file__), role, model, addr, out], log)


def _spawn_cmd(args: list[str], log: str) -> subprocess.Popen:
    """`python ARGS` with this process's share of fake CPU devices."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                        f" --xla_force_host_platform_device_count={DEVICES_PER_PROCESS}").strip()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, *args], env=env, cwd=root, stdout=f,
                                stderr=subprocess.STDOUT)


def _tail(log: str) -> str:
    with open(log) as f:
        return f.read()[-4000:]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    d = str(tmp_path_factory.mktemp("multihost") / "llama")
    _save_model(d, "llama", hidden=64, kv_heads=4)
    return d


def _start_pair(model: str, tmp_path: Any, lead_role: str,
                follow_role: str) -> tuple[Any, Any, str, list[str]]:
    addr = f"127.0.0.1:{_free_port_pair()}"
    out = str(tmp_path / "report.json")
    logs = [str(tmp_path / "rank0.log"), str(tmp_path / "rank1.log")]
    lead = _spawn(lead_role, model, addr, out, logs[0])
    follow = _spawn(follow_role, model, addr, out, logs[1])
    return lead, follow, out, logs


def _kill(*procs: subprocess.Popen) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_tp8_over_two_processes_matches_tp1(model, tmp_path):
    lead, follow, out, logs = _start_pair(model, tmp_path, "lead", "follow")
    try:
        assert lead.wait(TIMEOUT_S) == 0, _tail(logs[0])
        assert follow.wait(60) == 0, _tail(logs[1])  # rank 0 shut down cleanly: exit code 0
    finally:
        _kill(lead, follow)
    with open(out) as f:
        rep = json.load(f)
    assert rep["processes"] == 2
    assert len(rep["devices"]) == 8 and len(set(rep["devices"])) == 8
    for kind in ("plain", "penalty", "masked"):
        tp8, tp1 = rep["tp8"][kind], rep["tp1"][kind]
        assert tp8["tokens"] == tp1["tokens"], kind
        assert tp8["cum_logprobs"] == pytest.approx(tp1["cum_logprobs"], abs=1e-3), kind
    assert rep["tp1"]["penalty"]["tokens"] != rep["tp1"]["plain"]["tokens"]  # the penalty mattered
    # The follower's steps wait for the masks rank 0 sends them (each from the mask thread).
    assert all(t in ALLOWED for toks in rep["tp8"]["masked"]["tokens"] for t in toks)


@pytest.fixture(scope="module")
def adapter(model) -> str:
    pytest.importorskip("peft")
    from test_tensor_parallel import _save_adapter
    _save_adapter(model, _adapter_dir(model))
    return _adapter_dir(model)


def _same_outputs(got: dict[str, Any], ref: dict[str, Any], what: str) -> None:
    assert got["tokens"] == ref["tokens"], what
    assert got["cum_logprobs"] == pytest.approx(ref["cum_logprobs"], abs=1e-3), what


def test_research_calls_over_two_processes_match_tp1(model, adapter, tmp_path):
    """LoRA adapters, sleep and wake at both levels, update_weights whole and streamed: every
    rank makes each call, so TP 8 over two processes keeps giving TP 1's outputs."""
    lead, follow, out, logs = _start_pair(model, tmp_path, "lead_research", "follow_lora")
    try:
        assert lead.wait(TIMEOUT_S) == 0, _tail(logs[0])
        assert follow.wait(60) == 0, _tail(logs[1])
    finally:
        _kill(lead, follow)
    with open(out) as f:
        rep = json.load(f)
    tp8, tp1 = rep["tp8"], rep["tp1"]
    with open(out + ".rank1") as f:
        follower = json.load(f)
    # The follower released its weights and cache as rank 0 did, and put them back.
    assert [call for call, _, _ in follower] == ["sleep", "wake_up"] * 2 + ["wake_up"]
    (_, asleep1, _), (_, awake, held), (_, asleep2, _), (_, weights_only, params), _ = follower
    assert follower[-1][1:] == [awake, held] and weights_only["device"] >= asleep2["device"] + params
    for asleep in (asleep1, asleep2):
        assert asleep["device"] < awake["device"] - 0.9 * held
    assert asleep1["pinned_host"] == params and "pinned_host" not in asleep2
    for key in ("plain", "after_sleep1", "updated", "restored"):
        _same_outputs(tp8[key], tp1[key], key)
    for i, (got, ref) in enumerate(zip(tp8["lora"], tp1["lora"])):
        _same_outputs(got, ref, f"lora call {i}")
    plain = tp1["plain"]["tokens"]
    lora = tp1["lora"][0]["tokens"]
    assert lora[0] != plain[0] and lora[1] == plain[1]  # the adapter changed its requests only
    assert all(call["tokens"] == lora for call in tp1["lora"] + [tp1["after_sleep1"]])
    assert tp1["updated"]["tokens"] != plain and tp1["restored"]["tokens"] == plain
    assert len(tp8["refused"]) == 2 and "shape" in tp8["refused"][0]
    assert "nope" in tp8["refused"][1]
    assert "spread over several processes" in tp8["global_arrays"]
    assert tp1["global_arrays"] is None


def _stopped(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] == "T"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_follower_killed_mid_step_makes_rank0_raise(model, tmp_path):
    """Rank 0 waits in a step's collectives for a follower that stopped; killing the follower
    must fail that step at once, not after step_timeout (120 s here)."""
    lead, follow, out, logs = _start_pair(model, tmp_path, "lead_until_follower_dies",
                                          "follow_then_stop")
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while not _stopped(follow.pid):
            assert lead.poll() is None and follow.poll() is None, _tail(logs[0]) + _tail(logs[1])
            assert time.monotonic() < deadline, "the follower never reached its stop"
            time.sleep(0.2)
        time.sleep(3)  # rank 0 is now waiting for the step the follower never ran
        assert lead.poll() is None, _tail(logs[0])
        killed_at = time.time()
        follow.kill()
        # Exit code 1 at once: not JAX's wait for the dead rank at exit (100 s, then an abort).
        assert lead.wait(60) == 1, _tail(logs[0])
    finally:
        _kill(lead, follow)
    with open(out) as f:
        rep = json.load(f)
    assert rep["error"] and rep["error"].startswith("PeerLostError: "), rep
    assert "rank 1" in rep["error"]
    assert rep["time"] - killed_at < 10  # the closed connection, not the 120 s step deadline


@pytest.mark.parametrize("lead_role, call, first_error", [
    ("lead_then_dispatch_fails", "dispatch", "PeerLostError: "),
    ("lead_then_collect_interrupted", "collect", "KeyboardInterrupt: "),
])
def test_a_failed_call_on_rank0_ends_the_engine_and_the_followers(model, tmp_path, lead_role, call,
                                                                   first_error):
    """The follower made the call before it failed on rank 0 and cannot take it back, so the
    engine is over: the follower exits 1 saying why, the failing batch raises (an Exception as
    PeerLostError, Ctrl-C as itself), and the next batch raises PeerLostError at once."""
    lead, follow, out, logs = _start_pair(model, tmp_path, lead_role, "follow")
    try:
        assert lead.wait(TIMEOUT_S) == 1, _tail(logs[0])  # a dead engine: not JAX's exit wait
        assert follow.wait(60) == 1, _tail(logs[1])
    finally:
        _kill(lead, follow)
    assert (f"rank 1 stops: rank 0 stopped the engine: rank 0's {call} failed"
            in _tail(logs[1])), _tail(logs[1])
    assert "injected fault" in _tail(logs[1])
    with open(out) as f:
        first, second = json.load(f)["errors"]
    assert first["error"].startswith(first_error) and "injected fault" in first["error"], first
    if call == "dispatch":
        assert first["cause"] == "RuntimeError('injected fault')", first
    assert second["error"].startswith("PeerLostError: "), second
    assert f"rank 0's {call} failed" in second["error"], second
    assert second["seconds"] < 5, second


def test_a_failed_dispatch_on_a_follower_ends_it_and_rank0_raises(model, tmp_path):
    """Rank 1's own dispatch raises (Ctrl-C, not only an Exception): rank 1 exits 1 at once, not
    after JAX's wait for rank 0 at exit, and rank 0's step fails with PeerLostError within seconds,
    not after step_timeout (120 s here)."""
    lead, follow, out, logs = _start_pair(model, tmp_path, "lead_until_follower_dies",
                                          "follow_then_interrupt")
    try:
        assert follow.wait(TIMEOUT_S) == 1, _tail(logs[1])
        exited_at = time.time()
        assert lead.wait(60) == 1, _tail(logs[0])
    finally:
        _kill(lead, follow)
    assert "rank 1 stops: KeyboardInterrupt: injected fault" in _tail(logs[1]), _tail(logs[1])
    with open(out) as f:
        rep = json.load(f)
    assert rep["error"] and rep["error"].startswith("PeerLostError: "), rep
    assert "rank 1" in rep["error"]
    assert rep["time"] - exited_at < 10


# Not which phase: on CPU nothing keeps the ranks in step before the KV cache is sized.
_IN_STARTUP = "during start-up, while this rank was "


def test_a_follower_failing_in_startup_ends_rank0(model, tmp_path):
    """Rank 1 fails while rank 0 waits for it in start-up: rank 1 exits 1 at once (not after JAX's
    wait for rank 0 at exit), and rank 0 exits 1 within seconds, not after JAX's heartbeat timeout
    (100 s) or never, saying which rank it lost and where."""
    lead, follow, _, logs = _start_pair(model, tmp_path, "lead_held_in_startup",
                                        "follow_fails_in_startup")
    try:
        assert follow.wait(TIMEOUT_S) == 1, _tail(logs[1])
        exited_at = time.monotonic()
        assert lead.wait(60) == 1, _tail(logs[0])
        assert time.monotonic() - exited_at < 10
    finally:
        _kill(lead, follow)
    assert "rank 1 stops: RuntimeError: injected fault" in _tail(logs[1]), _tail(logs[1])
    assert f"rank 1 closed its connection (the process exited or was killed) {_IN_STARTUP}" in \
        _tail(logs[0]), _tail(logs[0])


@pytest.mark.parametrize("lead_role, code, reason", [
    ("lead_killed_in_startup", -signal.SIGKILL, "rank 0 closed its connection without shutting down"),
    ("lead_fails_in_startup", 1, "rank 0 stopped the engine: rank 0 failed to start (while placing "
                                 "the weights and sizing the KV cache; its log says why)"),
])
def test_rank0_lost_in_startup_ends_the_followers(model, tmp_path, lead_role, code, reason):
    """Rank 0 is killed, or fails and exits, while rank 1 waits for it in start-up: rank 1 exits 1
    within seconds, not after JAX's heartbeat timeout (100 s)."""
    lead, follow, _, logs = _start_pair(model, tmp_path, lead_role, "follow_held_in_startup")
    try:
        assert lead.wait(TIMEOUT_S) == code, _tail(logs[0])
        exited_at = time.monotonic()
        assert follow.wait(60) == 1, _tail(logs[1])
        assert time.monotonic() - exited_at < 10
    finally:
        _kill(lead, follow)
    assert f"rank 1 stops: {reason} {_IN_STARTUP}" in _tail(logs[1]), _tail(logs[1])


def _http(url: str, body: Any = None) -> tuple[int, Any]:
    import urllib.error
    import urllib.request
    req = urllib.request.Request(url, None if body is None else json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, None


def _serve_pair(model: str, tmp_path: Any) -> tuple[list[subprocess.Popen], str, dict, list[str]]:
    """The user's command on each node (rank 0 serves, rank 1 follows), once rank 0 answered one
    completion: (processes, url, that request, logs)."""
    addr = f"127.0.0.1:{_free_port_pair()}"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        http_port = s.getsockname()[1]
    flags = ["--tensor-parallel-size", "8", "--dtype", "float32", "--max-model-len", "128",
             "--max-num-seqs", "4", "--max-num-batched-tokens", "32",
             "--num-gpu-blocks-override", "32", "--enforce-eager", "--token-buckets", "8", "32",
             "--weights-cache-dir", "none", "--compilation-cache-dir",
             os.environ.get("JAXVLLM_TEST_COMPILE_CACHE", "none"), "--nnodes", "2",
             "--dist-init-addr", addr, "--port", str(http_port)]
    procs, logs = [], []
    for rank in (0, 1):
        logs.append(str(tmp_path / f"rank{rank}.log"))
        procs.append(_spawn_cmd(["-m", "jaxvllm.entrypoints.cli", "serve", model, *flags,
                                 "--node-rank", str(rank)], logs[-1]))
    url = f"http://127.0.0.1:{http_port}"
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            assert all(p.poll() is None for p in procs), _tail(logs[0]) + _tail(logs[1])
            assert time.monotonic() < deadline, "the server never became ready"
            try:
                if _http(url + "/health")[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.5)
        name = _http(url + "/v1/models")[1]["data"][0]["id"]
        req = {"model": name, "prompt": PROMPTS[0], "max_tokens": 4, "temperature": 0}
        status, body = _http(url + "/v1/completions", req)
        assert status == 200 and len(body["choices"][0]["text"].split()) == 4, (status, body)
    except BaseException:
        _kill(*procs)
        raise
    return procs, url, req, logs


def test_serve_on_two_nodes_stops_both(model, tmp_path):
    """SIGTERM to rank 0 stops the server, and the follower exits 0 with it."""
    (lead, follow), _, _, logs = _serve_pair(model, tmp_path)
    try:
        lead.send_signal(signal.SIGTERM)
        assert lead.wait(60) == 0, _tail(logs[0])
        assert follow.wait(60) == 0, _tail(logs[1])
    finally:
        _kill(lead, follow)


def test_serve_with_a_dead_follower_fails_loudly(model, tmp_path):
    """Once rank 1 is killed, a request fails, /health answers 503 (until rank 0 stops listening),
    and rank 0 exits 1 on its own, naming rank 1: as its reader saw the connection close or as a
    send to it failed, whichever came first."""
    (lead, follow), url, req, logs = _serve_pair(model, tmp_path)
    try:
        follow.kill()
        follow.wait()
        assert _http(url + "/v1/completions", req)[0] >= 500
        try:
            assert _http(url + "/health")[0] == 503
        except OSError:  # the dead engine already ended the server
            pass
        assert lead.wait(60) == 1, _tail(logs[0])
        assert re.search(r"rank 1 closed its connection|sending to rank 1 failed",
                         _tail(logs[0])), _tail(logs[0])
    finally:
        _kill(lead, follow)


# ---- in-process pieces ---------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, message", [
    ({"nnodes": 0}, "nnodes must be a positive int"),
    ({"nnodes": 2, "node_rank": 2, "dist_init_addr": "h:1"}, r"node_rank must be in \[0, nnodes=2\)"),
    ({"nnodes": 2, "node_rank": -1, "dist_init_addr": "h:1"}, "node_rank"),
    ({"nnodes": 2}, "dist_init_addr must be HOST:PORT"),
    ({"nnodes": 2, "dist_init_addr": "host"}, "dist_init_addr must be HOST:PORT"),
    ({"nnodes": 2, "dist_init_addr": "host:x"}, "dist_init_addr must be HOST:PORT"),
    ({"nnodes": 2, "dist_init_addr": ":80"}, "dist_init_addr must be HOST:PORT"),
    ({"nnodes": 2, "dist_init_addr": "host:65535"}, "dist_init_addr must be HOST:PORT"),
    ({"nnodes": 2, "dist_init_addr": "h:1", "data_parallel_size": 2}, "data_parallel_size > 1"),
    ({"nnodes": 2, "dist_init_addr": "h:1", "engine_process": True}, "engine_process"),
])
def test_engine_args_refuse_bad_node_settings(kwargs, message):
    from jaxvllm.config import EngineArgs
    with pytest.raises(ValueError, match=message):
        EngineArgs(**kwargs)


def test_engine_args_node_settings():
    from jaxvllm.config import EngineArgs, split_host_port
    a = EngineArgs(nnodes=2, node_rank=1, dist_init_addr="[::1]:1234")
    assert (a.nnodes, a.node_rank) == (2, 1)
    assert split_host_port(a.dist_init_addr, "x") == ("::1", 1234)


def test_serve_on_rank_above_0_only_follows(monkeypatch):
    """The same command on every node: rank > 0 starts no HTTP server, it follows rank 0 (with
    the server's batch-limit defaults, as rank 0's engine)."""
    from jaxvllm.engine import multihost
    from jaxvllm.entrypoints import cli
    from jaxvllm.entrypoints.openai import api_server
    seen = []
    monkeypatch.setattr(multihost, "run_follower",
                        lambda args: seen.append((args, args.max_num_seqs is not None)) or 0)
    monkeypatch.setattr(api_server, "serve", lambda *a: pytest.fail("rank 1 started the server"))
    assert cli.main(["serve", "--nnodes", "2", "--node-rank", "1",
                     "--dist-init-addr", "10.0.0.1:5000"]) == 0
    assert [(a.nnodes, a.node_rank, a.dist_init_addr, server) for a, server in seen] == [
        (2, 1, "10.0.0.1:5000", True)]


def test_generate_on_rank_above_0_only_follows(monkeypatch):
    from jaxvllm.engine import multihost
    from jaxvllm.entrypoints import cli, llm
    seen = []
    monkeypatch.setattr(multihost, "run_follower",
                        lambda args: seen.append((args, args.max_num_seqs is not None)) or 0)
    monkeypatch.setattr(llm.LLM, "__init__", lambda *a, **k: pytest.fail("rank 1 built an LLM"))
    assert cli.main(["generate", "hi", "--nnodes", "2", "--node-rank", "1",
                     "--dist-init-addr", "10.0.0.1:5000"]) == 0
    assert [(a.nnodes, a.node_rank, server) for a, server in seen] == [(2, 1, False)]


def test_an_engine_on_rank_above_0_is_refused():
    from jaxvllm import LLM
    with pytest.raises(ValueError, match="only rank 0 runs an engine.*run_follower"):
        LLM(nnodes=2, node_rank=1, dist_init_addr="127.0.0.1:1")


def test_mesh_takes_an_equal_share_of_each_process():
    from types import SimpleNamespace

    from jaxvllm.worker.sharding import _mesh_devices
    devs = [SimpleNamespace(id=i, process_index=i // 4) for i in range(8)]
    assert [d.id for d in _mesh_devices(8, devs)] == list(range(8))
    assert [d.id for d in _mesh_devices(4, devs)] == [0, 1, 4, 5]
    with pytest.raises(ValueError, match=r"multiple of the number of processes \(2\)"):
        _mesh_devices(3, devs)
    with pytest.raises(ValueError, match="process 1 has 3"):
        _mesh_devices(8, devs[:7])


def test_step_wait_fails_at_once_when_a_peer_is_lost():
    """A step waiting on a collective whose peer died (a GPU's NCCL waits forever) fails on the
    runner's next peer check, not after step_timeout."""
    from concurrent.futures import Future
    from types import SimpleNamespace

    import numpy as np

    from jaxvllm.engine.multihost import PeerLostError
    from jaxvllm.worker.model_runner import Inflight, ModelRunner
    from jaxvllm.worker.sampler import SamplerOutput
    from jaxvllm.worker.serial_thread import SerialThread

    class Held:  # a device->host copy that does not finish in time
        def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
            time.sleep(8)
            return np.zeros(4, np.int32)

    runner = ModelRunner.__new__(ModelRunner)
    runner._waiter = SerialThread("test-step-wait")
    runner.config = SimpleNamespace(step_timeout=6.0)
    runner.shardings = SimpleNamespace(tp=8)
    lost = []

    def peer_check() -> None:
        if lost:
            raise PeerLostError("rank 1 is gone")
        lost.append(True)

    runner.peer_check = peer_check
    launched: Future = Future()
    # samples, their logprobs, prompt scores, draft guesses
    launched.set_result((SamplerOutput(token_ids=Held()), None, None, None))
    h = Inflight(["a"], np.ones(1, bool), launched, {}, 8, False)
    t0 = time.perf_counter()
    with pytest.raises(PeerLostError, match="rank 1 is gone"):
        runner._fetch(h)
    assert time.perf_counter() - t0 < 3


if __name__ == "__main__":
    role, model_dir, address, report_path = sys.argv[1:5]
    if role in FAULTS:
        _inject(*FAULTS[role])
    if role == "follow_lora":
        _record_memory(report_path + ".rank1")
    if role.startswith("follow"):
        sys.exit(_follow(model_dir, address, None if role.endswith("_in_startup") else 32,
                         **(LORA if role == "follow_lora" else {})))
    {"lead": _lead, "lead_research": _lead_research, "lead_until_follower_dies": _lead_until_follower_dies,
     "lead_then_dispatch_fails": _lead_until_step_fails,
     "lead_then_collect_interrupted": _lead_until_step_fails,
     "lead_held_in_startup": _lead_through_startup, "lead_killed_in_startup": _lead_through_startup,
     "lead_fails_in_startup": _lead_through_startup}[role](model_dir, address, report_path)
