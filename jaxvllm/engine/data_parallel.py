"""Data parallelism: `data_parallel_size` full engines (scheduler, runner, KV cache), replica i on
devices [i * tp, (i + 1) * tp), behind the interface `LLM` and `AsyncLLMEngine` use from LLMEngine.

The weights are loaded once, into host memory, and each replica's copy goes to its own devices.
A new request goes to the replica `core/router.py` picks (load, with prefix-cache affinity); its
n > 1 samples stay together (they share the prompt's blocks). `step()` steps every replica that has
work in turn: with async scheduling each replica dispatches its next step before it waits for the
previous one, so while one replica waits for its device the others' devices are still busy.
With `data_parallel_size == 1`, `create_engine` returns a plain LLMEngine: no wrapper on that path.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Optional, Sequence, Union

from jaxvllm.config import EngineArgs
from jaxvllm.core.router import ReplicaState, Router, RouterConfig
from jaxvllm.core.scheduler import SchedulerStats
from jaxvllm.engine.llm_engine import LLMEngine, PromptType, _Parent
from jaxvllm.outputs import RequestOutput
from jaxvllm.sampling_params import SamplingParams

# A replica holding a request's prefix is passed over when it has more than this fraction of
# max_num_seqs unfinished sequences above the least-loaded replica (32 at the default 256).
OVERLOAD_FRACTION = 1 / 8


def create_engine(args: EngineArgs, loaded: Any = None) -> Union[LLMEngine, "DataParallelEngine"]:
    """The engine for `args`: one LLMEngine, or a DataParallelEngine over data_parallel_size."""
    if args.data_parallel_size == 1:
        return LLMEngine(args, loaded)
    return DataParallelEngine(args, loaded)


def replica_device_groups(dp: int, tp: int, devices: Sequence[Any]) -> list[list[Any]]:
    """Each replica's `tp` devices, in device order; ValueError when there are too few."""
    if dp * tp > len(devices):
        raise ValueError(f"data_parallel_size ({dp}) x tensor_parallel_size ({tp}) = {dp * tp} "
                         f"exceeds the number of available devices ({len(devices)})")
    return [list(devices[i * tp:(i + 1) * tp]) for i in range(dp)]


class DataParallelEngine:
    def __init__(self, args: EngineArgs, loaded: Any = None) -> None:
        import jax
        from jaxvllm.engine.setup import configure_jax, load, start_tokenizer_load
        configure_jax(args)  # XLA flags must be set before the device query starts the backend
        groups = replica_device_groups(args.data_parallel_size, args.tensor_parallel_size,
                                       jax.devices())
        self.args = args
        t0 = time.perf_counter()
        child = start_tokenizer_load(args) if loaded is None else None
        try:
            if loaded is None:
                loaded = load(args)
            self.load_seconds = time.perf_counter() - t0
            # Each replica places its own copy of the host params (setup.build_runner).
            self.replicas = [LLMEngine(args, dataclasses.replace(loaded), devices=g) for g in groups]
            if child is not None:  # loaded in a child process while the replicas compiled
                tokenizer = child.result()
                for r in self.replicas:
                    r.attach_tokenizer(tokenizer)
                    r.tokenizer_origin = child.origin
        except BaseException:
            if child is not None:
                child.cancel()
            raise
        first = self.replicas[0]
        self.loaded = first.loaded
        self.model_config = first.model_config
        self.max_model_len = first.max_model_len
        self.tokenizer = first.tokenizer
        self.tokenizer_origin = first.tokenizer_origin
        self.default_sampling = first.default_sampling
        self.compile_seconds = sum(r.compile_seconds for r in self.replicas)
        self.router = Router(RouterConfig(
            block_size=args.block_size,
            overload_margin=max(1, int(args.max_num_seqs * OVERLOAD_FRACTION))))
        self._owner: dict[str, int] = {}  # unfinished request id -> its replica

    # ---- requests ----------------------------------------------------------------------------
    def tokenize(self, prompt: PromptType) -> tuple[Optional[str], list[int]]:
        return self.replicas[0].tokenize(prompt)

    def encode(self, text: str, add_special_tokens: bool = True, name: str = "prompt") -> list[int]:
        return self.replicas[0].encode(text, add_special_tokens, name)

    def add_request(self, request_id: str, prompt: PromptType, params: Optional[SamplingParams] = None,
                    arrival_time: Optional[float] = None) -> None:
        self.admit_request(self.prepare_request(request_id, prompt, params, arrival_time))

    def prepare_request(self, request_id: str, prompt: PromptType,
                        params: Optional[SamplingParams] = None,
                        arrival_time: Optional[float] = None, final_only: bool = False) -> _Parent:
        """LLMEngine.prepare_request. Replica 0 prepares every request, so the internal ids it
        numbers stay unique whichever replica runs them."""
        if request_id in self._owner:
            raise ValueError(f"request_id {request_id!r} is already running")
        return self.replicas[0].prepare_request(request_id, prompt, params, arrival_time, final_only)

    def admit_request(self, parent: _Parent) -> None:
        if parent.request_id in self._owner:  # prepared twice before either was admitted
            raise ValueError(f"request_id {parent.request_id!r} is already running")
        i = self.router.route(parent.prompt_token_ids, [_state(r) for r in self.replicas])
        self.replicas[i].admit_request(parent)
        self._owner[parent.request_id] = i

    def abort_request(self, request_id: str | list[str]) -> None:
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        for rid in ids:
            i = self._owner.pop(rid, None)
            if i is not None:
                self.replicas[i].abort_request(rid)

    def has_unfinished_requests(self) -> bool:
        return bool(self._owner)

    def get_num_unfinished_requests(self) -> int:
        return len(self._owner)

    # ---- the step ----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One step of every replica with work (see the module docstring for the overlap)."""
        outputs: list[RequestOutput] = []
        for r in self.replicas:
            if r.has_unfinished_requests():
                outputs += r.step()
        for out in outputs:
            if out.finished:
                self._owner.pop(out.request_id, None)
        return outputs

    # ---- stats and weights -------------------------------------------------------------------
    def replica_stats(self) -> list[SchedulerStats]:
        return [r.get_stats() for r in self.replicas]

    def get_stats(self) -> SchedulerStats:
        """All replicas together (KV-cache usage over all their blocks)."""
        per = self.replica_stats()
        total = lambda name: sum(getattr(s, name) for s in per)
        used, free = total("num_used_blocks"), total("num_free_blocks")
        return SchedulerStats(
            num_running=total("num_running"), num_waiting=total("num_waiting"),
            kv_cache_usage=used / max(1, used + free), num_used_blocks=used, num_free_blocks=free,
            prefix_cache_queries=total("prefix_cache_queries"),
            prefix_cache_hits=total("prefix_cache_hits"), num_preemptions=total("num_preemptions"))

    def update_weights(self, params: Any, reset_prefix_cache: bool = True) -> None:
        """LLMEngine.update_weights on every replica (each copies `params` to its devices)."""
        for r in self.replicas:
            r.update_weights(params, reset_prefix_cache)


Engine = Union[LLMEngine, DataParallelEngine]


def _state(replica: LLMEngine) -> ReplicaState:
    sched = replica.scheduler
    kv = sched.kv_cache_manager
    return ReplicaState(num_unfinished=sched.get_num_unfinished_requests(),
                        kv_cache_usage=kv.usage,
                        cached_blocks=kv.block_pool.cached_block_hash_to_block)
