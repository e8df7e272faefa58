"""Mixture-of-experts layers (Mixtral, Qwen2-MoE, Qwen3-MoE): routing as HF's blocks do it, and the
experts' SwiGLU over the routed rows as grouped GEMMs (bench/RESULTS.md, "Mixture of experts").

The k copies of every token are sorted by expert, so each expert's rows are contiguous, and an
`ExpertsFn` computes every row's SwiGLU with its own expert: `(rows [N, H], group_sizes [E],
w_gate [E, H, I], w_up [E, H, I], w_down [E, I, H], quant, order) -> [N, H]`, where `order` is
None but for integer experts in GPTQ's activation order: the order gate's and up's inputs are
stored in, [E, H] int32 (ORDER; down's order is applied to gate's and up's outputs at load,
converters/hf.py), and `quant` is None for
experts in a float dtype, else a tuple per weight of the tensors stored beside it (expert_quant):
() for a float weight, FP8 experts' (models/quant.py) scales per expert and output channel,
(scale,), int4 experts' (models/int4.py: the weights packed [E, out, in/2]) scales and zero points
or mins per expert, group of inputs and output channel, (scale, offset), int8 experts'
(models/int8.py: [E, out, in]) scales and mins where they have them, (scale,) or (scale, min).
Gate and up share one format; down may differ (a GGUF's down projections in more bits than gate's
and up's). Under tensor parallelism each device holds every expert's slice of I and the rows whole
(worker/sharding.py wraps the function per device and sums the partial outputs).
"""
from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp

from jaxvllm.models import int4, int8, quant
from jaxvllm.models.config import ModelConfig
from jaxvllm.models.fused import companion_suffixes
from jaxvllm.models.layers import gated_mlp
from jaxvllm.models.quant import EXPERTS, FP8
from pallas_kernels import routed_experts
from pallas_kernels.routed_experts import Quant

ExpertsFn = Callable[..., jax.Array]
# Integer experts' input orders (GPTQ's activation order), [E, in] int32 each: gate's and up's (one
# order: they take one input), which the experts run on, and down's, which their outputs were put in
# at load and new weights are rounded into (models/requant.py).
ORDER, DOWN_ORDER = EXPERTS[0] + "_perm", EXPERTS[2] + "_perm"


def expert_quant(lp: dict) -> Quant:
    """The `quant` argument of an ExpertsFn for the experts of layer params `lp`."""
    quant = tuple(tuple(lp[n + s] for s in companion_suffixes(lp, n)) for n in EXPERTS)
    return quant if any(quant) else None


def dequantized(w: jax.Array, companions: tuple[jax.Array, ...], dtype) -> jax.Array:
    """Quantized experts (one weight of a Quant with its companions) as `dtype` [E, in, out]."""
    if w.dtype == int4.INT4:
        return int4.dequantize_experts(w, *companions, dtype)
    if w.dtype == int8.INT8:
        return int8.dequantize_experts(w, companions[0], companions[1] if len(companions) > 1
                                       else None, dtype)
    return quant.dequantize_experts(w, *companions, dtype)


def moe(cfg: ModelConfig, lp: dict, x: jax.Array, experts_fn: ExpertsFn,
        num_tokens: Optional[jax.Array] = None) -> jax.Array:
    """Each token's top-k experts by the router's softmax (in float32, the weights renormalised
    over the k when the model says so), their SwiGLU outputs weighted and summed per token, plus
    Qwen2-MoE's shared expert under its sigmoid gate. Tokens from `num_tokens` on are the step's
    padding: their rows join no expert's group, so no expert is computed (or read) for them."""
    k, e = cfg.num_experts_per_tok, cfg.num_experts
    probs = jax.nn.softmax((x @ lp["router"]).astype(jnp.float32), axis=-1)
    weights, experts = jax.lax.top_k(probs, k)                    # [T, k]
    if cfg.norm_topk_prob:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    flat = experts.reshape(-1)
    if num_tokens is not None:  # expert id e: sorted after every group, dropped by bincount
        flat = jnp.where(jnp.arange(flat.shape[0]) // k < num_tokens, flat, e)
    order = jnp.argsort(flat, stable=True)                         # rows grouped by expert
    token = order // k
    group_sizes = jnp.bincount(flat, length=e).astype(jnp.int32)
    out = experts_fn(x[token], group_sizes, *(lp[n] for n in EXPERTS), expert_quant(lp),
                     lp.get(ORDER))
    # Rows outside every group are undefined in the kernels' output.
    out = out * weights.reshape(-1)[order][:, None].astype(x.dtype)
    y = jnp.zeros_like(x).at[token].add(jnp.where((flat[order] < e)[:, None], out, 0))
    if "shared_router" in lp:
        shared = gated_mlp(x, lp, names=("shared_gate", "shared_up", "shared_down"),
                           pallas=cfg.pallas_gemms)
        y = y + jax.nn.sigmoid(x @ lp["shared_router"]) * shared
    return y


# Rows per expert on average (tokens x k / experts) up to which the routed-experts kernel, which
# reads only the experts picked, beats the grouped GEMMs that tile every expert, by the experts'
# format. Float experts: the kernel walks an expert's rows 16 at a time and re-reads the weights
# for each 16 (bench/RESULTS.md, "Mixture of experts": on Qwen3-30B-A3B's layer 6.8x faster at one
# token, 1.26x at 8 rows per expert; at Mixtral's shapes 0.8x at 16). Quantized experts: the
# grouped GEMMs first dequantize every expert (written in the model's dtype and read again), so
# the kernel, which reads them as stored, wins much further (bench/RESULTS.md, "Integer experts":
# Qwen3-30B-A3B's layer on an H200, FP8 1.6x at 32 rows, even at 64, 0.74x at 128; int4 3.5x at
# 16, 1.17x at 128, more not measured); int8's are not measured and take FP8's.
ROUTED_MAX_ROWS_PER_EXPERT = 8
ROUTED_MAX_ROWS_PER_QUANTIZED_EXPERT = {jnp.dtype(FP8): 64, jnp.dtype(int4.INT4): 128,
                                        jnp.dtype(int8.INT8): 64}


def experts_swiglu(rows: jax.Array, group_sizes: jax.Array, w_gate: jax.Array, w_up: jax.Array,
                   w_down: jax.Array, quant: Quant = None,
                   order: Optional[jax.Array] = None) -> jax.Array:
    """The default ExpertsFn on the GPU: for a few rows (ROUTED_MAX_ROWS_PER_EXPERT, or by their
    format for quantized experts) the routed-experts kernel (pallas_kernels/routed_experts.py;
    quantized experts read as stored), for more JAX's Mosaic GPU grouped GEMM on Hopper in
    bf16/f16 where its tiles fit; XLA's ragged_dot elsewhere (CPU; 5-20x slower on the GPU)."""
    if jax.default_backend() == "gpu":
        limit = ROUTED_MAX_ROWS_PER_QUANTIZED_EXPERT.get(w_gate.dtype, ROUTED_MAX_ROWS_PER_EXPERT)
        few_rows = rows.shape[0] <= limit * w_gate.shape[0]
        if few_rows and routed_experts.fits(w_gate, w_down, quant):
            return routed_experts.routed_swiglu(rows, group_sizes, w_gate, w_up, w_down, quant,
                                                order)
        if _mosaic_fits(rows, w_gate):
            return grouped_swiglu(rows, group_sizes, w_gate, w_up, w_down, quant, order,
                                  mosaic_ragged_dot)
    return grouped_swiglu(rows, group_sizes, w_gate, w_up, w_down, quant, order)


def grouped_swiglu(rows: jax.Array, group_sizes: jax.Array, w_gate: jax.Array, w_up: jax.Array,
                   w_down: jax.Array, quant: Quant = None, order: Optional[jax.Array] = None,
                   gemm: Callable[..., jax.Array] = jax.lax.ragged_dot) -> jax.Array:
    """One grouped GEMM per projection over the rows sorted by expert; quantized experts
    dequantized to the rows' dtype first, gate's and up's inputs put back in the rows' order
    where `order` says they are stored in another (cheaper than gathering many rows)."""
    if quant is not None:
        w_gate, w_up, w_down = (dequantized(w, q, rows.dtype) if q else w
                                for w, q in zip((w_gate, w_up, w_down), quant))
    if order is not None:
        inverse = jnp.argsort(order, axis=1)[:, :, None]
        w_gate, w_up = (jnp.take_along_axis(w, inverse, axis=1) for w in (w_gate, w_up))
    gate = gemm(rows, w_gate, group_sizes)
    up = gemm(rows, w_up, group_sizes)
    return gemm(jax.nn.silu(gate) * up, w_down, group_sizes)


_MOSAIC_TILES = dict(block_m=64, block_n=128, block_k=64, max_concurrent_steps=4, grid_block_n=1)


def _mosaic_fits(rows: jax.Array, w_gate: jax.Array) -> bool:
    if rows.dtype not in (jnp.bfloat16, jnp.float16):
        return False
    if not str(getattr(jax.devices()[0], "compute_capability", "")).startswith("9."):
        return False  # warpgroup MMA: Hopper only
    h, i = w_gate.shape[1:]
    if w_gate.dtype == int4.INT4:  # packed [E, out, in/2]
        h, i = 2 * i, h
    elif w_gate.dtype == int8.INT8:  # [E, out, in]
        h, i = i, h
    k_tile, n_tile = _MOSAIC_TILES["block_k"], _MOSAIC_TILES["block_n"]
    return h % k_tile == 0 and i % k_tile == 0 and i % n_tile == 0 and h % n_tile == 0


def mosaic_ragged_dot(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """JAX's Mosaic GPU grouped GEMM (jax.experimental.pallas.ops.gpu.ragged_dot_mgpu)."""
    from jax.experimental.pallas.ops.gpu.ragged_dot_mgpu import ragged_dot
    return ragged_dot(lhs, rhs, group_sizes=group_sizes, **_MOSAIC_TILES)
