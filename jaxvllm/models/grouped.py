"""The choice every grouped-integer linear makes (models/int4.py, models/int8.py): its Pallas GEMM
for decode-sized batches where the engine allows Pallas GEMMs (ModelConfig.pallas_gemms: the weights
on one GPU) and the kernel's tiles fit; XLA's dequantize-then-multiply (the kernel's jnp reference,
which GSPMD partitions under tensor parallelism) otherwise."""
from __future__ import annotations

from types import ModuleType
from typing import Callable

import jax


def grouped_linear(x: jax.Array, gemm: ModuleType, kernel: Callable, reference: Callable,
                   w: jax.Array, scale: jax.Array, *rest: jax.Array,
                   pallas: bool = False) -> jax.Array:
    """x [..., in] times the weight w [out, ...] with scale [groups, out] (and `rest`, e.g. the
    offsets) through `kernel` (of the Pallas module `gemm`: its MAX_ROWS and fits()) where
    `pallas` allows it, else `reference`, both called as f(x [M, in], w, scale, *rest). Returns
    [..., out]."""
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    n = w.shape[0]
    fast = pallas and x2.shape[0] <= gemm.MAX_ROWS and gemm.fits(n, k, k // scale.shape[0])
    return (kernel if fast else reference)(x2, w, scale, *rest).reshape(*lead, n)
