"""int4 weight GEMM for decode-sized batches (Pallas Triton): the weight is read once, at 4 bits,
and dequantized in registers, tile by tile.

XLA fuses an int4 dequantization into a one-row GEMV but, from a few rows up, writes the whole
dequantized bf16 weight to memory before the GEMM (bench/RESULTS.md, "int4"): four times the bytes
the weight holds, read and written again every step. Here a program owns BN output columns and
walks the input dimension: it loads a [BN, step] tile of packed bytes, splits each byte's two 4-bit
values, subtracts the group's zero, multiplies by its scale, and feeds both halves to the tensor
cores against the matching input columns. Not yet timed on a GPU: with one program per BN columns
the narrow projections (k and v at the 8B shape: 8 programs) may not fill the SMs; splitting the
input dimension over programs is the first thing to measure.

Packed layout (models/int4.py): w uint8 [N, K/2]; within each group of `group` inputs, byte j holds
input j in its low 4 bits and input j + group/2 in its high 4 bits, so the two halves of a tile are
two contiguous slices of x and no value needs moving between lanes. scale [G, N] (x's dtype) and
zero uint8 [G, N] are stored group-major so a program reads a contiguous row of each per group.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

BM = 16          # rows per MMA: the batch is padded to this
MAX_ROWS = BM    # larger batches take the dequantize-then-GEMM path (models/int4.py)
BN = 128         # output columns per program
MAX_STEP = 64    # packed bytes per reduction step (2 x 64 inputs)


def fits(n: int, k: int, group: int) -> bool:
    """Whether the kernel's tiles divide these sizes: N by BN, and each half group (the bytes of a
    group) by a reduction step of at least 16 inputs (the tensor cores' minimum) and a power of
    two (Triton's tiles are)."""
    return n % BN == 0 and group % 2 == 0 and k % group == 0 and _step(group) >= 16


def _step(group: int) -> int:
    half = group // 2
    step = min(half, MAX_STEP)
    return step if half % step == 0 and step & (step - 1) == 0 else 0


def int4_matmul(x: jax.Array, w: jax.Array, scale: jax.Array, zero: jax.Array, *,
                interpret: bool = False) -> jax.Array:
    """x [M, K] (M <= MAX_ROWS) times the packed int4 weight (w uint8 [N, K/2], scale [G, N],
    zero uint8 [G, N]) -> [M, N] in x's dtype, float32 accumulation."""
    m, k = x.shape
    n = w.shape[0]
    groups = scale.shape[0]
    group = k // groups
    if m > MAX_ROWS or not fits(n, k, group):
        raise ValueError(f"int4_matmul: {m} rows, N {n}, K {k}, group {group} do not fit the "
                         f"kernel (rows <= {MAX_ROWS}, N % {BN}, a half group of >= 16 inputs)")
    xp = jnp.zeros((BM, k), x.dtype).at[:m].set(x)
    kernel = functools.partial(_kernel, group=group, step=_step(group))
    out = pl.pallas_call(
        kernel,
        grid=(n // BN,),
        in_specs=[pl.BlockSpec((BM, k), lambda i: (0, 0)),
                  pl.BlockSpec((BN, k // 2), lambda i: (i, 0)),
                  pl.BlockSpec((groups, BN), lambda i: (0, i)),
                  pl.BlockSpec((groups, BN), lambda i: (0, i))],
        out_specs=pl.BlockSpec((BM, BN), lambda i: (0, i)),
        out_shape=jax.ShapeDtypeStruct((BM, n), x.dtype),
        compiler_params=None if interpret else plgpu.CompilerParams(num_warps=4, num_stages=3),
        interpret=interpret,
        name="int4_matmul",
    )(xp, w, scale, zero)
    return out[:m]


def _kernel(x_ref, w_ref, s_ref, z_ref, o_ref, *, group, step):
    half = group // 2
    dtype = x_ref.dtype

    def k_step(i, acc):
        j0 = pl.multiple_of(i * step, step)          # packed byte column
        g = j0 // half                               # its group
        e0 = pl.multiple_of(g * group + (j0 - g * half), step)  # the low half's first input
        packed = w_ref[:, pl.ds(j0, step)].astype(jnp.int32)     # [BN, step]
        scale = s_ref[g, :].astype(jnp.float32)[:, None]
        zero = z_ref[g, :].astype(jnp.float32)[:, None]
        lo = (((packed & 15).astype(jnp.float32) - zero) * scale).astype(dtype)
        hi = (((packed >> 4).astype(jnp.float32) - zero) * scale).astype(dtype)
        acc += plgpu.dot(x_ref[:, pl.ds(e0, step)], lo, trans_b=True)
        return acc + plgpu.dot(x_ref[:, pl.ds(e0 + half, step)], hi, trans_b=True)

    steps = w_ref.shape[1] // step
    acc = lax.fori_loop(0, steps, k_step, jnp.zeros((BM, o_ref.shape[1]), jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)
