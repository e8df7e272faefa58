"""Batch-invariant GEMM (Pallas Triton): x [M, K] @ w with each row's sums in an order that does not
depend on M, for batch-invariant mode on the GPU (models/layers.matmul).

XLA and cuBLAS choose a GEMM's algorithm, tiling and split over K by its shape, so a row's result
changes with the number of rows beside it. The mode's portable form runs the rows in fixed tiles
of 16, each tile a GEMM of its own (`lax.map`): every tile reads the whole weight again, one launch
after another (3-8x XLA's GEMM at 128 rows on an H200, bench/RESULTS.md). Here one launch covers
every tile: a program owns `rows` rows (rows past M masked, never read), `block_n` output
columns and one of `splits` equal slices of K, walks its slice in `block_k` steps in order on the
tensor cores (a row's products do not depend on the other rows of its tile) and writes its float32
partial sums; the slices are then added left to right. Tiles and splits depend on N and K only,
so each row's arithmetic is the same whatever M is. Row tiles vary fastest in the grid, so the
programs reading one weight tile run together and the later ones find it in the L2.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.triton_rows import split_k_call

@dataclasses.dataclass(frozen=True)
class Tiles:
    rows: int = 64  # a row tile (16 and 32 took 1.5-2.4x as long at 128 rows, bench/RESULTS.md)
    block_n: int = 64
    block_k: int = 64
    target_programs: int = 264  # about two a streaming multiprocessor of an H100/H200 (132)
    max_splits: int = 8
    num_warps: int = 4
    num_stages: int = 3


def fits(k: int, n: int, tiles: Tiles = Tiles()) -> bool:
    return n % tiles.block_n == 0 and k % tiles.block_k == 0


def splits_for(k: int, n: int, tiles: Tiles = Tiles()) -> int:
    """Slices of K: enough programs per row tile to fill the GPU, from N and K alone."""
    steps, col_tiles = k // tiles.block_k, n // tiles.block_n
    want = min(tiles.max_splits, max(1, -(-tiles.target_programs // col_tiles)))
    return max(s for s in range(1, want + 1) if steps % s == 0)


def invariant_matmul(x: jax.Array, w: jax.Array, *, w_transposed: bool = False,
                     tiles: Tiles = Tiles(), interpret: bool = False) -> jax.Array:
    """x [M, K] @ w [K, N] (or, `w_transposed`, x @ w.T for w [N, K]) -> float32 [M, N]."""
    m, k = x.shape
    n = w.shape[0] if w_transposed else w.shape[1]
    bn, bk = tiles.block_n, tiles.block_k
    if w.shape[1 if w_transposed else 0] != k or not fits(k, n, tiles):
        raise ValueError(f"invariant_matmul: x {x.shape} and w {w.shape} (w_transposed="
                         f"{w_transposed}) do not fit: K a multiple of {bk}, N of {bn}")
    splits = splits_for(k, n, tiles)
    partials = split_k_call(
        functools.partial(_kernel, steps=k // bk // splits, rows=tiles.rows, block_k=bk,
                          transposed=w_transposed), (x, w),
        [pl.BlockSpec((m, k), lambda r, i, j: (0, 0)),
         pl.BlockSpec((bn, k), lambda r, i, j: (i, 0)) if w_transposed else
         pl.BlockSpec((k, bn), lambda r, i, j: (0, i))],
        grid=(-(-m // tiles.rows), n // bn, splits), m=m, n=n, splits=splits, tiles=tiles,
        interpret=interpret, name="invariant_matmul")
    out = partials[0]
    for p in partials[1:]:  # left to right: XLA does not reorder float adds
        out = out + p
    return out


def _kernel(x_ref, w_ref, o_ref, *, steps, rows, block_k, transposed):
    r0 = pl.program_id(0) * rows
    tile = pl.ds(r0, rows)
    first = pl.program_id(2) * steps

    def live(cols: int) -> jax.Array:  # [rows, cols]: which rows are < M
        return r0 + lax.broadcasted_iota(jnp.int32, (rows, cols), 0) < x_ref.shape[0]

    def k_step(i, acc):
        k0 = pl.multiple_of((first + i) * block_k, block_k)
        x = plgpu.load(x_ref.at[tile, pl.ds(k0, block_k)], mask=live(block_k), other=0)
        if transposed:
            return acc + plgpu.dot(x, w_ref[:, pl.ds(k0, block_k)], trans_b=True)
        return acc + plgpu.dot(x, w_ref[pl.ds(k0, block_k), :])

    block_n = w_ref.shape[0 if transposed else 1]
    acc = lax.fori_loop(0, steps, k_step, jnp.zeros((rows, block_n), jnp.float32))
    plgpu.store(o_ref.at[pl.program_id(2), tile, pl.ds(pl.program_id(1) * block_n, block_n)],
                acc, mask=live(block_n))
