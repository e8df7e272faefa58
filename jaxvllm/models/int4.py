"""int4 weights (W4A16: AWQ and GPTQ checkpoints, `quantization="awq"|"gptq"`): each linear weight
stored as uint4 [out, in] (read at 4 bits) with a scale and a zero point per output channel and
group of input rows, dequantized to the activations' dtype as the layer runs:
w = (q - zero) * scale.

Layout (beside the weight `<name>`, converters/int4.py writes it): `<name>_scale` [out, groups] in
the model's dtype, `<name>_zero` uint4 [out, groups], and for a GPTQ checkpoint quantized in
activation order `<name>_perm` int32 [in]: the order of the input rows that makes each group
contiguous (the weight's rows are stored in that order, and the input is gathered the same way).
The embedding, LM head, norms and routers stay in the model's dtype.
"""
from __future__ import annotations

import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp

INT4 = jnp.uint4


def int4_linear(x: jax.Array, w: jax.Array, scale: jax.Array, zero: jax.Array,
                perm: Optional[jax.Array] = None) -> jax.Array:
    """x [..., in] times the int4 weight w uint4 [out, in] dequantized group by group with scale
    and zero [out, groups]; perm [in] reorders x's features first. Returns x's dtype."""
    if perm is not None:
        x = jnp.take(x, perm, axis=-1)
    out, inp = w.shape
    groups = scale.shape[1]
    q = w.reshape(out, groups, inp // groups).astype(x.dtype)
    deq = (q - zero.astype(x.dtype)[..., None]) * scale.astype(x.dtype)[..., None]
    y = jax.lax.dot_general(x, deq.reshape(out, inp), (((x.ndim - 1,), (1,)), ((), ())),
                            preferred_element_type=jnp.float32)
    return y.astype(x.dtype)


@functools.partial(jax.jit, static_argnames=("group_size",))
def quantize_int4(w: jax.Array, group_size: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """[in, out] -> (uint4 [out, in], scale [out, groups] in w's dtype, uint4 zero [out, groups]):
    round to nearest with each group's range [min(w, 0), max(w, 0)] over 16 levels. For weights
    that come without int4 scales (dummy weights measured at 4 bits): AWQ and GPTQ checkpoints
    bring their own."""
    wt = w.astype(jnp.float32).T
    out, inp = wt.shape
    g = wt.reshape(out, inp // group_size, group_size)
    lo, hi = jnp.minimum(g.min(-1), 0.0), jnp.maximum(g.max(-1), 0.0)
    scale = jnp.maximum(hi - lo, 1e-12) / 15
    zero = jnp.clip(jnp.round(-lo / scale), 0, 15)
    q = jnp.clip(jnp.round(g / scale[..., None]) + zero[..., None], 0, 15)
    return q.reshape(out, inp).astype(INT4), scale.astype(w.dtype), zero.astype(INT4)


def quantize_params(params: dict[str, Any], group_size: int = 128) -> dict[str, Any]:
    """A new params tree with every linear of QUANTIZED in the int4 layout (quantize_int4; one
    group per output channel where the input size is not a multiple of group_size)."""
    from jaxvllm.models.quant import QUANTIZED
    layers = []
    for lp in params["layers"]:
        lp = dict(lp)
        for name in QUANTIZED:
            if name in lp:
                w = lp.pop(name)
                group = group_size if w.shape[0] % group_size == 0 else w.shape[0]
                lp[name], lp[name + "_scale"], lp[name + "_zero"] = quantize_int4(w, group)
        layers.append(lp)
    return {**params, "layers": layers}
