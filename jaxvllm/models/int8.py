"""int8 weights with a scale (and a min) per output channel and group of inputs (W8A16: a GGUF's
Q5_0, Q5_1, Q5_K, Q6_K and Q8_0 projections, `quantization="gguf"`): each linear weight kept at a
byte a value, dequantized to the activations' dtype as the layer runs.

Layout (beside the weight `<name>`; converters/gguf_quant.py writes it): `<name>` int8 [out, in]
(the format's integer values: Q8_0's signed bytes, Q6_K's q - 32, ...), `<name>_scale` float32
[groups, out] (the format's scales or their products, exact) and, for the formats with a min
(Q5_1, Q5_K), `<name>_min` float32 [groups, out]: w = q * scale (+ min). Group-major as the int4
layout's (models/int4.py). No other weight of any layout is int8.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from jaxvllm.models.grouped import grouped_linear
from pallas_kernels import int8_gemm, int8_matmul, int8_matmul_reference

INT8 = jnp.int8


def int8_linear(x: jax.Array, w: jax.Array, scale: jax.Array,
                mn: Optional[jax.Array] = None) -> jax.Array:
    """x [..., in] times the int8 weight (w [out, in], scale and the min `mn` (or None) [groups,
    out]). Decode-sized batches on the GPU run the Pallas GEMM (the weight read at a byte a
    value); others dequantize, then multiply. Returns x's dtype."""
    return grouped_linear(x, int8_gemm, int8_matmul, int8_matmul_reference, w, scale, mn)
