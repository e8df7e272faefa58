"""int8 weights with a scale per output channel and group of inputs (W8A16: a GGUF's Q8_0
projections, `quantization="gguf"`): each linear weight kept at a byte a value, dequantized to the
activations' dtype as the layer runs.

Layout (beside the weight `<name>`; converters/gguf_quant.py writes it): `<name>` int8 [out, in]
(the format's signed bytes as they are) and `<name>_scale` float32 [groups, out] (its float16
scales, exact), group-major as the int4 layout's (models/int4.py): w = q * scale. No other weight
of any layout is int8.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import int8_gemm, int8_matmul, int8_matmul_reference

INT8 = jnp.int8


def int8_linear(x: jax.Array, w: jax.Array, scale: jax.Array) -> jax.Array:
    """x [..., in] times the int8 weight (w [out, in], scale [groups, out]). Decode-sized batches on
    the GPU run the Pallas GEMM (the weight read at a byte a value); others dequantize, then
    multiply. Returns x's dtype."""
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    if (jax.default_backend() == "gpu" and x2.shape[0] <= int8_gemm.MAX_ROWS
            and int8_gemm.fits(w.shape[0], k, k // scale.shape[0])):
        y = int8_matmul(x2, w, scale)
    else:
        y = int8_matmul_reference(x2, w, scale)
    return y.reshape(*lead, w.shape[0])
