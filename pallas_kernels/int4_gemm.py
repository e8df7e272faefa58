"""int4 weight GEMM for decode-sized batches (up to MAX_ROWS rows; Pallas Triton): the weight is
read at 4 bits and dequantized in registers, tile by tile.

XLA fuses an int4 dequantization into a one-row GEMV but, from a few rows up, writes the whole
dequantized bf16 weight to memory before the GEMM (bench/RESULTS.md, "int4"): four times the bytes
the weight holds, read and written again every step. Here a program owns `block_m` rows,
`block_n` output columns and one of `splits` equal slices of the input dimension: it loads a
[block_n, step] tile of packed bytes, splits each byte's two 4-bit values, dequantizes them
(q * scale + min, one multiply-add) and feeds both halves to the tensor cores against the matching
input columns. Splitting the input dimension is what fills the GPU: a decode GEMV has too few
output tiles to keep enough loads in flight (bench/RESULTS.md). Each slice writes its float32
partial sums; their sum and the cast to x's dtype are left to XLA, which fuses them into the
consumer. Rows past M are masked, neither padded in memory nor written: the kernel is the GEMM's
only launch (padding, zeroing an atomic accumulator and casting it cost a kernel each, more than
the GEMM at decode sizes).

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

from pallas_kernels.triton_rows import split_k_call

MIN_BLOCK_M = 16  # the tensor cores' smallest M: a tile of fewer rows masks the rest
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
# Partial sums cost splits * M * N * 4 bytes written and read again: at most an eighth of the
# weight's N * K / 2 bytes, so splits * M <= K / 64 (fewer splits as the rows grow).
PARTIAL_SHARE = 64


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


def _splits(m: int, k: int, groups: int) -> int:
    """The most input slices, up to MAX_SPLITS, each a whole number of groups and at least
    MIN_SLICE inputs, whose partial sums stay within PARTIAL_SHARE."""
    return max(s for s in range(1, min(groups, MAX_SPLITS) + 1)
               if groups % s == 0 and (k // s >= MIN_SLICE and s * m <= k // PARTIAL_SHARE
                                       or s == 1))


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
    bn = next(d for d in (tiles.block_n, MIN_BLOCK_N) if n % d == 0)
    splits = tiles.splits or _splits(m, k, groups)
    if groups % splits:
        raise ValueError(f"int4_matmul: {splits} splits do not divide {groups} groups")
    step = _step(group)
    kernel = functools.partial(_kernel, group=group, step=step, block_m=bm, block_n=bn,
                               steps=(k // 2) // splits // step)
    partials = split_k_call(
        kernel, (x, w, scale, mn),
        [pl.BlockSpec((m, k), lambda r, i, j: (0, 0)),
         pl.BlockSpec((bn, k // 2), lambda r, i, j: (i, 0)),
         pl.BlockSpec((groups, bn), lambda r, i, j: (0, i)),
         pl.BlockSpec((groups, bn), lambda r, i, j: (0, i))],
        # Row tiles vary fastest: the programs that read one weight tile run together and the
        # later ones find it in the L2.
        grid=(-(-m // bm), n // bn, splits), m=m, n=n, splits=splits, tiles=tiles,
        interpret=interpret, name="int4_matmul")
    return partials.sum(0).astype(x.dtype)


def _kernel(x_ref, w_ref, s_ref, m_ref, o_ref, *, group, step, block_m, block_n, steps):
    half = group // 2
    dtype = x_ref.dtype
    first = pl.program_id(2) * steps
    r0 = pl.program_id(0) * block_m
    rows = pl.ds(r0, block_m)

    def live(cols: int) -> jax.Array:  # [block_m, cols]: which rows are < M
        return r0 + lax.broadcasted_iota(jnp.int32, (block_m, cols), 0) < x_ref.shape[0]

    def x_tile(e0):  # [block_m, step]; rows past M read as 0, never from memory
        return plgpu.load(x_ref.at[rows, pl.ds(e0, step)], mask=live(step), other=0)

    def k_step(i, acc):
        j0 = pl.multiple_of((first + i) * step, step)       # packed byte column
        g = j0 // half                                       # its group
        e0 = pl.multiple_of(g * group + (j0 - g * half), step)  # the low half's first input
        packed = w_ref[:, pl.ds(j0, step)]                  # [BN, step]
        scale = s_ref[g, :].astype(jnp.float32)[:, None]
        mn = m_ref[g, :].astype(jnp.float32)[:, None]
        lo = ((packed & 15).astype(jnp.float32) * scale + mn).astype(dtype)
        hi = ((packed >> 4).astype(jnp.float32) * scale + mn).astype(dtype)
        acc += plgpu.dot(x_tile(e0), lo, trans_b=True)
        return acc + plgpu.dot(x_tile(e0 + half), hi, trans_b=True)

    acc = lax.fori_loop(0, steps, k_step, jnp.zeros((block_m, block_n), jnp.float32))
    plgpu.store(o_ref.at[pl.program_id(2), rows, pl.ds(pl.program_id(1) * block_n, block_n)],
                acc, mask=live(block_n))
