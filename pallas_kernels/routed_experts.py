"""Mixture-of-experts SwiGLU for a few rows that reads only the experts they picked (Pallas Triton).

Grouped GEMMs that tile every expert (XLA's ``ragged_dot``, JAX's Mosaic GPU ``ragged_dot_mgpu``)
stream weights for experts with no rows too, so a decode step of one token paid for all 128 of
Qwen3-30B-A3B's experts (bench/RESULTS.md, "Mixture of experts"). Here a program is one *picked*
expert times one column tile: the rows arrive sorted by expert (models/moe.py), the picked experts
are moved to the front of the grid and the programs past them exit at once, so the weights read
are those of the experts with rows, once per column tile.

Two launches: gate and up together (``act = silu(x @ Wg[e]) * (x @ Wu[e])``, f32 accumulation,
one pass over the rows for both), then down (``act @ Wd[e]``). Quantized experts are read as
stored, each tile dequantized in registers (weight-only: the rows stay in their dtype). FP8 experts
(models/quant.py: float8 e4m3 [E, in, out], a float32 scale per expert and output column): each
tile converted to the rows' dtype, each product scaled by its columns' scales. int4 experts
(models/int4.py: each expert in the packed layout of an int4 linear, uint8 [E, out, in/2], a scale
and an offset [E, groups, out] per group of inputs): a reduction step takes packed bytes of one
group and splits them into two tiles of weights, as pallas_kernels/int4_gemm.py does. int8
experts (models/int8.py's layout, [E, out, in], a scale and maybe a min [E, groups, out]): a
reduction step is one group, its bytes made weights as pallas_kernels/int8_gemm.py makes them.
Rows of one expert are taken ``bm`` at a time (tensor-core minimum 16); an expert with more rows
loops, re-reading its tiles from L2. Rows past ``sum(group_sizes)`` are not written (their values
are undefined): callers that pad mask them.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import int8_gemm
from pallas_kernels.int4_gemm import dequant_form, dequantize_tile, step_bytes
from pallas_kernels.triton_rows import full_spec, store_rows

INT4 = jnp.uint8  # a packed int4 weight's dtype
INT8 = jnp.int8


@dataclasses.dataclass(frozen=True)
class ExpertTiles:
    bm: int = 16         # rows per MMA (an expert's rows are walked bm at a time)
    bk: int = 128        # reduction step (int4 experts: int4_gemm.step_bytes of their groups)
    bn: int = 128        # output columns per program
    num_warps: int = 4
    num_stages: int = 3


# bench/RESULTS.md, "Mixture of experts": the best of 12 tilings on average over 1, 8 and 64
# tokens at Qwen3-30B-A3B's shapes on an H200 (within 1% of each token count's best).
GATE_UP_TILES = ExpertTiles()
DOWN_TILES = ExpertTiles()


Quant = Optional[tuple[tuple[jax.Array, ...], ...]]  # see routed_swiglu


def routed_swiglu(rows: jax.Array, group_sizes: jax.Array, w_gate: jax.Array, w_up: jax.Array,
                  w_down: jax.Array, quant: Quant = None, order: Optional[jax.Array] = None, *,
                  gate_up_tiles: ExpertTiles = GATE_UP_TILES, down_tiles: ExpertTiles = DOWN_TILES,
                  interpret: bool = False) -> jax.Array:
    """`rows` [N, H] sorted by expert, `group_sizes` [E] rows per expert, weights [E, H, I],
    [E, H, I], [E, I, H] -> [N, H], row n computed with its group's expert (an ExpertsFn,
    models/moe.py). `quant`: quantized weights' companions, one tuple per weight (gate, up, down):
    a float weight's (), FP8's (scale [E, out],), int4's (scale [E, groups, out], zero points or
    mins [E, groups, out]) with the weight packed [E, out, in/2], int8's (scale, and a min where
    it has one) with the weight [E, out, in]; gate and up in one format and groups. `order`
    [E, H] int32: the order gate's and up's inputs are stored in, expert by expert (GPTQ's
    activation order): each row's features gathered so first."""
    n = rows.shape[0]
    if not fits(w_gate, w_down, quant, gate_up_tiles, down_tiles):
        raise ValueError(f"routed_swiglu: experts {w_gate.shape} / {w_down.shape} "
                         f"({w_gate.dtype}) do not fit the tiles {gate_up_tiles}, {down_tiles}")
    if order is not None:
        rows = ordered_rows(rows, group_sizes, order)
    slots = min(w_gate.shape[0], n)  # at most this many experts have rows
    group_sizes = group_sizes.astype(jnp.int32)
    starts = jnp.cumsum(group_sizes) - group_sizes
    picked = jnp.argsort(group_sizes == 0, stable=True)[:slots].astype(jnp.int32)
    meta = (picked, starts[picked], group_sizes[picked])  # empty slots have size 0
    gate_q, up_q, down_q = ((),) * 3 if quant is None else quant
    act = _launch(meta, rows, (w_gate, w_up), (gate_q, up_q), gate_up_tiles, slots, interpret)
    return _launch(meta, act, (w_down,), (down_q,), down_tiles, slots, interpret)


def ordered_rows(rows: jax.Array, group_sizes: jax.Array, order: jax.Array) -> jax.Array:
    """rows [N, H] sorted by expert with each one's features in its expert's input order,
    order [E, H] (row n takes rows[n, order[e]] for its expert e; rows past every group, the
    last expert's)."""
    expert = jnp.searchsorted(jnp.cumsum(group_sizes), jnp.arange(rows.shape[0]), side="right")
    return jnp.take_along_axis(rows, order[jnp.minimum(expert, order.shape[0] - 1)], axis=1)


def fits(w_gate: jax.Array, w_down: jax.Array, quant: Quant = None,
         gate_up_tiles: ExpertTiles = GATE_UP_TILES, down_tiles: ExpertTiles = DOWN_TILES) -> bool:
    """Whether the kernel takes these experts (routed_swiglu's arguments): in each launch the
    column tiles divide the outputs (no ragged tiles) and the reduction steps the inputs, int4
    experts' steps (int4_gemm.step_bytes) at least 16 inputs (the tensor cores' minimum), int8
    experts' groups as the int8 GEMM takes them (int8_gemm.fits)."""
    gate_q, _, down_q = ((),) * 3 if quant is None else quant
    return (_launch_fits(w_gate, gate_q, gate_up_tiles)
            and _launch_fits(w_down, down_q, down_tiles))


def _launch_fits(w: jax.Array, companions: tuple[jax.Array, ...], tiles: ExpertTiles) -> bool:
    kind, cols, k = _kind(w)
    if kind == "float":
        return k % tiles.bk == 0 and cols % tiles.bn == 0
    group = k // companions[0].shape[1]
    steps_fit = step_bytes(group) >= 16 if kind == "int4" else int8_gemm.fits(cols, k, group)
    return k % group == 0 and cols % tiles.bn == 0 and steps_fit


def _kind(w: jax.Array) -> tuple[str, int, int]:
    """A launch's weights' kind ("float" for FP8 too, "int4", "int8") by the first weight, with
    its output columns and inputs."""
    if w.dtype == INT4:  # [E, cols, K/2]
        return "int4", w.shape[1], 2 * w.shape[2]
    if w.dtype == INT8:  # [E, cols, K]
        return "int8", w.shape[1], w.shape[2]
    return "float", w.shape[2], w.shape[1]  # [E, K, cols]


def _launch(meta, x, weights, quant, tiles: ExpertTiles, slots: int,
            interpret: bool) -> jax.Array:
    n, k = x.shape
    kind, cols, _ = _kind(weights[0])
    e, nb = weights[0].shape[0], cols // tiles.bn
    n_out = n + 1 if interpret else n  # interpret mode: a spare row for masked-off stores
    # The BlockSpecs hand each program its bn columns of every weight and companion: [E, K, cols]
    # -> [E, K, nb, bn] (integer [E, cols, K'] -> [E, nb, bn, K']), [..., cols] -> [..., nb, bn],
    # all free reshapes.
    if kind == "float":
        weights, w_axis = [w.reshape(e, k, nb, tiles.bn) for w in weights], 2
    else:
        weights, w_axis = [w.reshape(e, nb, tiles.bn, w.shape[2]) for w in weights], 1
    companions = [c.reshape(*c.shape[:-1], nb, tiles.bn) for q in quant for c in q]
    group = k // quant[0][0].shape[1] if kind != "float" else None
    # int4: how each weight's tiles are dequantized, by its offset (zero points or a min)
    forms = tuple(dequant_form(q[1].dtype, x.dtype) for q in quant) if kind == "int4" else None
    kernel = functools.partial(
        _kernel, bm=tiles.bm, bk=tiles.bk, kind=kind, group=group, forms=forms,
        counts=tuple(len(q) for q in quant), interpret=interpret)
    out = pl.pallas_call(
        kernel,
        grid=(slots, nb),
        in_specs=[full_spec(m.shape) for m in meta] + [full_spec(x.shape)]
        + [full_spec(w.shape, squeeze_axis=w_axis, grid_axis=1) for w in weights]
        + [full_spec(c.shape, squeeze_axis=c.ndim - 2, grid_axis=1) for c in companions],
        out_specs=full_spec((n_out, nb, tiles.bn), squeeze_axis=1, grid_axis=1),
        out_shape=jax.ShapeDtypeStruct((n_out, nb, tiles.bn), x.dtype),
        compiler_params=None if interpret else plgpu.CompilerParams(
            num_warps=tiles.num_warps, num_stages=tiles.num_stages),
        interpret=interpret,
        name=f"routed_experts_{'gate_up' if len(weights) == 2 else 'down'}",
    )(*meta, x, *weights, *companions)
    return out[:n].reshape(n, cols)


def _kernel(expert_ref, start_ref, size_ref, x_ref, *refs, bm, bk, kind, group, forms, counts,
            interpret):
    *in_refs, o_ref = refs
    w_refs, c_refs = in_refs[:len(counts)], in_refs[len(counts):]  # companions: quantized weights'
    ends = list(itertools.accumulate(counts))
    companions = [c_refs[end - c:end] for c, end in zip(counts, ends)]
    slot = pl.program_id(0)
    expert, start, size = expert_ref[slot], start_ref[slot], size_ref[slot]
    bn = o_ref.shape[1]
    asm = not interpret

    def float_step(rows, kk, accs):
        ks = pl.ds(pl.multiple_of(kk * bk, bk), bk)
        xv = x_ref[rows, ks]
        return tuple(acc + jnp.dot(xv, w[expert, ks, :].astype(xv.dtype),
                                   preferred_element_type=jnp.float32)
                     for acc, w in zip(accs, w_refs))

    def int4_step(rows, kk, accs):
        # Packed bytes j0.. of group g hold its inputs e0.. (low nibbles) and e0 + half.. (high).
        half, step = group // 2, step_bytes(group)
        j0 = pl.multiple_of(kk * step, step)
        g = j0 // half
        e0 = pl.multiple_of(g * group + (j0 - g * half), step)
        x_lo, x_hi = x_ref[rows, pl.ds(e0, step)], x_ref[rows, pl.ds(e0 + half, step)]
        out = []
        for acc, w, (scale, offset), form in zip(accs, w_refs, companions, forms):
            lo, hi = dequantize_tile(w[expert, :, pl.ds(j0, step)], scale[expert, g, :],
                                     offset[expert, g, :], x_lo.dtype, form, asm)
            out.append(acc + plgpu.dot(x_lo, lo, trans_b=True) + plgpu.dot(x_hi, hi, trans_b=True))
        return tuple(out)

    def int8_step(rows, g, accs):  # one group of inputs a step
        ks = pl.ds(pl.multiple_of(g * group, group), group)
        xv = x_ref[rows, ks]
        out = []
        for acc, w, (scale, *mn) in zip(accs, w_refs, companions):
            wt = int8_gemm.dequantize_tile(w[expert, :, ks], scale[expert, g, :],
                                           mn[0][expert, g, :] if mn else None, "convert",
                                           xv.dtype, asm)
            out.append(acc + plgpu.dot(xv, wt, trans_b=True))
        return tuple(out)

    if kind == "int4":
        n_steps, step = x_ref.shape[1] // 2 // step_bytes(group), int4_step
    elif kind == "int8":
        n_steps, step = x_ref.shape[1] // group, int8_step
    else:
        n_steps, step = x_ref.shape[1] // bk, float_step

    def row_tile(r, carry):
        offs = r * bm + lax.iota(jnp.int32, bm)
        valid = offs < size
        rows = jnp.where(valid, start + offs, 0)
        zeros = tuple(jnp.zeros((bm, bn), jnp.float32) for _ in w_refs)
        accs = lax.fori_loop(0, n_steps, functools.partial(step, rows), zeros)
        if kind == "float" and counts[0]:  # FP8: each column's scale
            accs = tuple(acc * c[0][expert, :][None, :] for acc, c in zip(accs, companions))
        out = jax.nn.silu(accs[0]) * accs[1] if len(accs) == 2 else accs[0]
        store_rows(o_ref, rows, out.astype(o_ref.dtype), valid, interpret)
        return carry

    lax.fori_loop(0, pl.cdiv(size, bm), row_tile, 0)
