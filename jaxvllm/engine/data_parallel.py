"""Data parallelism: `data_parallel_size` full engines (scheduler, runner, KV cache), replica i on
devices [i * tp, (i + 1) * tp), each in its own process (engine/dp_replica.py), behind the interface
`LLM` and `AsyncLLMEngine` use from LLMEngine.

This process is the front: it validates and tokenizes each request (a RequestPreparer built from
replica 0's model facts), routes it with `core/router.py` (load, with prefix-cache affinity) and
sends it to its replica; its n > 1 samples stay together (they share the prompt's blocks). The
replicas step on their own and send their outputs back; `step()` returns what has arrived, waiting
for at least one replica when none has. The front never touches the replicas' devices (it counts
them in a short-lived probe process), so it holds no device memory.

Affinity reads what the front has routed: a replica "holds" a prompt block when a request whose
prompt has that block (by the KV-cache manager's chained hash) was sent to it, remembered for as
many blocks as the replica's KV cache has, most recent kept. The replica's own cache may have
evicted it since; the request then recomputes it there, as it would anywhere else.
With `data_parallel_size == 1`, `create_engine` returns a plain LLMEngine (no front on that path)
unless `engine_process` asks for the one engine in a process of its own behind this front.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import multiprocessing
import threading
import weakref
from multiprocessing.connection import wait
from typing import Any, NamedTuple, Optional, Sequence, Union

from jaxvllm.config import EngineArgs
from jaxvllm.core.block_pool import BlockHash
from jaxvllm.core.request import lora_cache_salt
from jaxvllm.core.router import ReplicaState, Router, RouterConfig
from jaxvllm.core.scheduler import SchedulerStats, SpecDecodeStats
from jaxvllm.engine.llm_engine import (LLMEngine, RequestFront, RequestPreparer, _Parent,
                                       _generation_eos_ids, check_can_generate, check_chunk,
                                       check_idle, check_sleep_level, wake_tags)
from jaxvllm.lora.request import LoRARequest
from jaxvllm.outputs import RequestOutput

logger = logging.getLogger(__name__)

# A replica holding a request's prefix is passed over when it has more than this fraction of
# max_num_seqs unfinished sequences above the least-loaded replica (32 at the default 256).
OVERLOAD_FRACTION = 1 / 8
SHUTDOWN_WAIT_S = 30.0


def create_engine(args: EngineArgs, loaded: Any = None) -> Union[LLMEngine, "DataParallelEngine"]:
    """The engine for `args`: one LLMEngine, or a DataParallelEngine over data_parallel_size
    replica processes (one with engine_process)."""
    if args.data_parallel_size == 1 and not args.engine_process:
        return LLMEngine(args, loaded)
    return DataParallelEngine(args, loaded)


def replica_device_groups(dp: int, tp: int, num_devices: int) -> list[list[int]]:
    """Each replica's `tp` device ids, in device order; ValueError when there are too few."""
    if dp * tp > num_devices:
        raise ValueError(f"data_parallel_size ({dp}) x tensor_parallel_size ({tp}) = {dp * tp} "
                         f"exceeds the number of available devices ({num_devices})")
    return [list(range(i * tp, (i + 1) * tp)) for i in range(dp)]


class ReplicaError(RuntimeError):
    """A replica process failed to start, failed a step, or exited: the engine cannot go on."""


class _RoutedPrefixes:
    """The prompt block hashes sent to one replica, the most recent `capacity` kept."""

    def __init__(self, capacity: int) -> None:
        self.capacity = max(1, capacity)
        self._hashes: collections.OrderedDict[BlockHash, None] = collections.OrderedDict()

    def add(self, hashes: Sequence[BlockHash]) -> None:
        for h in hashes:
            self._hashes[h] = None
            self._hashes.move_to_end(h)
        while len(self._hashes) > self.capacity:
            self._hashes.popitem(last=False)

    def __contains__(self, h: object) -> bool:
        return h in self._hashes


class _Owned(NamedTuple):
    """An unfinished request as the front remembers it."""
    replica: int
    sequences: int  # n
    prompt: Optional[str]
    prompt_token_ids: list[int]


class _Replica:
    """The front's handle on one replica process."""

    def __init__(self, rank: int, process: Any, commands: Any, events: Any) -> None:
        self.rank = rank
        self.process = process
        self.commands = commands
        self.events = events
        self.info: dict = {}
        self.stats: Optional[SchedulerStats] = None
        self.load = 0          # unfinished sequences sent here (n > 1 counts n)
        # Request ids aborted here whose abort the replica has not confirmed yet: its outputs for
        # them until then were made before the abort (a request reusing the id is not theirs).
        self.aborting: collections.Counter[str] = collections.Counter()
        self.prefixes = _RoutedPrefixes(1)
        self.send_lock = threading.Lock()

    def send(self, msg: tuple) -> None:
        with self.send_lock:
            try:
                self.commands.send(msg)
            except (BrokenPipeError, OSError) as e:
                raise ReplicaError(f"data-parallel replica {self.rank} is gone "
                                   f"(exit code {self.process.exitcode})") from e

    def recv(self) -> tuple:
        try:
            return self.events.recv()
        except (EOFError, OSError) as e:
            self.process.join(5)
            raise ReplicaError(f"data-parallel replica {self.rank} exited (exit code "
                               f"{self.process.exitcode})") from e


class DataParallelEngine(RequestFront):
    def __init__(self, args: EngineArgs, loaded: Any = None) -> None:
        from jaxvllm.engine.dp_replica import probe_devices, replica_main
        from jaxvllm.engine.setup import configure_jax, resolve_batch_limits
        configure_jax(args)  # the XLA flags and caches the replica processes inherit
        platform, count, device_bytes = probe_devices()
        resolve_batch_limits(args, device_bytes)  # before the replicas get a copy
        groups = replica_device_groups(args.data_parallel_size, args.tensor_parallel_size, count)
        self.args = args
        if loaded is not None:  # in-memory params go to each replica on the host
            import jax
            import numpy as np
            loaded = dataclasses.replace(loaded, params=jax.tree.map(np.asarray, loaded.params))
        ctx = multiprocessing.get_context("spawn")  # a forked JAX runtime is not safe
        self.replicas: list[_Replica] = []
        try:
            for rank, ids in enumerate(groups):
                cmd_recv, cmd_send = ctx.Pipe(duplex=False)
                ev_recv, ev_send = ctx.Pipe(duplex=False)
                # Daemonic: ended with this process even when it exits without shutdown().
                proc = ctx.Process(target=replica_main, name=f"jaxvllm-dp{rank}", daemon=True,
                                   args=(rank, args, ids, platform, cmd_recv, ev_send, loaded))
                proc.start()
                cmd_recv.close()
                ev_send.close()
                self.replicas.append(_Replica(rank, proc, cmd_send, ev_recv))
            for r in self.replicas:  # they load and compile at the same time
                kind, payload, *error_type = r.recv()
                if kind != "ready":
                    msg = (f"data-parallel replica {r.rank} (devices {groups[r.rank]}) failed to "
                           f"start: {payload}")
                    # A bad setting stays the ValueError/TypeError LLMEngine raises for it.
                    raise {"ValueError": ValueError, "TypeError": TypeError}.get(
                        error_type[0] if error_type else "", ReplicaError)(msg)
                r.info, r.stats = payload, payload["stats"]
                r.prefixes = _RoutedPrefixes(payload["startup"]["num_blocks"])
        except BaseException:
            _stop_replicas(self.replicas, wait=0.0)  # the others may still be loading: no waiting
            raise
        # At garbage collection or interpreter exit, whichever comes first (holds no reference to
        # self, so an engine dropped by its user is collected and its processes end).
        self._finalizer = weakref.finalize(self, _stop_replicas, self.replicas)
        first = self.replicas[0].info
        self.model_config = first["model_config"]
        self.max_model_len = first["max_model_len"]
        self.tokenizer = first["tokenizer"]
        self.tokenizer_origin = first["tokenizer_origin"]
        self.default_sampling = first["default_sampling"]
        self._lora_paths: dict[int, str] = {}  # adapters checked here: lora_int_id -> path
        self.preparer = RequestPreparer(self.tokenizer, self.model_config.vocab_size,
                                        self.max_model_len, args.max_logprobs,
                                        getattr(self.tokenizer, "eos_token_id", None),
                                        _generation_eos_ids(first["generation_config"]),
                                        self._check_lora if args.enable_lora else None)
        startups = [r.info["startup"] for r in self.replicas]
        self.load_seconds = max(s["load_s"] for s in startups)
        self.compile_seconds = sum(s["compile_s"] for s in startups)
        self.router = Router(RouterConfig(
            block_size=args.block_size,
            overload_margin=max(1, int(args.max_num_seqs * OVERLOAD_FRACTION))))
        self._owner: dict[str, _Owned] = {}  # unfinished requests by id
        self._arrived: list[RequestOutput] = []       # outputs read while waiting for a reply
        self._asleep = False                          # as every replica is (they change together)
        self._updating = False                        # between start_ and finish_weight_update

    def _check_lora(self, lora: LoRARequest) -> None:
        """A bad adapter fails its request here, before routing; each replica reads it again
        when it first runs a request of it (LLMEngine.admit_request)."""
        from jaxvllm.lora.peft import read_adapter
        read_adapter(lora, self.model_config, self.args.max_lora_rank,
                     self._lora_paths.get(lora.lora_int_id))
        self._lora_paths[lora.lora_int_id] = lora.lora_path

    def startup_info(self) -> dict:
        """All replicas together: blocks, KV sizing and compile summed; loading (in parallel) the
        slowest replica's."""
        per = [r.info["startup"] for r in self.replicas]
        return {"num_blocks": sum(s["num_blocks"] for s in per),
                "kv_sizing_s": sum(s["kv_sizing_s"] for s in per),
                "load_s": self.load_seconds, "compile_s": self.compile_seconds,
                "seconds": max((s["seconds"] for s in per), key=lambda d: sum(d.values())),
                "from_cache": per[0]["from_cache"], "param_bytes": per[0]["param_bytes"],
                "device": f"{per[0]['device']} x{len(per)} replicas", "replicas": per}

    def shutdown(self) -> None:
        """Stops the replica processes (also done at garbage collection and interpreter exit)."""
        self._finalizer()

    # ---- requests (prepared here: the internal ids stay unique whichever replica runs them) ---
    def _is_running(self, request_id: str) -> bool:
        return request_id in self._owner

    def admit_request(self, parent: _Parent) -> None:
        check_can_generate(self._asleep, self._updating)
        if parent.request_id in self._owner:  # prepared twice before either was admitted
            raise ValueError(f"request_id {parent.request_id!r} is already running")
        lora = parent.lora_request
        hashes = self.router.block_hashes(parent.prompt_token_ids, lora_cache_salt(
            0 if lora is None else lora.lora_int_id))
        i = self.router.route(hashes, [ReplicaState(r.load, r.stats.kv_cache_usage, r.prefixes)
                                       for r in self.replicas])
        r = self.replicas[i]
        r.send(("add", parent))
        r.prefixes.add(hashes)
        r.load += parent.params.n
        self._owner[parent.request_id] = _Owned(i, parent.params.n, parent.prompt,
                                                parent.prompt_token_ids)

    def abort_request(self, request_id: str | list[str]) -> None:
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        by_replica: dict[int, list[str]] = {}
        for rid in ids:
            owner = self._owner.pop(rid, None)
            if owner is not None:
                self.replicas[owner.replica].load -= owner.sequences
                by_replica.setdefault(owner.replica, []).append(rid)
        for i, rids in by_replica.items():
            self.replicas[i].aborting.update(rids)
            self.replicas[i].send(("abort", rids))

    def retract_requests(self) -> list[RequestOutput]:
        """LLMEngine.retract_requests on every busy replica."""
        outs = [o for r in self.replicas if r.load > 0 for o in self._call(r, "retract_requests")]
        return self._account(outs)

    def reset_prefix_cache(self) -> None:
        for r in self.replicas:
            self._call(r, "reset_prefix_cache")

    def has_unfinished_requests(self) -> bool:
        return bool(self._owner)

    def get_num_unfinished_requests(self) -> int:
        return len(self._owner)

    # ---- the step ----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """The outputs the replicas have sent since the last call; waits for at least one replica
        when none has sent any. Raises ReplicaError when a replica failed or exited."""
        arrived, self._arrived = self._arrived, []
        if not arrived:
            busy = {r.events: r for r in self.replicas if r.load > 0}
            if busy:
                for conn in wait(list(busy)):
                    r = busy[conn]
                    while True:
                        arrived += self._event(r, r.recv())
                        if not conn.poll():
                            break
        return self._account(arrived)

    def _event(self, r: _Replica, msg: tuple) -> list[RequestOutput]:
        kind = msg[0]
        if kind == "outputs":
            r.stats = msg[2]
            kept = []
            for o in msg[1]:
                owner = self._owner.get(o.request_id)
                if owner is None or owner.replica != r.rank or o.request_id in r.aborting:
                    continue
                o.prompt, o.prompt_token_ids = owner.prompt, owner.prompt_token_ids  # not sent
                kept.append(o)
            return kept
        if kind == "aborted":
            r.aborting.subtract(msg[1])
            r.aborting += collections.Counter()  # drops the ids at zero
            return []
        if kind == "dead":
            raise ReplicaError(f"data-parallel replica {r.rank} failed a step: {msg[1]}")
        raise ReplicaError(f"data-parallel replica {r.rank} sent {kind!r} out of turn")

    def _account(self, outputs: list[RequestOutput]) -> list[RequestOutput]:
        kept = []
        for out in outputs:
            owner = self._owner.get(out.request_id)
            if owner is None:  # finished by an earlier output of this batch
                continue
            if out.finished:
                del self._owner[out.request_id]
                self.replicas[owner.replica].load -= owner.sequences
            kept.append(out)
        return kept

    def _call(self, r: _Replica, name: str, *call_args: Any) -> Any:
        """Runs `name` (dp_replica._run_call) in replica `r` between its steps; outputs that arrive
        first are kept for the next step()."""
        r.send(("call", name, call_args))
        while True:
            msg = r.recv()
            if msg[0] == "reply":
                return msg[1]
            if msg[0] == "error":
                raise ReplicaError(f"data-parallel replica {r.rank}: {msg[1]}")
            self._arrived += self._event(r, msg)

    def describe_replicas(self) -> list[dict]:
        """Each replica's device placement and scheduler state (dp_replica._describe)."""
        return [self._call(r, "describe") for r in self.replicas]

    # ---- stats and weights -------------------------------------------------------------------
    def replica_stats(self) -> list[SchedulerStats]:
        """As of each replica's last step (sent with its outputs)."""
        return [r.stats for r in self.replicas]

    def get_stats(self) -> SchedulerStats:
        """All replicas together (KV-cache usage over all their blocks)."""
        per = self.replica_stats()
        total = lambda name: sum(getattr(s, name) for s in per)
        used, free = total("num_used_blocks"), total("num_free_blocks")
        return SchedulerStats(
            num_running=total("num_running"), num_waiting=total("num_waiting"),
            kv_cache_usage=used / max(1, used + free), num_used_blocks=used, num_free_blocks=free,
            prefix_cache_queries=total("prefix_cache_queries"),
            prefix_cache_hits=total("prefix_cache_hits"), num_preemptions=total("num_preemptions"),
            spec_decode=SpecDecodeStats(*(sum(getattr(s.spec_decode, f.name) for s in per)
                                          for f in dataclasses.fields(SpecDecodeStats))))

    def update_weights(self, params: Any, reset_prefix_cache: bool = True) -> None:
        """LLMEngine.update_weights on every replica (each gets a host copy of `params`; during a
        chunked update, of the chunk)."""
        import jax
        import numpy as np
        check_idle("update_weights", self.has_unfinished_requests())
        if self._updating:
            check_chunk(params)
        host = jax.tree.map(np.asarray, params)
        for r in self.replicas:
            self._call(r, "update_weights", host, reset_prefix_cache)

    def start_weight_update(self) -> None:
        check_idle("start_weight_update", self.has_unfinished_requests())
        if self._updating:
            raise RuntimeError("a weight update is already in progress (finish_weight_update())")
        self._updating = True  # set first: a replica failing part way still holds requests off
        for r in self.replicas:
            self._call(r, "start_weight_update")

    def finish_weight_update(self, reset_prefix_cache: bool = True) -> None:
        if not self._updating:
            raise RuntimeError("finish_weight_update without start_weight_update")
        for r in self.replicas:
            self._call(r, "finish_weight_update", reset_prefix_cache)
        self._updating = False

    def sleep(self, level: int = 1) -> None:
        check_sleep_level(level)
        check_idle("sleep", self.has_unfinished_requests())
        self._asleep = True  # set first: a replica failing part way still holds requests off
        for r in self.replicas:
            self._call(r, "sleep", level)

    def wake_up(self, tags: Optional[Sequence[str]] = None) -> None:
        tags = wake_tags(tags)
        for r in self.replicas:
            self._call(r, "wake_up", tags)
        self._asleep = self._call(self.replicas[0], "is_sleeping")

    def is_sleeping(self) -> bool:
        return self._asleep


Engine = Union[LLMEngine, DataParallelEngine]


def _stop_replicas(replicas: list[_Replica], wait: float = SHUTDOWN_WAIT_S) -> None:
    for r in replicas:
        if r.process.is_alive():
            try:
                r.send(("shutdown",))
            except ReplicaError:
                pass
    for r in replicas:
        r.process.join(wait)
        if r.process.is_alive():
            r.process.kill()
            r.process.join()
