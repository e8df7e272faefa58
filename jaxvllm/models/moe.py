"""Mixture-of-experts layers (Mixtral, Qwen2-MoE, Qwen3-MoE): routing as HF's blocks do it, and the
experts' SwiGLU over the routed rows as grouped GEMMs (bench/RESULTS.md, "Mixture of experts").

The k copies of every token are sorted by expert, so each expert's rows are contiguous, and an
`ExpertsFn` computes every row's SwiGLU with its own expert: `(rows [N, H], group_sizes [E],
w_gate [E, H, I], w_up [E, H, I], w_down [E, I, H]) -> [N, H]`. Under tensor
parallelism each device holds every expert's slice of I and the rows whole (worker/sharding.py
wraps the function per device and sums the partial outputs).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from jaxvllm.models.config import ModelConfig

ExpertsFn = Callable[..., jax.Array]


def moe(cfg: ModelConfig, lp: dict, x: jax.Array, experts_fn: ExpertsFn) -> jax.Array:
    """Each token's top-k experts by the router's softmax (in float32, the weights renormalised
    over the k when the model says so), their SwiGLU outputs weighted and summed per token, plus
    Qwen2-MoE's shared expert under its sigmoid gate. Padding tokens are routed too; their rows
    are never read."""
    k = cfg.num_experts_per_tok
    probs = jax.nn.softmax((x @ lp["router"]).astype(jnp.float32), axis=-1)
    weights, experts = jax.lax.top_k(probs, k)                    # [T, k]
    if cfg.norm_topk_prob:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    flat = experts.reshape(-1)
    order = jnp.argsort(flat, stable=True)                         # rows grouped by expert
    token = order // k
    group_sizes = jnp.bincount(flat, length=cfg.num_experts).astype(jnp.int32)
    out = experts_fn(x[token], group_sizes, lp["experts_gate"], lp["experts_up"],
                     lp["experts_down"])
    out = out * weights.reshape(-1)[order][:, None].astype(x.dtype)
    y = jnp.zeros_like(x).at[token].add(out)
    if "shared_router" in lp:
        shared = jax.nn.silu(x @ lp["shared_gate"]) * (x @ lp["shared_up"]) @ lp["shared_down"]
        y = y + jax.nn.sigmoid(x @ lp["shared_router"]) * shared
    return y


def experts_swiglu(rows: jax.Array, group_sizes: jax.Array, w_gate: jax.Array, w_up: jax.Array,
                   w_down: jax.Array) -> jax.Array:
    """The default ExpertsFn: grouped GEMMs, with JAX's Mosaic GPU kernel on a Hopper GPU where its
    tiles fit, else XLA's ragged_dot (CPU, float32; 5-20x slower than the kernel on the GPU)."""
    gemm = mosaic_ragged_dot if _mosaic_fits(rows, w_gate) else jax.lax.ragged_dot
    return grouped_swiglu(rows, group_sizes, w_gate, w_up, w_down, gemm)


def grouped_swiglu(rows: jax.Array, group_sizes: jax.Array, w_gate: jax.Array, w_up: jax.Array,
                   w_down: jax.Array,
                   gemm: Callable[..., jax.Array] = jax.lax.ragged_dot) -> jax.Array:
    """One grouped GEMM per projection over the rows sorted by expert."""
    gate = gemm(rows, w_gate, group_sizes)
    up = gemm(rows, w_up, group_sizes)
    return gemm(jax.nn.silu(gate) * up, w_down, group_sizes)


_MOSAIC_TILES = dict(block_m=64, block_n=128, block_k=64, max_concurrent_steps=4, grid_block_n=1)


def _mosaic_fits(rows: jax.Array, w_gate: jax.Array) -> bool:
    if jax.default_backend() != "gpu" or rows.dtype not in (jnp.bfloat16, jnp.float16):
        return False
    if not str(getattr(jax.devices()[0], "compute_capability", "")).startswith("9."):
        return False  # warpgroup MMA: Hopper only
    h, i = w_gate.shape[1], w_gate.shape[2]
    k_tile, n_tile = _MOSAIC_TILES["block_k"], _MOSAIC_TILES["block_n"]
    return h % k_tile == 0 and i % k_tile == 0 and i % n_tile == 0 and h % n_tile == 0


def mosaic_ragged_dot(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """JAX's Mosaic GPU grouped GEMM (jax.experimental.pallas.ops.gpu.ragged_dot_mgpu)."""
    from jax.experimental.pallas.ops.gpu.ragged_dot_mgpu import ragged_dot
    return ragged_dot(lhs, rhs, group_sizes=group_sizes, **_MOSAIC_TILES)
