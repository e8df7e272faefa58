"""Helpers shared by the Pallas Triton kernels: whole-array BlockSpecs (the kernels index their
refs themselves), masked row gathers and scatters that also work in interpret mode, and the tiling
and launch of the GEMMs that split K into slices."""
from __future__ import annotations

import jax
from jax import lax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

# The grouped-weight GEMMs (int4_gemm.py, int8_gemm.py): row tiles of at least the tensor cores'
# 16 (fewer rows are masked), column tiles of at least 32.
MIN_BLOCK_M = 16
MIN_BLOCK_N = 32
# Input slices: measured on an H200 at the 8B shapes (bench/RESULTS.md, "int4"), the fastest
# tilings gave each program 512-900 inputs (8 slices of 4096, 16 of 14336), more programs than SMs.
MIN_SLICE = 512
MAX_SPLITS = 16


def load_rows(ref, rows, row_valid, interpret):
    """Masked row gather: ref[rows[m]] where row_valid[m], zeros elsewhere. The zeros come with the
    load (as Triton's `other`), not from a select on the loaded tile: with the select, the decode
    kernel over a bf16 cache took 2-20% longer, even where its masked loop never ran (bench/RESULTS.md,
    "V masked by its load")."""
    shape = (rows.shape[0], ref.shape[-1])
    mask = jnp.broadcast_to(row_valid[:, None], shape)
    zeros = jnp.zeros(shape, ref.dtype)   # a typed `other`: a Python 0 does not lower for FP8
    if interpret:
        # Interpret mode only discharges masked loads whose indices are all arrays.
        cols = lax.broadcasted_iota(jnp.int32, (1, shape[1]), 1)
        return plgpu.load(ref.at[rows[:, None], cols], mask=mask, other=zeros)
    return plgpu.load(ref.at[rows, :], mask=mask, other=zeros)


def store_rows(ref, rows, val, row_valid, interpret):
    """Masked row scatter: ref[rows[m]] = val[m] where row_valid[m]."""
    if interpret:
        # Masked-off lanes are written back with their old value in interpret
        # mode, so they must not alias a real row: send them to the spare last row.
        rows = jnp.where(row_valid, rows, ref.shape[0] - 1)
    if val.ndim == 1:
        plgpu.store(ref.at[rows], val, mask=row_valid)
    elif interpret:
        # Interpret mode only discharges masked stores whose indices are all arrays.
        cols = lax.broadcasted_iota(jnp.int32, (1, val.shape[1]), 1)
        plgpu.store(ref.at[rows[:, None], cols], val,
                    mask=jnp.broadcast_to(row_valid[:, None], val.shape))
    else:
        plgpu.store(ref.at[rows, :], val,
                    mask=jnp.broadcast_to(row_valid[:, None], val.shape))


def full_spec(shape, squeeze_axis=None, grid_axis=None):
    """BlockSpec covering a whole array, optionally squeezing one axis to a grid index."""
    if squeeze_axis is None:
        return pl.BlockSpec(shape, lambda *_: (0,) * len(shape))
    block = tuple(None if a == squeeze_axis else d for a, d in enumerate(shape))

    def index_map(*ids):
        return tuple(ids[grid_axis] if a == squeeze_axis else 0 for a in range(len(shape)))
    return pl.BlockSpec(block, index_map)


def split_k_call(kernel, args, in_specs, *, grid, m, n, splits, tiles, interpret, name):
    """A GEMM kernel whose programs each write one slice of K's float32 partial sums into
    [splits, m, n] (the whole output is every program's block: they index it themselves);
    `tiles` gives num_warps and num_stages. Returns the partials for the caller to add."""
    return pl.pallas_call(
        kernel, grid=grid, in_specs=in_specs,
        out_specs=pl.BlockSpec((splits, m, n), lambda *_: (0, 0, 0)),
        out_shape=jax.ShapeDtypeStruct((splits, m, n), jnp.float32),
        compiler_params=None if interpret else plgpu.CompilerParams(
            num_warps=tiles.num_warps, num_stages=tiles.num_stages),
        interpret=interpret, name=name,
    )(*args)


def input_splits(m: int, k: int, groups: int, partial_share: int) -> int:
    """The most slices of K, up to MAX_SPLITS, each a whole number of groups and at least
    MIN_SLICE inputs, whose float32 partial sums keep splits * m <= k / partial_share (one slice
    where none does)."""
    return max(s for s in range(1, min(groups, MAX_SPLITS) + 1)
               if groups % s == 0 and (k // s >= MIN_SLICE and s * m <= k // partial_share
                                       or s == 1))


def grouped_tiles(m: int, n: int, k: int, groups: int, tiles, partial_share: int,
                  name: str) -> tuple[int, int, int]:
    """(block_m, block_n, splits) of a grouped-weight GEMM of m rows, N n, K k in `groups` groups:
    at most tiles.block_m rows (fewer rows take the next power of two from MIN_BLOCK_M),
    tiles.block_n columns where it divides n (else MIN_BLOCK_N), tiles.splits or input_splits()."""
    bm = min(tiles.block_m, max(MIN_BLOCK_M, 1 << (m - 1).bit_length()))
    bn = next(d for d in (tiles.block_n, MIN_BLOCK_N) if n % d == 0)
    splits = tiles.splits or input_splits(m, k, groups, partial_share)
    if groups % splits:
        raise ValueError(f"{name}: {splits} splits do not divide {groups} groups")
    return bm, bn, splits


def f16_rows(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x [M, K] as float16 for a GEMM in float16 pairs, each row scaled by a power of two that
    brings its largest magnitude into [2**13, 2**14) (far from float16's 65504 whatever x's range;
    a bf16 x exactly, but for values below 2**-27 of their row's largest, float16 subnormals), and
    the scales' exponents [M, 1]: the GEMM's output times 2**-exponent is x's."""
    _, e = jnp.frexp(jnp.max(jnp.abs(x.astype(jnp.float32)), axis=1, keepdims=True))
    shift = (14 - e).astype(jnp.float32)
    return (x.astype(jnp.float32) * jnp.exp2(shift)).astype(jnp.float16), shift
