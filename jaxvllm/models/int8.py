"""int8 weights with a scale (and a min) per output channel and group of inputs (W8A16: 8-bit GPTQ
and compressed-tensors checkpoints, and a GGUF's Q5_0, Q5_1, Q5_K, Q6_K and Q8_0 projections with
`quantization="gguf"`): each linear weight kept at a byte a value, dequantized to the activations'
dtype as the layer runs.

Layout (beside the weight `<name>`; converters/integer.py and converters/gguf_quant.py write it,
quantize_int8 new weights of a swap):
`<name>` int8 [out, in] (the format's integer values: Q8_0's signed bytes, Q6_K's q - 32, a
checkpoint's unsigned values minus 128, ...), `<name>_scale` float32 [groups, out] (the format's
scales or their products, exact) and, for the formats with a min or a zero point other than the
values' middle (Q5_1, Q5_K, asymmetric checkpoints: (128 - zero) * scale), `<name>_min` float32
[groups, out]: w = q * scale (+ min). Group-major as the int4 layout's (models/int4.py); and for a
checkpoint quantized in activation order `<name>_perm` int32 [in], as the int4 layout's. No other
weight of any layout is int8. A mixture-of-experts layer's routed experts (8-bit GPTQ and
compressed-tensors checkpoints without activation order, a GGUF's 5- to 8-bit expert stacks) keep
the layout expert by expert: `experts_<proj>` int8 [experts, out, in], its scales and mins
[experts, groups, out] (models/moe.py runs them).
"""
from __future__ import annotations

import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxvllm.models.grouped import grouped_linear
from pallas_kernels import int8_gemm, int8_matmul, int8_matmul_reference
from pallas_kernels.reference import int8_dequantize

INT8 = jnp.int8
# The Pallas GEMM reduces a group in one dot, so its groups are at most int8_gemm.MAX_GROUP inputs:
# a checkpoint's per-channel scale (one group of all the inputs) is stored repeated per this many.
CHANNEL_GROUP = 128


def kernel_groups(scale: np.ndarray, offset: Optional[np.ndarray],
                  inp: int) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """A weight's scale and min (or None), [out, groups], with one group over more than
    int8_gemm.MAX_GROUP of its `inp` inputs repeated per CHANNEL_GROUP inputs (exactly the same
    weights, in groups the GEMM takes); others as they are."""
    if scale.shape[1] != 1 or inp <= int8_gemm.MAX_GROUP or inp % CHANNEL_GROUP:
        return scale, offset
    reps = inp // CHANNEL_GROUP
    return np.repeat(scale, reps, 1), None if offset is None else np.repeat(offset, reps, 1)


def int8_linear(x: jax.Array, w: jax.Array, scale: jax.Array, mn: Optional[jax.Array] = None,
                perm: Optional[jax.Array] = None, pallas: bool = False,
                row_parallel: bool = False) -> jax.Array:
    """x [..., in] times the int8 weight (w [out, in], scale and the min `mn` (or None) [groups,
    out]); perm [in] reorders x's features first. Decode-sized batches run the Pallas GEMM where
    `pallas` allows it (ModelConfig.pallas_gemms: the weight read at a byte a value; per device
    under tensor parallelism, `row_parallel` saying how the weight is split: models/grouped.py);
    others dequantize, then multiply. Returns x's dtype."""
    if perm is not None:
        x = jnp.take(x, perm, axis=-1)
    return grouped_linear(x, int8_gemm, int8_matmul, int8_matmul_reference, w, scale, mn,
                          pallas=pallas, row_parallel=row_parallel)


@functools.partial(jax.jit, static_argnames=("group_size", "with_min"))
def quantize_int8(w: jax.Array, group_size: int,
                  with_min: bool = False) -> tuple[jax.Array, jax.Array, Optional[jax.Array]]:
    """[in, out] -> the layout's (int8 [out, in], float32 scale [groups, out], float32 min
    [groups, out] or None): round to nearest per output channel and group of inputs, symmetric
    (w ~ q * scale, q in -127..127: Q8_0's and symmetric checkpoints' form) or, `with_min`, over
    the group's own range (w ~ q * scale + min, q in -128..127). For new weights swapped into an
    int8 model (models/requant.py)."""
    wt = w.astype(jnp.float32).T
    out, inp = wt.shape
    g = wt.reshape(out, inp // group_size, group_size)
    if with_min:
        lo = g.min(-1)
        scale = jnp.maximum(g.max(-1) - lo, 1e-12) / 255
        q = jnp.clip(jnp.round((g - lo[..., None]) / scale[..., None]), 0, 255) - 128
        mn = (lo + 128 * scale).T
    else:
        scale = jnp.maximum(jnp.abs(g).max(-1), 1e-12) / 127
        q = jnp.clip(jnp.round(g / scale[..., None]), -127, 127)
        mn = None
    return q.reshape(out, inp).astype(INT8), scale.T, mn


@functools.partial(jax.jit, static_argnames=("group_size", "with_min"))
def quantize_experts_int8(w: jax.Array, group_size: int, with_min: bool = False
                          ) -> tuple[jax.Array, jax.Array, Optional[jax.Array]]:
    """Experts [E, in, out] -> the layout's (int8 [E, out, in], float32 scale [E, groups, out],
    min [E, groups, out] or None), each expert quantized as quantize_int8 does a linear."""
    return jax.vmap(lambda a: quantize_int8(a, group_size, with_min))(w)


def dequantize_experts(w: jax.Array, scale: jax.Array, mn: Optional[jax.Array],
                       dtype: Any) -> jax.Array:
    """int8 experts (int8 [E, out, in], scale and min or None [E, groups, out]) as `dtype`
    [E, in, out], the model's layout of experts."""
    deq = jax.vmap(int8_dequantize)(w, scale, *(() if mn is None else (mn,)))
    return jnp.swapaxes(deq, 1, 2).astype(dtype)
