"""Gemma 2 and Gemma 3 (text) on the engine's ragged, paged batch: the embedding scaled by
sqrt(hidden), (1 + w) RMSNorms in float32, norms after attention and after the MLP as well as
before, a GeGLU MLP (tanh GELU), queries scaled by query_pre_attn_scalar, local (sliding-window) and
global layers (Gemma 3: each with its own RoPE base, q/k norms), and Gemma 2's soft caps on the
attention logits and the final logits. The batch, the cache and the helpers are llama.py's.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp

from jaxvllm.models.config import ModelConfig
from jaxvllm.models.layers import (apply_rope, gated_mlp, linear, lm_head, mean_square, projections,
                                   rope_cos_sin)
from jaxvllm.models.llama import AttentionFn, KVCache, ModelInputs, Params, attend, no_cache
from jaxvllm.models.moe import ExpertsFn


def rms_norm(x: jax.Array, weight: jax.Array, eps: float, invariant: bool = False) -> jax.Array:
    """Gemma's: scaled by (1 + weight), all in float32, then cast (Llama's casts, then scales)."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(mean_square(x32, invariant) + eps)
    return (y * (1.0 + weight.astype(jnp.float32))).astype(x.dtype)


def forward(params: Params, kv_cache: Optional[KVCache], inp: ModelInputs, cfg: ModelConfig,
            attention_fn: AttentionFn,
            experts_fn: Optional[ExpertsFn] = None) -> tuple[jax.Array, Optional[KVCache]]:
    """As llama.forward (`experts_fn` unused: no Gemma has experts)."""
    embed = params["embed"]
    x = embed[inp.token_ids] * jnp.asarray(cfg.hidden_size ** 0.5, embed.dtype)
    rope_global = rope_cos_sin(cfg, inp.positions)
    rope_local = rope_global if cfg.rope_local_theta is None else rope_cos_sin(
        dataclasses.replace(cfg, rope_theta=cfg.rope_local_theta, rope_scaling=None), inp.positions)
    new_cache: KVCache = []
    for i, (lp, (k_cache, v_cache)) in enumerate(zip(params["layers"], kv_cache or no_cache(cfg))):
        window = cfg.layer_sliding_window(i)
        cos, sin = rope_global if window is None else rope_local
        x, k_cache, v_cache = _decoder_layer(lp, x, cos, sin, k_cache, v_cache, inp, cfg=cfg,
                                             attention_fn=attention_fn, window=window)
        new_cache.append((k_cache, v_cache))
    return x, new_cache if kv_cache is not None else None


@functools.partial(jax.jit, static_argnames=("cfg", "attention_fn", "window"))
def _decoder_layer(lp: Params, x: jax.Array, cos: jax.Array, sin: jax.Array, k_cache: jax.Array,
                   v_cache: jax.Array, inp: ModelInputs, cfg: ModelConfig, attention_fn: AttentionFn,
                   window: Optional[int]) -> tuple[jax.Array, jax.Array, jax.Array]:
    eps, t, inv = cfg.rms_norm_eps, x.shape[0], cfg.batch_invariant
    h = rms_norm(x, lp["input_norm"], eps, inv)
    kv_size = cfg.num_kv_heads * cfg.head_dim
    pallas = cfg.pallas_gemms
    q, k, v = projections(h, lp, ("q", "k", "v"), (cfg.q_size, kv_size, kv_size), inv, pallas)
    q = q.reshape(t, cfg.num_heads, cfg.head_dim)
    k = k.reshape(t, cfg.num_kv_heads, cfg.head_dim)
    v = v.reshape(t, cfg.num_kv_heads, cfg.head_dim)
    if cfg.qk_norm:
        q = rms_norm(q, lp["q_norm"], eps, inv)
        k = rms_norm(k, lp["k_norm"], eps, inv)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    out, k_cache, v_cache = attend(q, k, v, k_cache, v_cache, inp, attention_fn, lp,
                                   sm_scale=cfg.query_pre_attn_scalar ** -0.5,
                                   sliding_window=window, logits_soft_cap=cfg.attn_logit_softcapping)
    o = linear(out.reshape(t, cfg.q_size), lp, "o", inv, pallas)
    x = x + rms_norm(o, lp["post_attn_norm"], eps, inv)
    h = rms_norm(x, lp["pre_ffn_norm"], eps, inv)
    mlp = gated_mlp(h, lp, "gelu_tanh", invariant=inv, pallas=pallas)
    return x + rms_norm(mlp, lp["post_ffn_norm"], eps, inv), k_cache, v_cache


def compute_logits(params: Params, hidden: jax.Array, cfg: ModelConfig) -> jax.Array:
    """As llama.compute_logits, with Gemma's norm and final soft cap."""
    logits = lm_head(hidden, params, cfg, rms_norm)
    cap = cfg.final_logit_softcapping
    return logits if cap is None else cap * jnp.tanh(logits / cap)
