"""int4 weight GEMM for decode-sized batches (up to MAX_ROWS rows; Pallas Triton): the weight is
read at 4 bits and dequantized in registers, tile by tile.

XLA fuses an int4 dequantization into a one-row GEMV but, from a few rows up, writes the whole
dequantized bf16 weight to memory before the GEMM (bench/RESULTS.md, "int4"): four times the bytes
the weight holds, read and written again every step. Here a program owns `block_m` rows,
`block_n` output columns and one of `splits` equal slices of the input dimension: it loads a
[block_n, step] tile of packed bytes, splits each byte's two 4-bit values, dequantizes them
(q * scale + min, one multiply-add) and feeds both halves to the tensor cores against the matching
input columns; the slices' partial sums meet in a float32 output by atomic adds. Splitting the input dimension is what fills the GPU:
a decode GEMV has too few output tiles to keep enough loads in flight (bench/RESULTS.md).

Packed layout (models/int4.py): w uint8 [N, K/2]; within each group of `group` inputs, byte j holds
input j in its low 4 bits and input j + group/2 in its high 4 bits, so the two halves of a tile are
two contiguous slices of x and no value needs moving between lanes. scale and min [G, N] (float32)
are stored group-major so a program reads a contiguous row of each per group.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

MIN_BLOCK_M = 16  # the tensor cores' smallest M: fewer rows are padded to it
# Larger batches take the dequantize-then-GEMM path (models/int4.py): each row tile dequantizes
# the whole weight again, and from 128 rows that cost more than XLA's dequantization written once
# (H200, 8B shapes; bench/RESULTS.md, "int4").
MAX_ROWS = 64
MIN_BLOCK_N = 32
MAX_STEP = 64    # packed bytes per reduction step (2 x 64 inputs)
# Input slices: measured on an H200 at the 8B shapes (bench/RESULTS.md, "int4"), the fastest
# tilings gave each program 512-900 inputs (8 slices of 4096, 16 of 14336), more programs than SMs.
MIN_SLICE = 512
MAX_SPLITS = 16


@dataclasses.dataclass(frozen=True)
class Tiles:
    block_m: int = 32              # at most: fewer rows take the next power of two (>= 16)
    block_n: int = 64
    splits: Optional[int] = None   # None: _splits()
    num_warps: int = 4
    num_stages: int = 3


def fits(n: int, k: int, group: int) -> bool:
    """Whether the kernel's tiles divide these sizes: N by the smallest column tile, and each half
    group (the bytes of a group) by a reduction step of at least 16 inputs (the tensor cores'
    minimum) and a power of two (Triton's tiles are)."""
    return n % MIN_BLOCK_N == 0 and group % 2 == 0 and k % group == 0 and _step(group) >= 16


def _step(group: int) -> int:
    half = group // 2
    step = min(half, MAX_STEP)
    return step if half % step == 0 and step & (step - 1) == 0 else 0


def _splits(k: int, groups: int) -> int:
    """The most input slices, up to MAX_SPLITS, each a whole number of groups and at least
    MIN_SLICE inputs."""
    return max(s for s in range(1, min(groups, MAX_SPLITS) + 1)
               if groups % s == 0 and (k // s >= MIN_SLICE or s == 1))


def int4_matmul(x: jax.Array, w: jax.Array, scale: jax.Array, mn: jax.Array, *,
                tiles: Tiles = Tiles(), interpret: bool = False) -> jax.Array:
    """x [M, K] (M <= MAX_ROWS) times the packed int4 weight (w uint8 [N, K/2], scale and min
    [G, N]) -> [M, N] in x's dtype, float32 accumulation."""
    m, k = x.shape
    n = w.shape[0]
    groups = scale.shape[0]
    group = k // groups
    if m > MAX_ROWS or not fits(n, k, group):
        raise ValueError(f"int4_matmul: {m} rows, N {n}, K {k}, group {group} do not fit the "
                         f"kernel (rows <= {MAX_ROWS}, N % {MIN_BLOCK_N}, a half group of >= 16 "
                         f"inputs)")
    bm = min(tiles.block_m, max(MIN_BLOCK_M, 1 << (m - 1).bit_length()))
    mp = -(-m // bm) * bm
    bn = max(d for d in (tiles.block_n, 64, MIN_BLOCK_N) if n % d == 0)
    splits = tiles.splits or _splits(k, groups)
    if groups % splits:
        raise ValueError(f"int4_matmul: {splits} splits do not divide {groups} groups")
    step = _step(group)
    xp = jnp.zeros((mp, k), x.dtype).at[:m].set(x)
    kernel = functools.partial(_kernel, group=group, step=step,
                               steps=(k // 2) // splits // step)
    out = pl.pallas_call(
        kernel,
        # Row tiles vary fastest: the programs that read one weight tile run together and the
        # later ones find it in the L2.
        grid=(mp // bm, n // bn, splits),
        in_specs=[pl.BlockSpec((bm, k), lambda r, i, j: (r, 0)),
                  pl.BlockSpec((bn, k // 2), lambda r, i, j: (i, 0)),
                  pl.BlockSpec((groups, bn), lambda r, i, j: (0, i)),
                  pl.BlockSpec((groups, bn), lambda r, i, j: (0, i)),
                  pl.BlockSpec((bm, bn), lambda r, i, j: (r, i))],
        out_specs=pl.BlockSpec((bm, bn), lambda r, i, j: (r, i)),
        out_shape=jax.ShapeDtypeStruct((mp, n), jnp.float32),
        input_output_aliases={4: 0},
        compiler_params=None if interpret else plgpu.CompilerParams(
            num_warps=tiles.num_warps, num_stages=tiles.num_stages),
        interpret=interpret,
        name="int4_matmul",
    )(xp, w, scale, mn, jnp.zeros((mp, n), jnp.float32))
    return out[:m].astype(x.dtype)


def _kernel(x_ref, w_ref, s_ref, m_ref, _, o_ref, *, group, step, steps):
    half = group // 2
    dtype = x_ref.dtype
    first = pl.program_id(2) * steps

    def k_step(i, acc):
        j0 = pl.multiple_of((first + i) * step, step)       # packed byte column
        g = j0 // half                                       # its group
        e0 = pl.multiple_of(g * group + (j0 - g * half), step)  # the low half's first input
        packed = w_ref[:, pl.ds(j0, step)]                  # [BN, step]
        scale = s_ref[g, :].astype(jnp.float32)[:, None]
        mn = m_ref[g, :].astype(jnp.float32)[:, None]
        lo = ((packed & 15).astype(jnp.float32) * scale + mn).astype(dtype)
        hi = ((packed >> 4).astype(jnp.float32) * scale + mn).astype(dtype)
        acc += plgpu.dot(x_ref[:, pl.ds(e0, step)], lo, trans_b=True)
        return acc + plgpu.dot(x_ref[:, pl.ds(e0 + half, step)], hi, trans_b=True)

    acc = lax.fori_loop(0, steps, k_step, jnp.zeros(o_ref.shape, jnp.float32))
    plgpu.atomic_add(o_ref, (slice(None), slice(None)), acc)
