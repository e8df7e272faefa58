"""int4 weights (W4A16: AWQ, GPTQ and compressed-tensors checkpoints,
`quantization="awq"|"gptq"|"compressed-tensors"`, and a GGUF's 4-bit tensors,
`quantization="gguf"`): each linear weight kept at 4 bits with a scale and an offset per output
channel and group of inputs, dequantized to the activations' dtype as the layer runs. The offset is
an integer zero point where the format has one, w = (q - zero) * scale (AWQ, GPTQ,
compressed-tensors, GGUF's Q4_0 and quantize_int4 by default), else a min, w = q * scale + min
(GGUF's Q4_1 and Q4_K): with zero points the GPU's GEMM dequantizes in bf16 pairs, twice the
weights an instruction (pallas_kernels/int4_gemm.py).

Layout (beside the weight `<name>`; converters/integer.py writes it from a checkpoint, pack() from
values): `<name>` uint8 [out, in/2], two 4-bit values a byte, within each group of inputs byte j
holding input j (low bits) and input j + group/2 (high bits) (the layout the Pallas GEMM reads
without moving values between lanes); `<name>_scale` [groups, out] in float32 (the checkpoints'
float16 scales, exact); either `<name>_zero` uint8 or `<name>_min` float32 [groups, out] (GGUF's
mins and Q4_K's sub-block products exact: a model-dtype bf16 min, shared by a group, biased the
whole group; bench/RESULTS.md, "GGUF at 4 bits"); and for a GPTQ checkpoint quantized in
activation order `<name>_perm` int32 [in]: the order of the inputs that makes each group contiguous
(the weight's inputs are stored in that order and the layer gathers its input the same way).
The embedding, LM head, norms and routers stay in the model's dtype.

A mixture-of-experts layer's routed experts (AWQ and GPTQ checkpoints) keep the layout expert by
expert: `experts_<proj>` uint8 [experts, out, in/2], its scales and offsets [experts, groups, out]
(and in activation order the experts' input orders, models/moe.py). The routed-experts kernel reads them at 4 bits for a few rows;
the grouped GEMMs for many take them dequantized (models/moe.py).
"""
from __future__ import annotations

import functools
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxvllm.models.grouped import grouped_linear, tp_size
from pallas_kernels import int4_gemm, int4_matmul, int4_matmul_reference
from pallas_kernels.int4_gemm import int4_partials
from pallas_kernels.reference import int4_dequantize

INT4 = jnp.uint8  # the packed weight's dtype (no other weight of the layout is uint8)


def offset_suffix(lp: dict, name: str) -> str:
    """Which offset the int4 weight `name` has in the layer params `lp`: "_zero" or "_min"."""
    return "_zero" if name + "_zero" in lp else "_min"


def offset(lp: dict, name: str) -> jax.Array:
    """The int4 weight `name`'s offset in the layer params `lp`: its zero points or its min."""
    return lp[name + offset_suffix(lp, name)]


def int4_linear(x: jax.Array, w: jax.Array, scale: jax.Array, off: jax.Array,
                perm: Optional[jax.Array] = None, pallas: bool = False,
                row_parallel: bool = False) -> jax.Array:
    """x [..., in] times the packed int4 weight (w [out, in/2], scale [groups, out], off the uint8
    zero points or float32 min [groups, out]); perm [in] reorders x's features first.
    Decode-sized batches run the Pallas GEMM where `pallas` allows it (ModelConfig.pallas_gemms:
    the weight read at 4 bits; per device under tensor parallelism, `row_parallel` saying how the
    weight is split: models/grouped.py); others dequantize, then multiply. Returns x's dtype."""
    if perm is not None:
        x = jnp.take(x, perm, axis=-1)
    return grouped_linear(x, int4_gemm, int4_matmul, int4_matmul_reference, w, scale, off,
                          pallas=pallas, row_parallel=row_parallel)


def int4_one_row_partials(x: jax.Array, w: jax.Array, scale: jax.Array, off: jax.Array,
                          perm: Optional[jax.Array] = None) -> Optional[jax.Array]:
    """int4_linear's Pallas GEMM at one row on one device left as the float32 partial sums of its
    slices [S, 1, N] (for pallas_kernels/decode_epilogue.py); None where that GEMM does not run:
    more rows, tensor parallelism, a weight its tiles do not fit."""
    k = x.shape[-1]
    if (math.prod(x.shape[:-1]) != 1 or tp_size() > 1
            or not int4_gemm.fits(w.shape[0], k, k // scale.shape[0])):
        return None
    x = x.reshape(1, k) if perm is None else jnp.take(x.reshape(1, k), perm, axis=-1)
    return int4_partials(x, w, scale, off, interpret=jax.default_backend() != "gpu")


def pack(q: Any, group: int) -> Any:
    """4-bit values [out, in] (0..15; numpy or jax) -> the layout's packed uint8 [out, in/2]."""
    xp = jnp if isinstance(q, jax.Array) else np
    out, inp = q.shape
    g = q.reshape(out, inp // group, group).astype(xp.uint8)
    half = group // 2
    return (g[..., :half] | (g[..., half:] << 4)).reshape(out, inp // 2)


@functools.partial(jax.jit, static_argnames=("group_size", "offset"))
def quantize_int4(w: jax.Array, group_size: int,
                  offset: str = "zero") -> tuple[jax.Array, jax.Array, jax.Array]:
    """[in, out] -> the layout's (packed uint8 [out, in/2], float32 scale [groups, out], offset
    [groups, out]): round to nearest over 16 levels spanning each group's range. `offset` "zero":
    the range widened to hold 0, uint8 zero points (AWQ's asymmetric form: zero = round(-min /
    scale), w ~ (q - zero) * scale); "min": the group's own range, its float32 min (GGUF's Q4_1
    form, w ~ q * scale + min). For weights that come without int4 scales: dummy weights measured
    at 4 bits, and new weights swapped into an int4 model (models/requant.py)."""
    wt = w.astype(jnp.float32).T
    out, inp = wt.shape
    g = wt.reshape(out, inp // group_size, group_size)
    lo, hi = g.min(-1), g.max(-1)
    if offset == "zero":
        lo, hi = jnp.minimum(lo, 0), jnp.maximum(hi, 0)
    scale = jnp.maximum(hi - lo, 1e-12) / 15
    if offset == "zero":
        off = jnp.clip(jnp.round(-lo / scale), 0, 15)
        q = jnp.round(g / scale[..., None]) + off[..., None]
        off = off.astype(jnp.uint8)
    else:
        off = lo
        q = jnp.round((g - lo[..., None]) / scale[..., None])
    q = jnp.clip(q, 0, 15)
    return pack(q.reshape(out, inp), group_size), scale.T, off.T


@functools.partial(jax.jit, static_argnames=("group_size", "offset"))
def quantize_experts_int4(w: jax.Array, group_size: int,
                          offset: str = "zero") -> tuple[jax.Array, jax.Array, jax.Array]:
    """Experts [E, in, out] -> the layout's (uint8 [E, out, in/2], float32 scale [E, groups, out],
    offset [E, groups, out]), each expert quantized as quantize_int4 does a linear."""
    return jax.vmap(lambda a: quantize_int4(a, group_size, offset))(w)


def dequantize_experts(w: jax.Array, scale: jax.Array, off: jax.Array, dtype: Any) -> jax.Array:
    """int4 experts (uint8 [E, out, in/2], scale and offset [E, groups, out]) as `dtype`
    [E, in, out], the model's layout of experts."""
    return jnp.swapaxes(jax.vmap(int4_dequantize)(w, scale, off), 1, 2).astype(dtype)


def quantize_params(params: dict[str, Any], group_size: int = 128, consume: bool = False
                    ) -> dict[str, Any]:
    """A new params tree with every linear of QUANTIZED and the routed experts in the int4
    layout (quantize_int4, quantize_experts_int4; one group per output channel where the input
    size is not a multiple of group_size). `consume`: as quant.map_linears's."""
    from jaxvllm.models.quant import EXPERTS, QUANTIZED, map_linears

    def quantize(w: jax.Array) -> dict[str, jax.Array]:
        inputs = w.shape[-2]
        group = group_size if inputs % group_size == 0 else inputs
        fn = quantize_experts_int4 if w.ndim == 3 else quantize_int4
        return dict(zip(("", "_scale", "_zero"), fn(w, group)))
    return map_linears(params, quantize, consume, QUANTIZED + EXPERTS)
