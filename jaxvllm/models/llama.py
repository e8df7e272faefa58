"""The Llama family (Llama 2/3/3.1+, Mistral, Qwen2, Qwen3, SmolLM, Phi-3) and its mixture-of-experts
relatives (Mixtral, Qwen2-MoE, Qwen3-MoE) on the engine's ragged, paged batch.

Layers run unrolled (a Python loop over the per-layer params list): each layer's KV cache is its own
donated buffer, updated in place, and the attention kernel reads it without a copy. See
docs/architecture.md for the measurements behind unrolled vs `lax.scan`.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from jaxvllm.models.config import ModelConfig
from jaxvllm.models.grouped import tp_size
from jaxvllm.models.layers import (Output, SplitSums, add_norm, apply_rope, as_array, gated_mlp,
                                   linear, lm_head, projections, rms_norm, rope_cos_sin,
                                   split_sums)
from jaxvllm.models.moe import ExpertsFn, experts_swiglu, moe
from jaxvllm.models.params import KV_CACHE_SCALES
from pallas_kernels import decode_epilogue
from pallas_kernels.fp8_gemm import (ROW_BLOCK_N, fp8_row_add_norm, fp8_row_norm_partials,
                                     one_row_tiles)
from pallas_kernels.reference import FP8, GATED_ACTIVATIONS, split_total, to_fp8

Params = dict[str, Any]
KVCache = list[tuple[jax.Array, jax.Array]]  # per layer: K and V, [num_blocks, block_size, kv_heads, head_dim]
AttentionFn = Callable[..., jax.Array]


@jax.tree_util.register_dataclass
@dataclass
class ModelInputs:
    """One step's flat, padded, ragged batch (docs/architecture.md, One step). Shapes are bucketed: T tokens, R requests."""
    token_ids: jax.Array        # int32[T]
    positions: jax.Array        # int32[T]
    slot_mapping: jax.Array     # int32[T]  flat cache slot of each new token (padding: out of range)
    query_start_loc: jax.Array  # int32[R+1]
    seq_lens: jax.Array         # int32[R]  context length including the new tokens
    block_tables: jax.Array     # int32[R, max_blocks]
    num_seqs: jax.Array         # int32[1]


def write_kv(cache: jax.Array, new: jax.Array, slot_mapping: jax.Array) -> jax.Array:
    """Scatter new K or V rows [T, kv_heads, head_dim] into their cache slots (in place when donated);
    out-of-range slots (padding) are dropped."""
    nb, bs, h, d = cache.shape
    new = to_fp8(new) if cache.dtype == FP8 else new.astype(cache.dtype)
    flat = cache.reshape(nb * bs, h, d).at[slot_mapping].set(new, mode="drop", unique_indices=False)
    return flat.reshape(nb, bs, h, d)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, k_cache: Optional[jax.Array],
           v_cache: Optional[jax.Array], inp: ModelInputs, attention_fn: AttentionFn,
           lp: Optional[Params] = None,
           **kw: Any) -> tuple[jax.Array, Optional[jax.Array], Optional[jax.Array]]:
    """The engine's paged attention: the new K/V written into the cache, then `attention_fn`
    reads it. Without a cache (the dense, differentiable forward of models/flax_module.py):
    attention_fn(q, k, v, inp, **kw) over the new tokens alone. An FP8 cache with the layer's
    `k_cache_scale` / `v_cache_scale` (`lp`, from an FP8 checkpoint; a number, or one per KV head)
    holds K / k_scale and V / v_scale; the kernels read the stored values, so the query takes
    k_scale (q . k = (q * k_scale) . (k / k_scale)) and the output v_scale (it is linear in V),
    each query head its KV head's, as vLLM's descales do."""
    if k_cache is None:
        return attention_fn(q, k, v, inp, **kw), None, None
    scales = tuple(lp[k] for k in KV_CACHE_SCALES) if (
        k_cache.dtype == FP8 and lp is not None and KV_CACHE_SCALES[0] in lp) else None
    if scales is not None:
        k = k.astype(jnp.float32) / _per_head(scales[0], k.shape[1])
        v = v.astype(jnp.float32) / _per_head(scales[1], v.shape[1])
        q = (q.astype(jnp.float32) * _per_head(scales[0], q.shape[1])).astype(q.dtype)
    # Every new token's K/V is written before any attention reads: a request may attend to blocks
    # another request of the same step is filling (the scheduler's same-step prefix sharing relies on it).
    k_cache = write_kv(k_cache, k, inp.slot_mapping)
    v_cache = write_kv(v_cache, v, inp.slot_mapping)
    out = _paged_attention(q, k_cache, v_cache, inp, attention_fn, **kw)
    if scales is not None:
        out = (out.astype(jnp.float32) * _per_head(scales[1], out.shape[1])).astype(out.dtype)
    return out, k_cache, v_cache


def _paged_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, inp: ModelInputs,
                     attention_fn: AttentionFn, **kw: Any) -> jax.Array:
    return attention_fn(q, k_cache, v_cache, inp.seq_lens, inp.block_tables, inp.query_start_loc,
                        inp.num_seqs, **kw)


def _per_head(scale: jax.Array, heads: int) -> jax.Array:
    """A KV-cache scale broadcastable over [tokens, heads, head_dim]: a number as it is; one per
    KV head repeated for each of its query heads (GQA's groups are consecutive heads)."""
    if scale.ndim == 0:
        return scale
    return jnp.repeat(scale, heads // scale.shape[0])[:, None]


def _attention_block(cfg: ModelConfig, lp: Params, x: jax.Array, cos: jax.Array, sin: jax.Array,
                     k_cache: jax.Array, v_cache: jax.Array, inp: ModelInputs,
                     attention_fn: AttentionFn) -> tuple[Output, jax.Array, jax.Array]:
    t = x.shape[0]
    kw = dict(sm_scale=cfg.head_dim ** -0.5, sliding_window=cfg.sliding_window)
    qkv = _decode_qkv(cfg, lp, x, k_cache)
    if qkv is not None:
        q, k_cache, v_cache = decode_epilogue.rope_write_kv(
            qkv.partials, qkv.scale, cos, sin, inp.slot_mapping, k_cache, v_cache,
            num_heads=cfg.num_heads, dtype=x.dtype, interpret=jax.default_backend() != "gpu")
        out = _paged_attention(q, k_cache, v_cache, inp, attention_fn, **kw)
    else:
        kv_size = cfg.num_kv_heads * cfg.head_dim
        q, k, v = projections(x, lp, ("q", "k", "v"), (cfg.q_size, kv_size, kv_size),
                              cfg.batch_invariant, cfg.pallas_gemms)
        q = q.reshape(t, cfg.num_heads, cfg.head_dim)
        k = k.reshape(t, cfg.num_kv_heads, cfg.head_dim)
        v = v.reshape(t, cfg.num_kv_heads, cfg.head_dim)
        if cfg.qk_norm:
            q = rms_norm(q, lp["q_norm"], cfg.rms_norm_eps, cfg.batch_invariant)
            k = rms_norm(k, lp["k_norm"], cfg.rms_norm_eps, cfg.batch_invariant)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        out, k_cache, v_cache = attend(q, k, v, k_cache, v_cache, inp, attention_fn, lp, **kw)
    o = linear(out.reshape(t, cfg.q_size), lp, "o", cfg.batch_invariant, cfg.pallas_gemms,
               sums=True)
    return o, k_cache, v_cache


def _decode_qkv(cfg: ModelConfig, lp: Params, x: jax.Array,
                k_cache: Optional[jax.Array]) -> Optional[SplitSums]:
    """The fused q+k+v GEMM's output as SplitSums where one kernel may rotate it and write the
    cache (decode_epilogue.rope_write_kv, where _epilogue_rotates): decode-sized rows
    (layers.split_sums). None elsewhere: the general path."""
    if k_cache is None or "q+k+v" not in lp or not _epilogue_rotates(cfg, lp):
        return None
    return split_sums(x, lp, "q+k+v", cfg.pallas_gemms)


def _epilogue_rotates(cfg: ModelConfig, lp: Params) -> bool:
    """Whether decode_epilogue.rope_write_kv may rotate q and k straight from the GEMM and write
    the cache: no checkpoint's cache scales, every dimension of a head rotated, no q/k norm
    between, not batch-invariant."""
    return (not cfg.qk_norm and not cfg.batch_invariant and cfg.rotary_dim == cfg.head_dim
            and decode_epilogue.rope_fits(cfg.head_dim) and KV_CACHE_SCALES[0] not in lp)


def _mlp(cfg: ModelConfig, lp: Params, x: jax.Array) -> Output:
    return gated_mlp(x, lp, invariant=cfg.batch_invariant, pallas=cfg.pallas_gemms, sums=True)


def forward(params: Params, kv_cache: Optional[KVCache], inp: ModelInputs, cfg: ModelConfig,
            attention_fn: AttentionFn,
            experts_fn: ExpertsFn = experts_swiglu) -> tuple[jax.Array, Optional[KVCache]]:
    """Runs all layers over the batch's new tokens; returns final hidden states [T, hidden] (before
    the final norm) and the updated cache. `experts_fn`: mixture-of-experts layers' experts
    (models/moe.py). kv_cache None: the tokens attend among themselves (see `attend`)."""
    x = params["embed"][inp.token_ids]
    token_seq_lens = None
    if (cfg.rope_scaling or {}).get("rope_type") == "longrope":  # each token's request's length
        req = jnp.searchsorted(inp.query_start_loc[1:], jnp.arange(x.shape[0]), side="right")
        token_seq_lens = inp.seq_lens[jnp.minimum(req, inp.seq_lens.shape[0] - 1)]
    cos, sin = rope_cos_sin(cfg, inp.positions, token_seq_lens)
    if kv_cache is not None and _fp8_row_fits(cfg, params["layers"], x):
        return _fp8_row_layers(params["layers"], x, cos, sin, kv_cache, inp, cfg, attention_fn)
    new_cache: KVCache = []
    # Each layer takes the residual stream and the previous layer's output not yet added to it:
    # the add belongs to the layer's first norm (layers.add_norm). The first layer's zeros fold
    # away (x + 0).
    delta: Output = jnp.zeros_like(x)
    for lp, (k_cache, v_cache) in zip(params["layers"], kv_cache or no_cache(cfg)):
        x, delta, k_cache, v_cache = _decoder_layer(
            lp, x, delta, cos, sin, k_cache, v_cache, inp, cfg=cfg, attention_fn=attention_fn,
            experts_fn=experts_fn)
        new_cache.append((k_cache, v_cache))
    x = x + as_array(delta, x.dtype)
    return x, new_cache if kv_cache is not None else None


_FP8_ROW_WEIGHTS = ("q+k+v", "o", "gate+up", "down")


def _fp8_row_fits(cfg: ModelConfig, layers: list[Params], x: jax.Array) -> bool:
    """Whether a one-row step runs _fp8_row_layers: one token, the Pallas GEMMs on one device,
    every layer a dense one with FP8 q+k+v, o, gate+up and down (fused at load) and nothing added
    to their products, the decode epilogue's rotation (_epilogue_rotates) and a hidden size the
    tails block (a power of two)."""
    h = x.shape[-1]
    return (x.shape[0] == 1 and cfg.pallas_gemms and tp_size() == 1
            and decode_epilogue.add_norm_fits(h)
            and all(_fp8_row_layer_fits(cfg, lp) for lp in layers))


def _fp8_row_layer_fits(cfg: ModelConfig, lp: Params) -> bool:
    return (_epilogue_rotates(cfg, lp) and "router" not in lp and all(
        name in lp and lp[name].dtype == FP8 and one_row_tiles(*lp[name].shape) is not None
        for name in _FP8_ROW_WEIGHTS) and not any(
        key.endswith(("_bias", "_lora_a")) for key in lp))


def _fp8_row_layers(layers: list[Params], x: jax.Array, cos: jax.Array, sin: jax.Array,
                    kv_cache: KVCache, inp: ModelInputs, cfg: ModelConfig,
                    attention_fn: AttentionFn) -> tuple[jax.Array, KVCache]:
    """forward's layers for one row with FP8 weights: o's and down's GEMMs add their output to the
    residual stream in their last programs and sum its squares by blocks of columns
    (fp8_gemm.fp8_row_add_norm), and the next GEMM finishes the RMSNorm (fp8_row_norm_partials:
    the norm's weight on its inputs, the row's factor on its sums): no kernel between two GEMMs
    for the add and the norm. The first layer's input squares are summed by XLA."""
    x32 = x.astype(jnp.float32)
    ssq = (x32 * x32).reshape(-1, ROW_BLOCK_N).sum(1)
    counts = jnp.zeros(x.shape[-1] // ROW_BLOCK_N, jnp.int32)
    new_cache: KVCache = []
    for lp, (k_cache, v_cache) in zip(layers, kv_cache):
        x, ssq, counts, k_cache, v_cache = _fp8_row_layer(
            lp, x, ssq, counts, cos, sin, k_cache, v_cache, inp, cfg=cfg,
            attention_fn=attention_fn)
        new_cache.append((k_cache, v_cache))
    return x, new_cache


@functools.partial(jax.jit, static_argnames=("cfg", "attention_fn"))  # as _decoder_layer
def _fp8_row_layer(lp: Params, x: jax.Array, ssq: jax.Array, counts: jax.Array, cos: jax.Array,
                   sin: jax.Array, k_cache: jax.Array, v_cache: jax.Array, inp: ModelInputs,
                   cfg: ModelConfig, attention_fn: AttentionFn
                   ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]:
    interpret = jax.default_backend() != "gpu"
    eps = cfg.rms_norm_eps
    qkv = fp8_row_norm_partials(x, ssq, lp["input_norm"], eps, lp["q+k+v"], interpret=interpret)
    q, k_cache, v_cache = decode_epilogue.rope_write_kv(
        qkv, lp["q+k+v_scale"], cos, sin, inp.slot_mapping, k_cache, v_cache,
        num_heads=cfg.num_heads, dtype=x.dtype, interpret=interpret)
    out = _paged_attention(q, k_cache, v_cache, inp, attention_fn,
                           sm_scale=cfg.head_dim ** -0.5, sliding_window=cfg.sliding_window)
    x, ssq, counts = fp8_row_add_norm(out.reshape(1, cfg.q_size), lp["o"], lp["o_scale"], x,
                                      counts, interpret=interpret)
    gate_up = fp8_row_norm_partials(x, ssq, lp["post_attn_norm"], eps, lp["gate+up"],
                                    interpret=interpret)
    gate, up = jnp.split(split_total(gate_up, lp["gate+up_scale"], x.dtype), 2, axis=-1)
    x, ssq, counts = fp8_row_add_norm(GATED_ACTIVATIONS["silu"](gate) * up, lp["down"],
                                      lp["down_scale"], x, counts, interpret=interpret)
    return x, ssq, counts, k_cache, v_cache


def no_cache(cfg: ModelConfig) -> list[tuple[None, None]]:
    return [(None, None)] * cfg.num_layers


# A nested jit so that the step's identical layers are traced and lowered once per step shape (one
# MLIR function called num_layers times) instead of once per layer: at the 8B shape this cut the 9
# buckets' tracing + lowering from 9.0 s to 5.0 s of start-up. XLA inlines the calls, so the compiled
# step is the same program.
@functools.partial(jax.jit, static_argnames=("cfg", "attention_fn", "experts_fn"))
def _decoder_layer(lp: Params, x: jax.Array, delta: Output, cos: jax.Array, sin: jax.Array,
                   k_cache: jax.Array, v_cache: jax.Array, inp: ModelInputs, cfg: ModelConfig,
                   attention_fn: AttentionFn, experts_fn: ExpertsFn
                   ) -> tuple[jax.Array, Output, jax.Array, jax.Array]:
    """(x + delta) through the layer: returns the residual stream after attention, the MLP's
    output to add to it (the next layer's delta) and the updated cache."""
    x, h = add_norm(x, delta, lp["input_norm"], cfg.rms_norm_eps, cfg.batch_invariant)
    attn, k_cache, v_cache = _attention_block(cfg, lp, h, cos, sin, k_cache, v_cache, inp,
                                              attention_fn)
    x, h = add_norm(x, attn, lp["post_attn_norm"], cfg.rms_norm_eps, cfg.batch_invariant)
    mlp = (moe(cfg, lp, h, experts_fn, inp.query_start_loc[inp.num_seqs[0]]) if "router" in lp
           else _mlp(cfg, lp, h))
    return x, mlp, k_cache, v_cache


def compute_logits(params: Params, hidden: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Logits in float32 for the selected hidden states [N, hidden] (gathered before the norm: the
    norm is per token, so only the tokens that are sampled pay for it and the LM head)."""
    return lm_head(hidden, params, cfg)


def make_kv_cache(cfg: ModelConfig, num_blocks: int, block_size: int, dtype: Any,
                  sharding: Optional[jax.sharding.Sharding] = None) -> KVCache:
    shape = (num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)

    def zeros() -> jax.Array:
        return jnp.zeros(shape, dtype) if sharding is None else jax.jit(
            lambda: jnp.zeros(shape, dtype), out_shardings=sharding)()

    return [(zeros(), zeros()) for _ in range(cfg.num_layers)]


def kv_cache_bytes_per_block(cfg: ModelConfig, block_size: int, dtype: Any) -> int:
    return 2 * cfg.num_layers * block_size * cfg.kv_size * jnp.dtype(dtype).itemsize
