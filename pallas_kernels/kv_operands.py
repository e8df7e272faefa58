"""The tensor-core operand dtype of attention over a KV cache, one rule for both attention kernels
(the Triton launches of ragged_paged_attention and the Mosaic GPU prefill)."""
from __future__ import annotations

import jax.numpy as jnp

_F16_MAX = float(jnp.finfo(jnp.float16).max)


def compute_dtype(q_dtype, kv_dtype):
    """The dtype of the kernel's tensor-core operands: the query's, but f16 for an FP8 cache
    read by a 16-bit query. Hopper converts a pair of e4m3 values to f16 in one instruction and has
    none to bf16 (Triton goes through f16 and f32): decode over an FP8 cache read at 2.54 TB/s
    with f16 operands against 2.29 with bf16 (H200, 256 x 1536, 8B shape; bench/RESULTS.md, "FP8
    KV decode in f16"). e4m3 values are exact in f16; so is a bf16 query between f16's smallest
    normal (2^-14) and its largest (the kernel clips to that), and probabilities from 2^-14 to 1
    keep more bits in f16 than in bf16. Below 2^-14 f16 goes subnormal: query elements that small,
    and probabilities under 2^-24 (flushed to 0 in the P.V product while the row's sum still
    counts them), lose what bf16 would have kept, a change far below the FP8 cache's own rounding."""
    if jnp.dtype(kv_dtype).itemsize == 1 and jnp.dtype(q_dtype).itemsize == 2:
        return jnp.float16
    return q_dtype


def to_compute_dtype(q, cdt):
    """q in the operand dtype; into f16 clipped to its range (a query past it would be inf, and
    its products with the keys NaN)."""
    if q.dtype == cdt:
        return q
    q = q.astype(jnp.float32)
    return jnp.maximum(jnp.minimum(q, _F16_MAX), -_F16_MAX).astype(cdt)
