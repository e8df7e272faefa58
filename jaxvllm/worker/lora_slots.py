"""LoRA adapters on the device: `max_loras` slots of rank `max_lora_rank`, and the batched update.

Each projection's slots are stacked along the rank: A [in, S*R] and B [S*R, out] (S slots of rank
R; an adapter of a smaller rank is zero-padded, which adds nothing). A step's update for every
token is then two GEMMs whatever mix of adapters it holds: h = x @ A, masked to the columns of
the token's own slot (a token without an adapter keeps none), then h @ B. The inner width S*R is
small next to the projections (4 x 16 = 64), so tokens of different adapters share one step without
gathering per-token weights.
"""
from __future__ import annotations

import collections
import functools
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from jaxvllm.lora.peft import TARGETS, Adapter
from jaxvllm.models.config import ModelConfig
from jaxvllm.models.params import layer_shapes

PROJECTIONS = tuple(TARGETS.values())


def token_mask(slots: jax.Array, max_loras: int, rank: int, dtype: Any) -> jax.Array:
    """[T, S*R]: 1 on the columns of each token's slot (slots[t] = -1: none)."""
    col_slot = jnp.arange(max_loras * rank, dtype=jnp.int32) // rank
    return (col_slot[None, :] == slots[:, None]).astype(dtype)


@functools.partial(jax.jit, static_argnames=("rank",))
def _write_slot(layer: dict, new: dict, slot: jax.Array, rank: int) -> dict:
    """`layer`'s A/B arrays with slot `slot`'s columns (A) and rows (B) replaced by `new`'s. Not
    in place: a step already dispatched may still read the old arrays."""
    out = dict(layer)
    for key, value in new.items():
        if key.endswith("_lora_a"):
            out[key] = jax.lax.dynamic_update_slice(layer[key], value, (0, slot * rank))
        else:
            out[key] = jax.lax.dynamic_update_slice(layer[key], value, (slot * rank, 0))
    return out


class LoRASlots:
    """The device slots and the adapters known to the engine (host copies, by lora_int_id), with
    least-recently-used replacement among the slots a step does not need."""

    def __init__(self, cfg: ModelConfig, max_loras: int, rank: int, dtype: Any,
                 device: Any = None, shardings: Any = None) -> None:
        """`cfg`: the runner's (effective) config; `shardings`: tensor parallelism's TPShardings,
        whose rules place each slot array beside its weight's shards (worker/sharding.py)."""
        self.max_loras, self.rank, self.dtype = max_loras, rank, dtype
        self.num_layers = cfg.num_layers
        self.shapes = [layer_shapes(cfg, i) for i in range(cfg.num_layers)]
        self.shardings = shardings
        width = max_loras * rank

        def zeros(key: str, shape: tuple[int, ...]) -> jax.Array:
            z = np.zeros(shape, jnp.dtype(dtype))
            if shardings is not None:
                return jax.device_put(z, shardings.lora_sharding(key))
            return jax.device_put(z, device) if device is not None else jnp.asarray(z)

        self.weights = [{k: zeros(k, (shapes[n][0], width) if k.endswith("_a") else
                                  (width, shapes[n][1]))
                         for n in PROJECTIONS if n in shapes
                         for k in (f"{n}_lora_a", f"{n}_lora_b")} for shapes in self.shapes]
        self.adapters: dict[int, tuple[str, Adapter]] = {}  # lora_int_id -> (path, weights)
        self.slot_of: collections.OrderedDict[int, int] = collections.OrderedDict()  # LRU first

    def add(self, lora_id: int, path: str, adapter: Adapter) -> None:
        """Registers an adapter of the model's shapes; under tensor parallelism with KV heads
        replicated, k/v's B get their heads repeated as the weights did."""
        if self.shardings is not None:
            adapter = {(i, n): (a, self.shardings.match_named(f"layers.{i}.{n}_lora_b", b))
                       for (i, n), (a, b) in adapter.items()}
        self.adapters[lora_id] = (path, adapter)

    def ensure(self, lora_ids: Iterable[int]) -> dict[int, int]:
        """Slots for `lora_ids` (at most max_loras: the scheduler sees to it), loading those not
        resident into free slots or the least recently used ones the step does not need."""
        wanted = list(dict.fromkeys(lora_ids))
        for lid in wanted:
            if lid in self.slot_of:
                self.slot_of.move_to_end(lid)
                continue
            used = set(self.slot_of.values())
            free = [s for s in range(self.max_loras) if s not in used]
            if free:
                slot = free[0]
            else:
                victim = next(v for v in self.slot_of if v not in wanted)
                slot = self.slot_of.pop(victim)
            self._load(slot, self.adapters[lid][1])
            self.slot_of[lid] = slot
        return {lid: self.slot_of[lid] for lid in wanted}

    def _load(self, slot: int, adapter: Adapter) -> None:
        r = self.rank
        for i, shapes in enumerate(self.shapes):
            new = {}
            for n in PROJECTIONS:
                if n not in shapes:
                    continue
                a = np.zeros((shapes[n][0], r), np.float32)
                b = np.zeros((r, shapes[n][1]), np.float32)
                if (i, n) in adapter:
                    ai, bi = adapter[(i, n)]
                    a[:, :ai.shape[1]], b[:bi.shape[0]] = ai, bi
                new[f"{n}_lora_a"], new[f"{n}_lora_b"] = (a.astype(jnp.dtype(self.dtype)),
                                                          b.astype(jnp.dtype(self.dtype)))
            self.weights[i] = _write_slot(self.weights[i], new, np.int32(slot), rank=r)

    def step_params(self, params: dict) -> dict:
        """`params` with each layer's slot arrays beside its weights (models/layers.linear adds
        the update where it finds them)."""
        return {**params, "layers": [{**lp, **lw} for lp, lw in zip(params["layers"],
                                                                     self.weights)]}

    def with_mask(self, params: dict, slots: jax.Array) -> dict:
        """Inside the step: every layer gets the tokens' slot mask."""
        mask = token_mask(slots, self.max_loras, self.rank, self.dtype)
        return {**params, "layers": [{**lp, "lora_mask": mask} for lp in params["layers"]]}
