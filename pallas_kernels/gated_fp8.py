"""A gated MLP's activation between FP8 GEMMs, in one pass over the gate and up outputs (Pallas
Triton): the gate and up GEMMs' unscaled outputs in, the down GEMM's FP8 input and its per-row
scale out.

An FP8 MLP quantizes act(gate) * up per row for the down projection (models/quant.py). XLA does
that in two passes over the gate and up outputs, one for each row's largest magnitude and one to
scale and convert, since a fusion cannot consume its own reduction: at 16,384 tokens of the 8B
shape, 1.37 ms a layer (bench/RESULTS.md, "FP8 GEMM outputs in bf16"). Here a program owns one
row and holds it in registers, act(gate) * up computed once: each output is read once.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.reference import FP8, FP8_MAX, GATED_ACTIVATIONS, MIN_AMAX
from pallas_kernels.triton_rows import full_spec

MAX_CHUNK = 2048
MIN_CHUNK = 128
MAX_COLUMNS = 32768  # a row in the registers of 32 warps, 32 float32 values a thread


def chunk_size(n: int) -> Optional[int]:
    """The columns loaded at a time: the largest power of two up to MAX_CHUNK that divides n; None
    where none of at least MIN_CHUNK does or n is past MAX_COLUMNS (the caller stays on XLA)."""
    c = MAX_CHUNK
    while c >= MIN_CHUNK and n % c:
        c //= 2
    return c if c >= MIN_CHUNK and n <= MAX_COLUMNS else None


def num_warps(n: int) -> int:
    """About 32 of a row's values a thread (4 warps at least)."""
    return max(4, min(32, 1 << max(0, math.ceil(math.log2(n / 1024)))))


def gated_fp8(gate: jax.Array, up: Optional[jax.Array], row_scale: jax.Array,
              gate_scale: jax.Array, up_scale: Optional[jax.Array], *, activation: str = "silu",
              warps: Optional[int] = None, interpret: bool = False
              ) -> tuple[jax.Array, jax.Array]:
    """gate, up [T, N] (the GEMMs' outputs before their scales), row_scale [T, 1] (their input
    rows' scales), gate_scale and up_scale [N] (the weights' per-channel scales) ->
    (float8 e4m3 [T, N], float32 [T, 1]) with h = act(gate * row_scale * gate_scale) *
    (up * row_scale * up_scale) ~= q * s, each row's largest magnitude mapped to 448. float32
    arithmetic throughout (reference: gated_fp8_reference). `up` and `up_scale` None: gate and
    up come side by side, gate [T, 2N] and gate_scale [2N] (a fused gate+up GEMM's output,
    models/fused.py), each program reading its row's two halves. `warps`: default num_warps(N)."""
    fused = up is None
    t, n = gate.shape[0], gate.shape[1] // 2 if fused else gate.shape[1]
    chunk = chunk_size(n)
    if (chunk is None or activation not in GATED_ACTIVATIONS
            or (gate.shape[1] != 2 * n if fused else up.shape != gate.shape)):
        raise ValueError(f"gated_fp8: gate {gate.shape}, up {None if fused else up.shape}, "
                         f"activation {activation!r}: needs equal halves or shapes, N a multiple "
                         f"of {MIN_CHUNK} up to {MAX_COLUMNS}, one of {tuple(GATED_ACTIVATIONS)}")
    row = functools.partial(full_spec, squeeze_axis=0, grid_axis=0)
    if fused:  # the same arrays twice, as their halves: block (row, N) at column block 0 and 1
        halves = [pl.BlockSpec((None, n), lambda i, h=h: (i, h)) for h in (0, 1)]
        scales = [pl.BlockSpec((n,), lambda i, h=h: (h,)) for h in (0, 1)]
        up, up_scale = gate, gate_scale
    else:
        halves, scales = [row((t, n))] * 2, [full_spec((n,))] * 2
    kernel = functools.partial(_kernel, chunk=chunk, act=GATED_ACTIVATIONS[activation])
    return pl.pallas_call(
        kernel, grid=(t,),
        in_specs=[*halves, row((t, 1)), *scales],
        out_specs=[row((t, n)), row((t, 1))],
        out_shape=[jax.ShapeDtypeStruct((t, n), FP8), jax.ShapeDtypeStruct((t, 1), jnp.float32)],
        compiler_params=None if interpret else plgpu.CompilerParams(
            num_warps=warps or num_warps(n), num_stages=1),
        interpret=interpret, name="gated_fp8",
    )(gate, up, row_scale.astype(jnp.float32), gate_scale.astype(jnp.float32),
      up_scale.astype(jnp.float32))


def _kernel(g_ref, u_ref, rs_ref, gs_ref, us_ref, q_ref, s_ref, *, chunk, act):
    rs = rs_ref[...]  # [1]
    h = []
    for c in range(g_ref.shape[0] // chunk):  # unrolled: the row stays in registers
        cols = pl.ds(c * chunk, chunk)
        g = g_ref[cols].astype(jnp.float32) * (rs * gs_ref[cols])
        h.append(act(g) * (u_ref[cols].astype(jnp.float32) * (rs * us_ref[cols])))
    peak = functools.reduce(jnp.maximum, [jnp.abs(v) for v in h])
    scale = jnp.maximum(jnp.max(peak), MIN_AMAX) / FP8_MAX
    for c, v in enumerate(h):
        q_ref[pl.ds(c * chunk, chunk)] = jnp.clip(v / scale, -FP8_MAX, FP8_MAX).astype(FP8)
    s_ref[...] = jnp.full((1,), scale, jnp.float32)
