"""FP8 weight GEMM for decode-sized batches (up to MAX_ROWS rows; Pallas Triton): the float8 e4m3
weight [N, K] is read at one byte a value and converted in registers; the activations stay in
their dtype (quantizing so few rows costs more kernels than the GEMM, bench/RESULTS.md, "FP8").

The program grid is int4_gemm.py's: a program owns `block_m` rows, `block_n` output columns and
one of `splits` equal slices of the input dimension, and writes its float32 partial sums; their
sum, the per-output-channel scale and the cast to x's dtype are left to XLA, which fuses them
into the consumer, or, through fp8_partials, to a kernel that adds them up itself
(decode_epilogue.py). Rows past M are masked, never padded in memory. Two ways to reduce a tile:
"dot" converts it to x's dtype and feeds the tensor cores (M padded to 16 in registers); "fma"
(one row) multiplies it by the row and keeps a [block_n, block_k] float32 sum that is reduced
once at the end, no tensor cores and no padded rows.
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

MAX_ROWS = 16    # the engine's Triton-GEMM decode buckets (config.TRITON_GEMM_MAX_TOKENS)
MIN_BLOCK_M = 16  # the tensor cores' smallest M
MODES = ("dot", "fma")


@dataclasses.dataclass(frozen=True)
class Tiles:
    block_n: int = 64
    block_k: int = 256
    splits: Optional[int] = None  # None: _splits()
    mode: str = "dot"             # "fma": one row only
    num_warps: int = 4
    num_stages: int = 3


def fits(n: int, k: int, tiles: Tiles = Tiles()) -> bool:
    return n % tiles.block_n == 0 and k % tiles.block_k == 0


def one_row_tiles(n: int, k: int) -> Optional[Tiles]:
    """The tiling for one row of x against an [n, k] weight, as measured fastest at the 8B shapes on
    an H200 (bench/RESULTS.md, "FP8"): 32 output columns a program, 128 inputs a step for wide
    weights (256 for the others; less where that does not divide k), input slices until there
    are about 512 programs (at most 8), and 8 warps with 256-input steps (4 otherwise: 8 were
    9-11% faster there and 39% slower with 128). None where the sizes do not tile."""
    block_k = next((b for b in ((128, 64) if n >= 8192 else (256, 128, 64)) if k % b == 0), None)
    if n % 32 or block_k is None:
        return None
    steps, splits = k // block_k, 1
    while n // 32 * splits < 512 and splits < 8 and steps % (2 * splits) == 0:
        splits *= 2
    return Tiles(block_n=32, block_k=block_k, splits=splits, mode="fma",
                 num_warps=8 if block_k == 256 else 4)


def _splits(n: int, k: int, tiles: Tiles) -> int:
    """Enough input slices for about two programs per SM of an H100/H200 (132 SMs), each slice a
    whole number of tiles."""
    steps, programs = k // tiles.block_k, n // tiles.block_n
    want = max(1, -(-264 // programs))
    return max(s for s in range(1, steps + 1) if steps % s == 0 and s <= want)


def fp8_matmul(x: jax.Array, w: jax.Array, scale: jax.Array, *, tiles: Tiles = Tiles(),
               interpret: bool = False) -> jax.Array:
    """x [M, K] (M <= MAX_ROWS) times the FP8 weight w [N, K] with its per-output-channel scale
    [N] -> [M, N] in x's dtype, float32 accumulation."""
    partials = fp8_partials(x, w, tiles=tiles, interpret=interpret)
    return (partials.sum(0) * scale).astype(x.dtype)


def fp8_partials(x: jax.Array, w: jax.Array, *, tiles: Tiles = Tiles(),
                 interpret: bool = False) -> jax.Array:
    """fp8_matmul's float32 partial sums [splits, M, N], one for each slice of K, before the
    scale: for a consumer that adds them up itself (decode_epilogue.py)."""
    m, k = x.shape
    n = w.shape[0]
    if m > MAX_ROWS or not fits(n, k, tiles) or tiles.mode not in MODES or (
            tiles.mode == "fma" and m != 1):
        raise ValueError(f"fp8_matmul: {m} rows, N {n}, K {k} do not fit {tiles} (rows <= "
                         f"{MAX_ROWS}, N and K multiples of the tiles, mode 'fma' for one row)")
    splits = tiles.splits or _splits(n, k, tiles)
    steps = k // tiles.block_k
    if steps % splits:
        raise ValueError(f"fp8_matmul: {splits} splits do not divide {steps} steps of the input")
    bm = 1 if tiles.mode == "fma" else MIN_BLOCK_M
    kernel = functools.partial(_fma_kernel if tiles.mode == "fma" else _dot_kernel,
                               block_m=bm, block_n=tiles.block_n, block_k=tiles.block_k,
                               steps=steps // splits)
    return split_k_call(
        kernel, (x, w), [pl.BlockSpec((m, k), lambda i, j: (0, 0)),
                         pl.BlockSpec((tiles.block_n, k), lambda i, j: (i, 0))],
        grid=(n // tiles.block_n, splits), m=m, n=n, splits=splits, tiles=tiles,
        interpret=interpret, name="fp8_matmul")


def _dot_kernel(x_ref, w_ref, o_ref, *, block_m, block_n, block_k, steps):
    first = pl.program_id(1) * steps
    rows = pl.ds(0, block_m)
    live = lambda cols: lax.broadcasted_iota(jnp.int32, (block_m, cols), 0) < x_ref.shape[0]  # noqa: E731

    def k_step(i, acc):
        k0 = pl.multiple_of((first + i) * block_k, block_k)
        x = plgpu.load(x_ref.at[rows, pl.ds(k0, block_k)], mask=live(block_k), other=0)
        w = w_ref[:, pl.ds(k0, block_k)].astype(x_ref.dtype)  # [block_n, block_k]: exact
        return acc + plgpu.dot(x, w, trans_b=True)

    acc = lax.fori_loop(0, steps, k_step, jnp.zeros((block_m, block_n), jnp.float32))
    plgpu.store(o_ref.at[pl.program_id(1), rows, pl.ds(pl.program_id(0) * block_n, block_n)],
                acc, mask=live(block_n))


def _fma_kernel(x_ref, w_ref, o_ref, *, block_m, block_n, block_k, steps):
    del block_m  # one row
    first = pl.program_id(1) * steps

    def k_step(i, acc):
        k0 = pl.multiple_of((first + i) * block_k, block_k)
        x = x_ref[0, pl.ds(k0, block_k)].astype(jnp.float32)
        return acc + w_ref[:, pl.ds(k0, block_k)].astype(jnp.float32) * x[None, :]

    acc = lax.fori_loop(0, steps, k_step, jnp.zeros((block_n, block_k), jnp.float32))
    o_ref[pl.program_id(1), 0, pl.ds(pl.program_id(0) * block_n, block_n)] = acc.sum(1)
