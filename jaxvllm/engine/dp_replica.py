"""One data-parallel replica: an LLMEngine in its own process (engine/data_parallel.py starts it).

Each replica's step is mostly Python (schedule, build the batch, collect, detokenize); replicas
stepped in turn on one thread added their host work up (measured on 2x H200: DP 2 gave 1.37x DP 1).
In its own process a replica steps as fast as its own host and devices allow.

Two pipes: commands come in on one, events go out on the other from a sender thread, so the main
loop never blocks on a full outgoing pipe while the front is blocked sending it a command.

Commands (front -> replica): ("add", _Parent), ("abort", [ids]), ("call", name, args) answered by
("reply", value) or ("error", text), ("shutdown",). Events (replica -> front): ("ready", info) or
("error", text, exception type name) at start-up, ("outputs", [RequestOutput without its prompt
and prompt ids], SchedulerStats) after every step,
("aborted", [ids]) once an abort is applied, ("dead", text) when a step raised (the replica
then exits).
"""
from __future__ import annotations

import dataclasses
import functools
import os
import queue
import signal
import threading
import traceback
from typing import Any, Optional

# A device group is given as ids: on GPU the replica's process sees only those devices (renumbered
# from 0, by CUDA_VISIBLE_DEVICES, read when CUDA starts); on CPU (tests) every process has the
# same host devices and takes those ids.


def describe_exception(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}\n{''.join(traceback.format_exception(e))}"


def replica_main(rank: int, args: Any, device_ids: list[int], platform: str, commands: Any,
                 events: Any, loaded: Any = None) -> None:
    """The replica process's entry point (multiprocessing, spawn)."""
    # Ctrl-C reaches the whole process group: the front decides what it means (it may abort its
    # requests and go on), so a replica must not die of it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        engine = _start(args, device_ids, platform, loaded)
        events.send(("ready", _info(engine, rank, device_ids)))
    except BaseException as e:  # the front raises it, naming this replica
        events.send(("error", describe_exception(e), type(e).__name__))
        return
    out: queue.Queue = queue.Queue()
    sender = threading.Thread(target=_send_loop, args=(out, events), daemon=True,
                              name="jaxvllm-replica-send")
    sender.start()
    try:
        _loop(engine, commands, out)
    finally:
        out.put(None)
        sender.join()


def _start(args: Any, device_ids: list[int], platform: str, loaded: Any) -> Any:
    if platform == "gpu":
        # Ids count within the front's own visible set, if it has one.
        seen = os.environ.get("CUDA_VISIBLE_DEVICES")
        names = seen.split(",") if seen else [str(i) for i in range(max(device_ids) + 1)]
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(names[i] for i in device_ids)
    import jax
    from jaxvllm.engine.llm_engine import LLMEngine
    from jaxvllm.engine.setup import configure_jax
    # This process is one replica: the weights load straight onto its devices.
    args = dataclasses.replace(args, data_parallel_size=1)
    configure_jax(args)
    if platform == "gpu":
        group = jax.devices()
        if jax.default_backend() != "gpu" or len(group) != len(device_ids):
            raise RuntimeError(f"replica on GPUs {device_ids} sees {len(group)} "
                               f"{jax.default_backend()} device(s)")
    else:
        by_id = {d.id: d for d in jax.devices()}
        group = [by_id[i] for i in device_ids]
    return LLMEngine(args, loaded, devices=group)


def _info(engine: Any, rank: int, device_ids: list[int]) -> dict:
    """What the front needs of a replica: the model facts its requests are prepared with, and the
    replica's start-up figures."""
    return {"rank": rank, "device_ids": device_ids, "pid": os.getpid(),
            "model_config": engine.model_config, "max_model_len": engine.max_model_len,
            "tokenizer": engine.tokenizer, "tokenizer_origin": engine.tokenizer_origin,
            "generation_config": engine.loaded.generation_config,
            "default_sampling": engine.default_sampling, "startup": engine.startup_info(),
            "stats": engine.get_stats()}


def _send_loop(out: queue.Queue, events: Any) -> None:
    while (item := out.get()) is not None:
        try:
            events.send(item)
        except (BrokenPipeError, OSError):  # the front is gone
            return


def _loop(engine: Any, commands: Any, out: queue.Queue) -> None:
    while True:
        # Commands first (adds and aborts apply before the next step); wait for one when idle.
        while not engine.has_unfinished_requests() or commands.poll():
            try:
                msg = commands.recv()
            except (EOFError, OSError):  # the front is gone: so is this replica
                return
            if not _handle(engine, msg, out):
                return
        try:
            outputs = engine.step()
        except BaseException as e:
            out.put(("dead", describe_exception(e)))
            return
        for o in outputs:
            _drop_prompt(o)
        out.put(("outputs", outputs, engine.get_stats()))


def _drop_prompt(output: Any) -> None:
    """A step's output as sent: its prompt text and ids left out (the front has them from when it
    prepared the request). Pickled with every step's output, a prompt of ~600 ids took most of the
    front's time per streamed token (bench/RESULTS.md). In place: the step made these outputs for
    this message alone (a copy cost 1.3 us an output on the engine's thread)."""
    output.prompt = output.prompt_token_ids = None


def _handle(engine: Any, msg: tuple, out: queue.Queue) -> bool:
    kind = msg[0]
    if kind == "add":
        engine.admit_request(msg[1])
    elif kind == "abort":
        engine.abort_request(msg[1])
        out.put(("aborted", msg[1]))  # after every output made before the abort
    elif kind == "call":
        _, name, call_args = msg
        try:
            out.put(("reply", _run_call(engine, name, call_args)))
        except Exception as e:
            out.put(("error", describe_exception(e)))
    elif kind == "shutdown":
        return False
    else:
        raise ValueError(f"unknown replica command {kind!r}")
    return True


def _describe(engine: Any) -> dict:
    """Where this replica's arrays live and what its scheduler holds (tests and diagnostics)."""
    import jax
    runner = engine.runner
    # A step still being launched has donated the cache it was given and not yet stored the new
    # one: wait for the launches queued so far.
    runner._launcher.submit(lambda: None).result()
    ids = lambda tree: sorted({d.id for leaf in jax.tree.leaves(tree) for d in leaf.devices()})
    live: dict[int, int] = {}
    for a in jax.live_arrays():
        for shard in a.addressable_shards:
            live[shard.device.id] = live.get(shard.device.id, 0) + shard.data.nbytes
    sched = engine.scheduler
    return {"params": ids(runner.params), "kv_cache": ids(runner.kv_cache),
            "prev_sampled": ids(runner._prev_sampled),
            "draft": None if runner.drafter is None else ids((runner.drafter.params,
                                                              runner.draft_kv_cache)),
            "mesh": (None if runner.shardings is None else
                     sorted(d.id for d in runner.shardings.mesh.devices.flat)),
            "live_bytes": {d.id: live.get(d.id, 0) for d in jax.devices()},
            "num_unfinished": sched.get_num_unfinished_requests(),
            "prefix_cache_queries": sched.kv_cache_manager.prefix_cache_queries}


# The LLMEngine methods the front calls on its replicas (DataParallelEngine._call), between steps.
_ENGINE_CALLS = ("update_weights", "start_weight_update", "finish_weight_update", "sleep",
                 "wake_up", "is_sleeping", "retract_requests", "reset_prefix_cache")


def _run_call(engine: Any, name: str, args: tuple) -> Any:
    if name == "describe":
        return _describe(engine)
    if name not in _ENGINE_CALLS:
        raise ValueError(f"unknown replica call {name!r}")
    return getattr(engine, name)(*args)


@functools.cache
def probe_devices() -> tuple[str, int, Optional[int]]:
    """(backend, device count, a GPU's memory as setup.device_memory_bytes says) from a
    short-lived process that reserves no device memory, so the front never holds memory on the
    replicas' devices (once per process)."""
    import json
    import subprocess
    import sys
    code = ("import json, jax; from jaxvllm.engine.setup import device_memory_bytes; "
            "print(json.dumps([jax.default_backend(), jax.device_count(), "
            "device_memory_bytes(jax.devices()[0])]))")
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=300)
    if proc.returncode:
        raise RuntimeError(f"could not list the devices: {proc.stderr.strip()[-2000:]}")
    backend, count, device_bytes = json.loads(proc.stdout.strip().splitlines()[-1])
    return backend, int(count), device_bytes
