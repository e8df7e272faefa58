"""Helpers shared by the Pallas Triton kernels: whole-array BlockSpecs (the kernels index their
refs themselves), masked row gathers and scatters that also work in interpret mode, and the launch
of the GEMMs that split K into slices."""
from __future__ import annotations

import jax
from jax import lax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu


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
