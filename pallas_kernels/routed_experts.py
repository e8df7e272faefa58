"""Mixture-of-experts SwiGLU for a few rows that reads only the experts they picked (Pallas Triton).

Grouped GEMMs that tile every expert (XLA's ``ragged_dot``, JAX's Mosaic GPU ``ragged_dot_mgpu``)
stream weights for experts with no rows too, so a decode step of one token paid for all 128 of
Qwen3-30B-A3B's experts (bench/RESULTS.md, "Mixture of experts"). Here a program is one *picked*
expert times one column tile: the rows arrive sorted by expert (models/moe.py), the picked experts
are moved to the front of the grid and the programs past them exit at once, so the weights read
are those of the experts with rows, once per column tile.

Two launches: gate and up together (``act = silu(x @ Wg[e]) * (x @ Wu[e])``, f32 accumulation,
one pass over the rows for both), then down (``act @ Wd[e]``). FP8 experts (models/quant.py:
float8 e4m3 weights, a float32 scale per expert and output column) are read as stored, each tile
converted to the rows' dtype in registers, and each product scaled by its columns' scales
(weight-only: the rows stay in their dtype). Rows of one expert are taken
``bm`` at a time (tensor-core minimum 16); an expert with more rows loops, re-reading its tiles
from L2. Rows past ``sum(group_sizes)`` are not written (their values are undefined): callers
that pad mask them.
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

from pallas_kernels.triton_rows import full_spec, store_rows


@dataclasses.dataclass(frozen=True)
class ExpertTiles:
    bm: int = 16         # rows per MMA (an expert's rows are walked bm at a time)
    bk: int = 128        # reduction step
    bn: int = 128        # output columns per program
    num_warps: int = 4
    num_stages: int = 3


# bench/RESULTS.md, "Mixture of experts": the best of 12 tilings on average over 1, 8 and 64
# tokens at Qwen3-30B-A3B's shapes on an H200 (within 1% of each token count's best).
GATE_UP_TILES = ExpertTiles()
DOWN_TILES = ExpertTiles()


def routed_swiglu(rows: jax.Array, group_sizes: jax.Array, w_gate: jax.Array, w_up: jax.Array,
                  w_down: jax.Array, scales: Optional[tuple[jax.Array, jax.Array, jax.Array]] = None,
                  *, gate_up_tiles: ExpertTiles = GATE_UP_TILES,
                  down_tiles: ExpertTiles = DOWN_TILES, interpret: bool = False) -> jax.Array:
    """`rows` [N, H] sorted by expert, `group_sizes` [E] rows per expert, weights [E, H, I],
    [E, H, I], [E, I, H] -> [N, H], row n computed with its group's expert (an ExpertsFn,
    models/moe.py). `scales`: FP8 weights' scales [E, I], [E, I], [E, H]."""
    n, h = rows.shape
    e, _, i = w_gate.shape
    if not fits(h, i, gate_up_tiles, down_tiles):
        raise ValueError(f"routed_swiglu: hidden {h} / intermediate {i} do not divide the tiles "
                         f"{gate_up_tiles}, {down_tiles}")
    slots = min(e, n)  # at most this many experts have rows
    group_sizes = group_sizes.astype(jnp.int32)
    starts = jnp.cumsum(group_sizes) - group_sizes
    picked = jnp.argsort(group_sizes == 0, stable=True)[:slots].astype(jnp.int32)
    meta = (picked, starts[picked], group_sizes[picked])  # empty slots have size 0
    gate_scale, up_scale, down_scale = (None,) * 3 if scales is None else scales
    act = _launch(meta, rows, (w_gate, w_up), (gate_scale, up_scale), gate_up_tiles, slots,
                  interpret)
    return _launch(meta, act, (w_down,), (down_scale,), down_tiles, slots, interpret)


def fits(hidden: int, intermediate: int, gate_up_tiles: ExpertTiles = GATE_UP_TILES,
         down_tiles: ExpertTiles = DOWN_TILES) -> bool:
    """Whether the tiles divide these sizes (the kernel has no ragged column or K tiles)."""
    return (hidden % gate_up_tiles.bk == 0 and intermediate % gate_up_tiles.bn == 0
            and intermediate % down_tiles.bk == 0 and hidden % down_tiles.bn == 0)


def _launch(meta, x, weights, scales, tiles: ExpertTiles, slots: int,
            interpret: bool) -> jax.Array:
    n, k = x.shape
    e, _, cols = weights[0].shape
    nb = cols // tiles.bn
    n_out = n + 1 if interpret else n  # interpret mode: a spare row for masked-off stores
    # [E, K, cols] -> [E, K, nb, bn] is free; the BlockSpec hands each program its bn columns.
    weights = [w.reshape(e, k, nb, tiles.bn) for w in weights]
    scales = [s.reshape(e, nb, tiles.bn) for s in scales if s is not None]
    kernel = functools.partial(_kernel, bm=tiles.bm, bk=tiles.bk, n_weights=len(weights),
                               interpret=interpret)
    out = pl.pallas_call(
        kernel,
        grid=(slots, nb),
        in_specs=[full_spec(m.shape) for m in meta] + [full_spec(x.shape)]
        + [full_spec(w.shape, squeeze_axis=2, grid_axis=1) for w in weights]
        + [full_spec(s.shape, squeeze_axis=1, grid_axis=1) for s in scales],
        out_specs=full_spec((n_out, nb, tiles.bn), squeeze_axis=1, grid_axis=1),
        out_shape=jax.ShapeDtypeStruct((n_out, nb, tiles.bn), x.dtype),
        compiler_params=None if interpret else plgpu.CompilerParams(
            num_warps=tiles.num_warps, num_stages=tiles.num_stages),
        interpret=interpret,
        name=f"routed_experts_{'gate_up' if len(weights) == 2 else 'down'}",
    )(*meta, x, *weights, *scales)
    return out[:n].reshape(n, cols)


def _kernel(expert_ref, start_ref, size_ref, x_ref, *refs, bm, bk, n_weights, interpret):
    *in_refs, o_ref = refs
    w_refs, s_refs = in_refs[:n_weights], in_refs[n_weights:]  # scales: FP8 weights only
    slot = pl.program_id(0)
    expert, start, size = expert_ref[slot], start_ref[slot], size_ref[slot]
    bn = o_ref.shape[1]

    def row_tile(r, carry):
        offs = r * bm + lax.iota(jnp.int32, bm)
        valid = offs < size
        rows = jnp.where(valid, start + offs, 0)

        def k_step(kk, accs):
            ks = pl.ds(pl.multiple_of(kk * bk, bk), bk)
            xv = x_ref[rows, ks]
            return tuple(acc + jnp.dot(xv, w[expert, ks, :].astype(xv.dtype),
                                       preferred_element_type=jnp.float32)
                         for acc, w in zip(accs, w_refs))

        zeros = tuple(jnp.zeros((bm, bn), jnp.float32) for _ in w_refs)
        accs = lax.fori_loop(0, x_ref.shape[1] // bk, k_step, zeros)
        if s_refs:
            accs = tuple(acc * s[expert, :][None, :] for acc, s in zip(accs, s_refs))
        out = jax.nn.silu(accs[0]) * accs[1] if len(accs) == 2 else accs[0]
        store_rows(o_ref, rows, out.astype(o_ref.dtype), valid, interpret)
        return carry

    lax.fori_loop(0, pl.cdiv(size, bm), row_tile, 0)
