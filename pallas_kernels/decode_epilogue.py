"""Epilogues of a one-row decode step's quantized GEMMs (Pallas Triton): the GEMM's split-K
partial sums consumed by the kernel that needs their total, in place of an XLA kernel that adds
them up and more that read the total.

At batch 1 a decode step of the 8B shape spends ~0.5 ms on small XLA kernels beside its GEMMs,
1-2 µs each, mostly launch and ramp rather than bytes (bench/RESULTS.md, "FP8 q/k/v and gate/up
fused at load"). Two epilogues take the ones around the GEMMs whose outputs are split:
- add_rms_norm: a GEMM's output (o's, down's) added to the residual stream, then the next
  RMSNorm: the slices' sum, the scale, the residual add and the norm in one program a row
  (XLA: the sum, then the add and norm).
- rope_write_kv: a fused q+k+v GEMM's output: query heads rotated (RoPE) and returned, key heads
  rotated and value heads written into their cache slots, in place, one program a head (XLA: the
  sum, the query's rotation, a scatter for the keys and one for the values).
Values are rounded where the model's XLA path rounds them: the GEMM's output to the model's dtype
first. References of the same signatures: reference.add_rms_norm_reference and
reference.rope_write_kv_reference.
"""
from __future__ import annotations

import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.reference import FP8, FP8_MAX
from pallas_kernels.triton_rows import full_spec


# One program holds a row: more warps keep more of its loads in flight. FP8's four one-row slices
# of 4096: 1.97 µs of GPU time at 32 warps, 2.24 at 16, 2.72 at 8; a whole bf16 output 1.45-1.48
# at any (H100, bench/epilogues.py).
ADD_NORM_WARPS = 32


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def add_norm_fits(hidden: int) -> bool:
    """Whether add_rms_norm takes rows of `hidden` values (Triton's vectors: a power of two)."""
    return _pow2(hidden)


def rope_fits(head_dim: int) -> bool:
    """Whether rope_write_kv takes heads of `head_dim` (two halves, each a power of two)."""
    return head_dim >= 2 and _pow2(head_dim)


def slices_total(p_ref, s_ref, row, cols, dtype):
    """The GEMM's output at `row`, columns `cols`: its slices summed, scaled, in float32 holding
    the value rounded to `dtype` (the GEMM's output dtype)."""
    acc = p_ref[0, row, cols].astype(jnp.float32)
    for s in range(1, p_ref.shape[0]):
        acc += p_ref[s, row, cols].astype(jnp.float32)
    if s_ref is not None:
        acc = acc * s_ref[cols]
    return acc.astype(dtype).astype(jnp.float32)


def add_rms_norm(x: jax.Array, partials: jax.Array, scale: Optional[jax.Array],
                 weight: jax.Array, eps: float, *, warps: int = ADD_NORM_WARPS,
                 interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """x [T, H] (the residual stream), partials [S, T, H] (a GEMM's split-K slices before its
    scale, or its whole output as one slice), scale [H] or None, weight [H] (the norm's) ->
    (x + y, rms_norm(x + y) * weight), y the GEMM's output in x's dtype; the norm as
    models/layers.rms_norm computes it. One program a row, `warps` warps."""
    t, h = x.shape
    if partials.shape[1:] != x.shape or not add_norm_fits(h) or weight.shape != (h,):
        raise ValueError(f"add_rms_norm: x {x.shape}, partials {partials.shape}, weight "
                         f"{weight.shape}: needs partials [S, T, H] for x [T, H], H a power of two")
    args = [x, partials, weight] + (
        [] if scale is None else [scale.astype(jnp.float32)])
    out_dtype = jnp.result_type(weight.dtype, x.dtype)
    kernel = functools.partial(_add_norm_kernel, eps=eps, scaled=scale is not None)
    return pl.pallas_call(
        kernel, grid=(t,), in_specs=[full_spec(a.shape) for a in args],
        out_specs=[full_spec(x.shape)] * 2,
        out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct(x.shape, out_dtype)],
        compiler_params=None if interpret else plgpu.CompilerParams(num_warps=warps,
                                                                    num_stages=1),
        interpret=interpret, name="add_rms_norm",
    )(*args)


def _add_norm_kernel(x_ref, p_ref, w_ref, *refs, eps, scaled):
    s_ref = refs[0] if scaled else None
    x_out, h_out = refs[-2:]
    row, cols = pl.program_id(0), pl.ds(0, x_ref.shape[1])
    dtype = x_ref.dtype
    y = slices_total(p_ref, s_ref, row, cols, dtype)
    x32 = (x_ref[row, cols].astype(jnp.float32) + y).astype(dtype).astype(jnp.float32)
    normed = x32 * lax.rsqrt(jnp.sum(x32 * x32) / x_ref.shape[1] + eps)
    x_out[row, cols] = x32.astype(dtype)
    h_out[row, cols] = (w_ref[cols].astype(jnp.float32)
                        * normed.astype(dtype).astype(jnp.float32)).astype(h_out.dtype)


def rope_write_kv(partials: jax.Array, scale: Optional[jax.Array], cos: jax.Array,
                  sin: jax.Array, slot_mapping: jax.Array, k_cache: jax.Array,
                  v_cache: jax.Array, *, num_heads: int, dtype: Any, interpret: bool = False
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """partials [S, T, (num_heads + 2 * kv_heads) * D] (a fused q+k+v GEMM's split-K slices before
    its scale [N] or None, or its whole output as one slice), cos and sin [T, D]
    (models/layers.rope_cos_sin, all of each head rotated), slot_mapping [T] (each token's flat cache slot; one past the cache: padding),
    k_cache and v_cache [blocks, block_size, kv_heads, D] -> (q [T, num_heads, D] in `dtype`,
    rotated; the caches with each token's rotated key and its value written at its slot, in
    place: the caches are the outputs' buffers). An FP8 cache takes the values saturated to e4m3."""
    s, t, n = partials.shape
    blocks, block_size, kv_heads, d = k_cache.shape
    heads = num_heads + 2 * kv_heads
    if (n != heads * d or not rope_fits(d) or cos.shape != (t, d) or sin.shape != (t, d)
            or v_cache.shape != k_cache.shape or slot_mapping.shape != (t,)):
        raise ValueError(f"rope_write_kv: partials {partials.shape}, cos {cos.shape}, sin "
                         f"{sin.shape}, slots {slot_mapping.shape}, caches {k_cache.shape} "
                         f"{v_cache.shape}: needs N = (num_heads + 2 kv_heads) * D, D / 2 a "
                         f"power of two, cos and sin [T, D]")
    args = [partials, cos.astype(jnp.float32), sin.astype(jnp.float32),
            slot_mapping.astype(jnp.int32), k_cache, v_cache] + (
        [] if scale is None else [scale.astype(jnp.float32)])
    kernel = functools.partial(_rope_kernel, num_heads=num_heads, dtype=dtype,
                               scaled=scale is not None)
    return pl.pallas_call(
        kernel, grid=(t, heads), in_specs=[full_spec(a.shape) for a in args],
        out_specs=[full_spec((t, num_heads, d)), full_spec(k_cache.shape),
                   full_spec(v_cache.shape)],
        out_shape=[jax.ShapeDtypeStruct((t, num_heads, d), dtype),
                   jax.ShapeDtypeStruct(k_cache.shape, k_cache.dtype),
                   jax.ShapeDtypeStruct(v_cache.shape, v_cache.dtype)],
        input_output_aliases={4: 1, 5: 2},
        compiler_params=None if interpret else plgpu.CompilerParams(num_warps=1, num_stages=1),
        interpret=interpret, name="rope_write_kv",
    )(*args)


def _rope_kernel(p_ref, cos_ref, sin_ref, slot_ref, _k_in, _v_in, *refs, num_heads, dtype,
                 scaled):
    s_ref = refs[0] if scaled else None
    q_out, k_out, v_out = refs[-3:]
    blocks, block_size, kv_heads, d = k_out.shape
    half = d // 2
    tok, head = pl.program_id(0), pl.program_id(1)
    lo_cols, hi_cols = pl.ds(head * d, half), pl.ds(head * d + half, half)
    lo = slices_total(p_ref, s_ref, tok, lo_cols, dtype)
    hi = slices_total(p_ref, s_ref, tok, hi_cols, dtype)
    # As layers.apply_rope: cos and sin in the model's dtype, rotate-half.
    trig = [r[tok, pl.ds(c, half)].astype(dtype).astype(jnp.float32)
            for r in (cos_ref, sin_ref) for c in (0, half)]
    rotate = head < num_heads + kv_heads  # query and key heads; value heads pass as they are
    lo, hi = (jnp.where(rotate, lo * trig[0] - hi * trig[2], lo),
              jnp.where(rotate, hi * trig[1] + lo * trig[3], hi))

    @pl.when(head < num_heads)
    def _query():
        q_out[tok, head, pl.ds(0, half)] = lo.astype(dtype)
        q_out[tok, head, pl.ds(half, half)] = hi.astype(dtype)

    slot = slot_ref[tok]
    cached = (slot >= 0) & (slot < blocks * block_size)  # padding's slots are past the cache
    block, offset = slot // block_size, slot % block_size

    def write(ref, kv_head):
        for cols, val in ((pl.ds(0, half), lo), (pl.ds(half, half), hi)):
            val = val.astype(dtype).astype(jnp.float32)
            if ref.dtype == FP8:
                val = jnp.clip(val, -FP8_MAX, FP8_MAX)
            ref[block, offset, kv_head, cols] = val.astype(ref.dtype)

    @pl.when(cached & (head >= num_heads) & (head < num_heads + kv_heads))
    def _key():
        write(k_out, head - num_heads)

    @pl.when(cached & (head >= num_heads + kv_heads))
    def _value():
        write(v_out, head - num_heads - kv_heads)
