"""Tensor parallelism over the devices of one host: the mesh, the partition rules, and the per-device
attention wrapper.

`shard_model(params, cfg, tp)` places the params pytree (layout: `jaxvllm/models/params.py`) on a
1-D `jax.sharding.Mesh` of `tp` devices with `NamedSharding`s, Megatron style:

- q/k/v (and their biases), gate and up are column-parallel (split over their output: whole attention
  heads, slices of the MLP's intermediate dimension); o and down are row-parallel (split over their
  input). Each attention block and each MLP then ends in one partial sum, which XLA's SPMD partitioner
  turns into one all-reduce; nothing else in a layer communicates.
- The embedding and the LM head are split over the vocabulary (the embedding lookup is a masked local
  gather plus an all-reduce; the logits are gathered to every device for the sampler by the step's
  `out_shardings`). A vocabulary that does not divide by `tp` keeps them replicated.
- Norm weights are replicated.
- int4 and int8 weights (AWQ, GPTQ, compressed-tensors, GGUF; models/int4.py, models/int8.py) split
  as their float weights would, with their per-group scales, zero points and mins split over the
  outputs (column-parallel) or the groups of inputs (row-parallel; the groups must divide by `tp`)
  and an activation order's input order whole. Their q/k/v and gate/up stay unfused (a fused
  output would not split by heads). Decode-sized batches run their Pallas GEMMs per device under
  `shard_map` (a Pallas call is not partitioned by GSPMD: its operands would be gathered whole),
  for which the runner traces its steps inside the mesh (`TPShardings.in_mesh`;
  models/grouped.py); larger ones XLA's dequantize-then-multiply, which the partitioner splits.
  FP8's one-row Pallas GEMM runs per device alike.
- The KV cache `[num_blocks, block_size, kv_heads, head_dim]` is split over KV heads, and the
  attention function runs per device under `shard_map`: each device sees only its query heads and
  their KV heads, so the Pallas kernel (GPU) or the jnp reference (CPU) runs unchanged.

KV heads fewer than `tp` (`tp % num_kv_heads == 0`) are replicated as vLLM does: the k/v weight columns
(and biases) are repeated so that every device holds one copy of the KV head its query heads use, and
the effective config (`TPShardings.model_config`) has `num_kv_heads == tp`; the runner and the KV cache
use that config. Any other head count that does not divide raises `ValueError` at start-up.

The model code (`jaxvllm/models/llama.py`) carries no device logic: the jitted step propagates these
shardings from the params, and `TPShardings.step_jit_kwargs()` pins the KV cache's sharding (so the
donated buffers are updated in place) and makes the logits replicated.

Devices: the mesh takes the first `tp` devices of `jax.devices()`. With several processes
(`nnodes > 1`: `jaxvllm/engine/distributed.py` initialized jax.distributed, so `jax.devices()` lists
every process's devices, in the same order everywhere) it takes the first `tp / processes` devices of
each process instead, so every process holds an equal share of the mesh and runs the same programs;
the same partition rules apply. Shards of a mesh that spans processes are placed from each process's
own copy of the host params (`jax.make_array_from_callback`): no process sends weights to another.

Loading: the params arrive unsharded (on the default device or the host) and are moved shard by shard,
so the whole model must fit on one device (or in host memory) while it loads.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxvllm.models.config import ModelConfig
from jaxvllm.models.grouped import ROW_PARALLEL, TP_AXIS
from jaxvllm.models.int4 import INT4
from jaxvllm.models.int8 import INT8
from jaxvllm.models.params import KV_CACHE_SCALES
from jaxvllm.models.quant import EXPERTS, FP8

logger = logging.getLogger(__name__)

AXIS = TP_AXIS
# The tensors beside an int4 or int8 weight `<name>` that hold one value per group and output.
_GROUPED = ("scale", "zero", "min")

# Column-parallel projections (split over their outputs: heads, the MLP's intermediate dimension);
# the row-parallel ones (split over their inputs) are ROW_PARALLEL, which the quantized GEMMs share.
_COLUMN_PARALLEL = ("q", "k", "v", "gate", "up", "shared_gate", "shared_up")

# Partition rules: per-layer param name -> PartitionSpec (params are stored [in, out]; an FP8 weight
# [out, in] takes its rule reversed).
LAYER_RULES: dict[str, P] = {
    **{n: P(None, AXIS) for n in _COLUMN_PARALLEL}, **{n: P(AXIS, None) for n in ROW_PARALLEL},
    "q_bias": P(AXIS), "k_bias": P(AXIS), "v_bias": P(AXIS),
    # Mixture of experts: each expert's intermediate dimension split, as a dense MLP's.
    "router": P(), "shared_router": P(),
    "experts_gate": P(None, None, AXIS), "experts_up": P(None, None, AXIS),
    "experts_down": P(None, AXIS, None),
    "experts_gate_scale": P(None, AXIS), "experts_up_scale": P(None, AXIS), "experts_down_scale": P(),
    # FP8 weights' per-output-channel scales (models/quant.py): split as their weight's output.
    **{f"{n}_scale": P(AXIS) for n in _COLUMN_PARALLEL},
    **{f"{n}_scale": P() for n in ROW_PARALLEL},
    "input_norm": P(), "post_attn_norm": P(), "q_norm": P(), "k_norm": P(),
    "pre_ffn_norm": P(), "post_ffn_norm": P(),
    # LoRA slots (worker/lora_slots.py), A [in, S*R] and B [S*R, out]: a column-parallel
    # projection's B split as its weight's output (A whole on every device), a row-parallel one's
    # A split as its weight's input, whose partial (x @ A) the SPMD partitioner sums (B whole).
    **{f"{n}_lora_a": P() for n in ("q", "k", "v", "gate", "up")},
    **{f"{n}_lora_b": P(None, AXIS) for n in ("q", "k", "v", "gate", "up")},
    "o_lora_a": P(AXIS, None), "down_lora_a": P(AXIS, None), "o_lora_b": P(), "down_lora_b": P(),
}
VOCAB_RULES: dict[str, P] = {"embed": P(AXIS, None), "lm_head": P(None, AXIS)}

# Activations seen by the attention function (per layer): q [T, Hq, D], cache [NB, BS, Hkv, D].
HEADS_SPEC = P(None, AXIS, None)
KV_CACHE_SPEC = P(None, None, AXIS, None)


def validate(cfg: ModelConfig, tp: int, num_devices: Optional[int] = None) -> int:
    """Checks that `cfg` can be split over `tp` devices; returns the KV-head replication factor
    (1 unless num_kv_heads < tp). Raises ValueError naming the numbers."""
    if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
        raise ValueError(f"tensor_parallel_size must be a positive integer, got {tp!r}")
    if num_devices is not None and tp > num_devices:
        raise ValueError(f"tensor_parallel_size ({tp}) exceeds the number of available devices "
                         f"({num_devices})")
    if cfg.num_heads % tp:
        raise ValueError(f"num_attention_heads ({cfg.num_heads}) must be divisible by "
                         f"tensor_parallel_size ({tp})")
    kv = cfg.num_kv_heads
    if kv % tp and tp % kv:
        raise ValueError(f"num_key_value_heads ({kv}) must be divisible by tensor_parallel_size "
                         f"({tp}), or tensor_parallel_size a multiple of num_key_value_heads (KV "
                         f"heads are then replicated)")
    sizes = [("moe_intermediate_size", cfg.moe_intermediate_size),
             ("shared_expert_intermediate_size", cfg.shared_expert_intermediate_size)]
    if not cfg.num_experts or cfg.dense_layers:
        sizes.append(("intermediate_size", cfg.intermediate_size))
    for name, size in sizes:
        if size % tp:
            raise ValueError(f"{name} ({size}) must be divisible by tensor_parallel_size ({tp})")
    return 1 if kv % tp == 0 else tp // kv


def make_mesh(tp: int, devices: Optional[Sequence[Any]] = None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    if tp > len(devices):
        raise ValueError(f"tensor_parallel_size ({tp}) exceeds the number of available devices "
                         f"({len(devices)})")
    return Mesh(np.array(_mesh_devices(tp, devices)), (AXIS,))


def _mesh_devices(tp: int, devices: list[Any]) -> list[Any]:
    """The first `tp` devices; over several processes the first `tp / processes` of each (in
    process order), since a process holding none of the mesh would have nothing to run."""
    procs = sorted({d.process_index for d in devices})
    if len(procs) == 1:
        return devices[:tp]
    if tp % len(procs):
        raise ValueError(f"tensor_parallel_size ({tp}) must be a multiple of the number of processes "
                         f"({len(procs)}): each process holds an equal share of the devices")
    per = tp // len(procs)
    chosen = []
    for p in procs:
        mine = [d for d in devices if d.process_index == p]
        if len(mine) < per:
            raise ValueError(f"tensor_parallel_size ({tp}) needs {per} devices on each of "
                             f"{len(procs)} processes; process {p} has {len(mine)}")
        chosen += mine[:per]
    return chosen


def _shard_map(f: Callable, mesh: Mesh, in_specs: Any, out_specs: Any) -> Callable:
    """`jax.shard_map` with its replication checks off."""
    return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)


@dataclass(frozen=True)
class TPShardings:
    """Everything the runner needs to run a model sharded by `shard_model`."""
    mesh: Mesh
    tp: int
    model_config: ModelConfig     # the effective config (num_kv_heads replicated up to tp if fewer)
    params: Any                   # pytree of NamedSharding, same structure as the sharded params
    kv_cache: NamedSharding       # each [num_blocks, block_size, kv_heads, head_dim] cache array
    replicated: NamedSharding
    kv_replication: int = 1       # > 1: each original KV head is held by this many devices

    @property
    def kv_split(self) -> int:
        """Per-device share of the KV cache bytes (of the effective config's cache)."""
        return self.tp

    def attention_fn(self, base_fn: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
        """Wraps a ragged paged attention function (pallas_kernels signature) to run per device:
        q split over query heads, the caches over KV heads, the batch metadata replicated."""
        mesh, rep = self.mesh, P()

        def sharded_attention(q, k_cache, v_cache, kv_lens, block_tables, query_start_loc,
                              num_seqs, **kwargs):
            def local(q, k, v, kv_lens, block_tables, query_start_loc, num_seqs):
                return base_fn(q, k, v, kv_lens, block_tables, query_start_loc, num_seqs, **kwargs)

            f = _shard_map(local, mesh,
                           in_specs=(HEADS_SPEC, KV_CACHE_SPEC, KV_CACHE_SPEC, rep, rep, rep, rep),
                           out_specs=HEADS_SPEC)
            return f(q, k_cache, v_cache, kv_lens, block_tables, query_start_loc, num_seqs)

        return sharded_attention

    def experts_fn(self, base_fn: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
        """Wraps a mixture-of-experts ExpertsFn (models/moe.py) to run per device on every
        expert's slice of the intermediate dimension, the routed rows whole; the partial outputs
        are summed (the all-reduce of a dense MLP's down projection)."""
        mesh, rep = self.mesh, P()

        def local(rows, group_sizes, w_gate, w_up, w_down, quant, order):
            return jax.lax.psum(base_fn(rows, group_sizes, w_gate, w_up, w_down, quant, order),
                                AXIS)

        def sharded(rows, group_sizes, w_gate, w_up, w_down, quant=None, order=None):
            weights = (w_gate, w_up, w_down)
            specs = tuple(_stored_rule(n, w.dtype) for n, w in zip(EXPERTS, weights))
            # FP8's scales [E, out] by their own rules, int4's scales and offsets [E, groups, out]
            # as the [E, in, out] weight
            quant_specs = None if quant is None else tuple(
                (LAYER_RULES[n + "_scale"],) if w.dtype == FP8 else (LAYER_RULES[n],) * len(q)
                for n, w, q in zip(EXPERTS, weights, quant))
            # an input order (activation order) whole: the rows are whole on every device
            return _shard_map(local, mesh, in_specs=(rep, rep, *specs, quant_specs,
                                                     None if order is None else rep),
                              out_specs=rep)(rows, group_sizes, *weights, quant, order)

        return sharded

    def in_mesh(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """`fn` traced with the mesh as JAX's abstract mesh: where a quantized linear finds the
        devices its Pallas GEMM runs over (models/grouped.py)."""
        @functools.wraps(fn)
        def traced(*args: Any, **kwargs: Any) -> Any:
            with jax.sharding.use_abstract_mesh(self.mesh.abstract_mesh):
                return fn(*args, **kwargs)
        return traced

    def step_jit_kwargs(self) -> dict[str, Any]:
        """`jax.jit` arguments for the runner's step `(params, kv_cache, packed host inputs,
        previous samples) -> (kv_cache, logits, all_hidden)`: the cache stays split over KV heads (so the donated buffers
        are updated in place) and the logits (and hidden states) come back replicated. Inputs take their
        arrays' shardings (params and cache are committed; the host batch arrives replicated)."""
        return dict(out_shardings=(self.kv_cache, self.replicated, self.replicated))

    def match_layout(self, params: Any) -> Any:
        """An unsharded params pytree of the original config (e.g. a weight swap) in the sharded
        model's layout (KV heads replicated as `shard_model` did). Placement is left to the caller,
        so a swap can place one leaf at a time."""
        if self.kv_replication > 1:
            params = _replicate_kv(params, self.model_config.head_dim, self.kv_replication)
        return params

    def lora_sharding(self, key: str) -> NamedSharding:
        """Where a LoRA slot array (e.g. "k_lora_b") lives on the mesh."""
        return NamedSharding(self.mesh, LAYER_RULES[key])

    def match_named(self, name: str, w: Any) -> Any:
        """One weight of a chunked update (weight_swap.get_named's name, e.g. "layers.3.k") in the
        sharded model's layout, as match_layout does the whole tree."""
        if self.kv_replication > 1 and name.startswith("layers."):
            return _replicate_kv_param(name.rsplit(".", 1)[-1], w, self.model_config.head_dim,
                                       self.kv_replication)
        return w


def param_specs(params: Any, cfg: ModelConfig, tp: int) -> Any:
    """The PartitionSpec pytree for `params` (vocab-split only where the vocabulary divides by tp)."""
    vocab_ok = cfg.vocab_size % tp == 0
    if not vocab_ok:
        logger.warning("vocab_size (%d) is not divisible by tensor_parallel_size (%d): the "
                       "embedding and LM head stay replicated", cfg.vocab_size, tp)
    specs: dict[str, Any] = {}
    for name in params:
        if name == "layers":
            specs[name] = [{k: _layer_spec(k, lp, tp) for k in lp} for lp in params[name]]
        elif name in VOCAB_RULES:
            specs[name] = VOCAB_RULES[name] if vocab_ok else P()
        else:
            specs[name] = P()
    return specs


def _layer_spec(name: str, lp: dict[str, Any], tp: int) -> P:
    if name in KV_CACHE_SCALES:  # an FP8 cache's scales: a number, or one per KV head (split so)
        return P(AXIS) if lp[name].ndim else P()
    weight, _, part = name.rpartition("_")
    grouped = weight in LAYER_RULES and weight in lp and lp[weight].dtype in (INT4, INT8)
    if grouped and part in _GROUPED:
        # An int4 or int8 weight's scales, zero points or mins, [groups, out] ([experts, groups,
        # out]): split as an [in, out] weight of its name would be; a row-parallel one's groups of
        # inputs over the devices.
        rule = LAYER_RULES[weight]
        if rule[-2] == AXIS and lp[name].shape[-2] % tp:
            raise ValueError(f"layer param {weight!r}: its {lp[name].shape[-2]} groups of inputs "
                             f"do not split over tensor_parallel_size ({tp})")
        return rule
    if grouped and part == "perm":
        return P()  # an input order, applied before the weight's own split
    if name not in LAYER_RULES:
        raise ValueError(f"No tensor-parallel partition rule for layer param {name!r}")
    return _stored_rule(name, lp[name].dtype)


def _stored_rule(name: str, dtype: Any) -> P:
    """The partition rule of layer weight `name` as stored in `dtype`: FP8 (models/quant.py), int4
    and int8 weights (models/int4.py, models/int8.py) are stored [out, in] (int4 two inputs a
    byte; int4 experts [experts, out, in/2]): their [in, out] rule with its last two axes swapped.
    FP8 experts keep the model's [experts, in, out]."""
    rule = LAYER_RULES[name]
    if dtype in (INT4, INT8) or (dtype == FP8 and name not in EXPERTS):
        return P(*rule[:-2], rule[-1], rule[-2])
    return rule


def _repeat_heads(w: Any, head_dim: int, rep: int) -> Any:
    """[..., kv*head_dim] -> [..., kv*rep*head_dim], each head repeated rep times in place."""
    xp = np if isinstance(w, np.ndarray) else jnp
    lead = w.shape[:-1]
    kv = w.shape[-1] // head_dim
    w = xp.reshape(w, (*lead, kv, 1, head_dim))
    w = xp.broadcast_to(w, (*lead, kv, rep, head_dim))
    return xp.reshape(w, (*lead, kv * rep * head_dim))


def _replicate_kv(params: Any, head_dim: int, rep: int) -> Any:
    out = dict(params)
    out["layers"] = [{k: _replicate_kv_param(k, w, head_dim, rep) for k, w in lp.items()}
                     for lp in params["layers"]]
    return out


def _replicate_kv_param(name: str, w: Any, head_dim: int, rep: int) -> Any:
    if name in KV_CACHE_SCALES:  # a number, or one per KV head
        return _repeat_heads(w, 1, rep) if w.ndim else w
    # A LoRA B's columns are its projection's outputs: the heads, as the weight's; so are an int4
    # or int8 weight's scales', zero points' and mins' ([groups, out]).
    if name not in ("k", "v", "k_bias", "v_bias", "k_scale", "v_scale", "k_lora_b", "v_lora_b",
                    "k_zero", "v_zero", "k_min", "v_min"):
        return w
    if name in ("k", "v") and w.dtype in (FP8, INT4, INT8):  # stored [out, in]: heads are rows
        return _repeat_heads(w.T, head_dim, rep).T
    return _repeat_heads(w, head_dim, rep)


def _place(x: Any, sharding: NamedSharding) -> jax.Array:
    if sharding.is_fully_addressable:
        return jax.device_put(x, sharding)
    # A mesh over several processes: each places its own shards from its own host copy (device_put
    # would first compare the whole array across processes, a cross-host transfer per weight).
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def shard_model(params: Any, cfg: ModelConfig, tp: int,
                devices: Optional[Sequence[Any]] = None) -> tuple[Any, TPShardings]:
    """Validates, builds the mesh and places `params` on it; returns (sharded params, TPShardings).

    Raises ValueError (naming the numbers) when the heads, KV heads or intermediate size do not split
    over `tp`, or when fewer than `tp` devices exist."""
    devices = list(jax.devices() if devices is None else devices)
    rep = validate(cfg, tp, len(devices))
    mesh = make_mesh(tp, devices)
    eff_cfg = cfg
    if rep > 1:
        logger.info("num_key_value_heads (%d) < tensor_parallel_size (%d): replicating each KV head "
                    "on %d devices", cfg.num_kv_heads, tp, rep)
        eff_cfg = dataclasses.replace(cfg, num_kv_heads=cfg.num_kv_heads * rep)
        params = _replicate_kv(params, cfg.head_dim, rep)
    specs = param_specs(params, eff_cfg, tp)
    to_sharding = lambda s: NamedSharding(mesh, s)
    shardings = jax.tree.map(to_sharding, specs, is_leaf=lambda s: isinstance(s, P))
    sharded = jax.tree.map(_place, params, shardings)
    tps = TPShardings(mesh=mesh, tp=tp, model_config=eff_cfg, params=shardings,
                      kv_cache=NamedSharding(mesh, KV_CACHE_SPEC), replicated=NamedSharding(mesh, P()),
                      kv_replication=rep)
    logger.info("Tensor parallel over %d devices: %s", tp, [str(d) for d in mesh.devices.flat])
    return sharded, tps
