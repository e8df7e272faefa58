"""FP8 weight GEMM for decode-sized batches (up to MAX_ROWS rows; Pallas Triton): the float8 e4m3
weight [N, K] is read at one byte a value and converted in registers; the activations stay in
their dtype (quantizing so few rows costs more kernels than the GEMM, bench/RESULTS.md, "FP8").

The program grid is int4_gemm.py's: a program owns `block_m` rows, `block_n` output columns and
one of `splits` equal slices of the input dimension, and writes its float32 partial sums; their
sum, the per-output-channel scale and the cast to x's dtype are left to XLA, which fuses them
into the consumer, or, through fp8_partials, to a kernel that adds them up itself
(decode_epilogue.py), or at one row to the GEMM's own last programs (fp8_row_add_norm: the
residual add, with the next RMSNorm finished in the next GEMM's prologue, fp8_row_norm_partials).
Rows past M are masked, never padded in memory. Two ways to reduce a tile: "dot" converts it to
x's dtype and feeds the tensor cores (M padded to 16 in registers); "fma" (one row) multiplies it
by the row and keeps a [block_n, block_k] float32 sum that is reduced once at the end, no tensor
cores and no padded rows.
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

from pallas_kernels.decode_epilogue import slices_total
from pallas_kernels.triton_rows import split_k_call

MAX_ROWS = 16    # the engine's Triton-GEMM decode buckets (config.TRITON_GEMM_MAX_TOKENS)
MIN_BLOCK_M = 16  # the tensor cores' smallest M
MODES = ("dot", "fma")
ROW_BLOCK_N = 32  # one-row tiles' output columns a program


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
    if n % ROW_BLOCK_N or block_k is None:
        return None
    steps, splits = k // block_k, 1
    while n // ROW_BLOCK_N * splits < 512 and splits < 8 and steps % (2 * splits) == 0:
        splits *= 2
    return Tiles(block_n=ROW_BLOCK_N, block_k=block_k, splits=splits, mode="fma",
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


def _fma_kernel(x_ref, w_ref, *refs, block_m, block_n, block_k, steps, eps=None, splits=None,
                interpret=False):
    """One row. `eps`: x is the residual stream, normed here (refs start with its block sums of
    squares and the norm's weight: the weight on the inputs, the factor on the sums); `splits`:
    the tail of fp8_row_add_norm (refs then hold the scale, the residual stream and the counters
    in, and the new stream, its block sums of squares and the counters out after the
    partials)."""
    del block_m
    refs = list(refs)
    if eps is not None:
        ssq_ref, g_ref = refs.pop(0), refs.pop(0)
        factor = lax.rsqrt(jnp.sum(ssq_ref[...]) / x_ref.shape[1] + eps)
    if splits is not None:
        scale_ref, res_ref, _ = refs.pop(0), refs.pop(0), refs.pop(0)
    o_ref = refs.pop(0)
    first = pl.program_id(1) * steps
    dtype = x_ref.dtype

    def k_step(i, acc):
        k0 = pl.multiple_of((first + i) * block_k, block_k)
        x = x_ref[0, pl.ds(k0, block_k)].astype(jnp.float32)
        if eps is not None:  # the norm's weight here, its factor on the sums (fewer instructions)
            x = x * g_ref[pl.ds(k0, block_k)].astype(jnp.float32)
        return acc + w_ref[:, pl.ds(k0, block_k)].astype(jnp.float32) * x[None, :]

    acc = lax.fori_loop(0, steps, k_step, jnp.zeros((block_n, block_k), jnp.float32))
    col = pl.program_id(0)
    cols = pl.ds(col * block_n, block_n)
    o_ref[pl.program_id(1), 0, cols] = acc.sum(1) if eps is None else acc.sum(1) * factor
    if splits is None:
        return
    x_out, ssq_out, count_ref = refs
    # The last of the column block's programs to finish adds up its slices: a barrier so that
    # every thread's store precedes the count (acquire-release at GPU scope), then the count.
    if interpret:  # the programs one after another; a scalar index does not discharge
        seen = plgpu.atomic_add(count_ref, pl.ds(col, 1), jnp.ones((1,), jnp.int32))[0]
    else:  # a scalar: one thread counts and every thread gets what it saw (a vector's would not)
        plgpu.debug_barrier()
        seen = plgpu.atomic_add(count_ref, col, 1)

    @pl.when(seen == splits - 1)
    def _tail():
        y = slices_total(o_ref, scale_ref, 0, cols, dtype)
        new = (res_ref[0, cols].astype(jnp.float32) + y).astype(dtype)
        x_out[0, cols] = new
        new = new.astype(jnp.float32)
        ssq_out[pl.ds(col, 1)] = jnp.broadcast_to(jnp.sum(new * new), (1,))
        count_ref[pl.ds(col, 1)] = jnp.zeros((1,), jnp.int32)  # ready for the next call


def _row_call(x, w, extra, out_shape, aliases, *, tiles, interpret, name, **kw):
    """A one-row launch of _fma_kernel on one_row_tiles' `tiles` with `extra` inputs after x and w
    and `out_shape` outputs (the partials first), all whole-array blocks."""
    n, k = w.shape
    if x.shape != (1, k):
        raise ValueError(f"{name}: x {x.shape} is not one row of the weight's {k} inputs")
    kernel = functools.partial(_fma_kernel, block_m=1, block_n=tiles.block_n,
                               block_k=tiles.block_k, steps=k // tiles.block_k // tiles.splits,
                               interpret=interpret, **kw)
    whole = [pl.BlockSpec(a.shape, lambda i, j, nd=a.ndim: (0,) * nd) for a in (x, *extra)]
    return pl.pallas_call(
        kernel, grid=(n // tiles.block_n, tiles.splits),
        in_specs=[whole[0], pl.BlockSpec((tiles.block_n, k), lambda i, j: (i, 0)), *whole[1:]],
        out_specs=[pl.BlockSpec(o.shape, lambda i, j, nd=len(o.shape): (0,) * nd)
                   for o in out_shape],
        out_shape=out_shape, input_output_aliases=aliases,
        compiler_params=None if interpret else plgpu.CompilerParams(
            num_warps=tiles.num_warps, num_stages=tiles.num_stages),
        interpret=interpret, name=name,
    )(x, w, *extra)


def fp8_row_add_norm(y_in: jax.Array, w: jax.Array, scale: jax.Array, residual: jax.Array,
                     counts: jax.Array, *, interpret: bool = False
                     ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One row's FP8 GEMM y_in [1, K] times w [N, K] with its scale [N], added to the residual
    stream [1, N]: (the new stream in its dtype, the sums of squares of its blocks of columns
    [N / ROW_BLOCK_N] float32, counts). The last program of each column block adds the block's
    slices (its tail: no kernel after the GEMM); `counts` [N / ROW_BLOCK_N] int32 zeros, their
    buffer taken and returned zeroed for the next call (thread one array through a step). The
    next RMSNorm is left to fp8_row_norm_partials."""
    n, k = w.shape
    tiles = one_row_tiles(n, k)
    if tiles is None or residual.shape != (1, n) or counts.shape != (n // tiles.block_n,):
        raise ValueError(f"fp8_row_add_norm: weight {w.shape}, residual {residual.shape}, counts "
                         f"{counts.shape}: needs a one-row tiling, [1, N] and a count a block")
    out_shape = [jax.ShapeDtypeStruct((tiles.splits, 1, n), jnp.float32),
                 jax.ShapeDtypeStruct((1, n), residual.dtype),
                 jax.ShapeDtypeStruct(counts.shape, jnp.float32),
                 jax.ShapeDtypeStruct(counts.shape, jnp.int32)]
    _, new, ssq, counts = _row_call(
        y_in.astype(residual.dtype), w, [scale.astype(jnp.float32), residual, counts], out_shape,
        {4: 3}, tiles=tiles, interpret=interpret, name="fp8_row_add_norm", splits=tiles.splits)
    return new, ssq, counts


def fp8_row_norm_partials(x: jax.Array, ssq: jax.Array, norm_weight: jax.Array, eps: float,
                          w: jax.Array, *, interpret: bool = False) -> jax.Array:
    """fp8_partials of rms_norm(x) * norm_weight for one row of the residual stream x [1, K] whose
    squares come summed by blocks of columns (ssq, from fp8_row_add_norm): each program takes the
    norm's weight in its prologue and the row's factor on its sums, in float32 (models/layers'
    rms_norm rounds the normed row and its product with the weight to x's dtype; dropping those
    two roundings took 0.3 µs a call off gate+up on an H100)."""
    n, k = w.shape
    tiles = one_row_tiles(n, k)
    if tiles is None or norm_weight.shape != (k,) or ssq.shape != (k // ROW_BLOCK_N,):
        raise ValueError(f"fp8_row_norm_partials: weight {w.shape}, norm weight "
                         f"{norm_weight.shape}, ssq {ssq.shape}: needs a one-row tiling, [K] and "
                         f"a sum a block of {ROW_BLOCK_N} inputs")
    out_shape = [jax.ShapeDtypeStruct((tiles.splits, 1, n), jnp.float32)]
    return _row_call(x, w, [ssq, norm_weight], out_shape, {}, tiles=tiles, interpret=interpret,
                     name="fp8_row_norm_matmul", eps=float(eps))[0]
