"""int8 weight GEMM with a scale (and a min) per output channel and group of inputs (W8A16: a
GGUF's 5- to 8-bit projections, `quantization="gguf"`; Pallas Triton), which the engine runs for
decode-sized batches (up to MAX_ROWS rows): the weight is read at a byte a value and dequantized
in registers, group by group.

XLA writes the dequantized bf16 weight to memory before its GEMM whatever the batch (its GEMM does
not take group scales into its tiles: 400-490 us for an 8B layer's linears on an H200 at 1 to 256
rows, bench/RESULTS.md, "GGUF Q8_0 on the GPU"), three times the bytes the weight holds. Here a
program owns `block_m` rows, `block_n` output columns and one of `splits` equal slices of the
input dimension, as in the int4 GEMM (int4_gemm.py): it loads a [block_n, group] tile of bytes,
turns them into float32 (_to_float), multiplies each column by its group's scale (and adds its
min), rounds the result to x's dtype (the weight a load in that dtype would hold) and feeds it to
the tensor cores against the group's input columns; `groups_per_step` groups a loop step. Each
slice writes its float32 partial sums; XLA adds them and casts to x's dtype, fused into the
consumer. Rows past M are masked, neither padded in memory nor written.

Layout (models/int8.py): w int8 [N, K]; scale and the optional min float32 [G, N], group-major, so
a program reads a contiguous row of each per group.
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

from pallas_kernels.triton_rows import MIN_BLOCK_N, grouped_tiles, split_k_call

# Rows up to which the engine takes this kernel (models/int8.py; beyond, XLA dequantizes once
# and multiplies): the int4 GEMM's measured bound (int4_gemm.MAX_ROWS), until this one's sweep
# (bench/quant_gemm.py --sweep, which also times more rows) says otherwise.
MAX_ROWS = 64
MAX_GROUP = 256   # a group is one dot's reduction: [block_n, group] bytes in registers
# Float32 partial sums of at most an eighth of the weight's N * K bytes: splits * M <= K / 32
# (the int4 GEMM's budget, int4_gemm.PARTIAL_SHARE, for a weight of twice its bytes).
PARTIAL_SHARE = 32


@dataclasses.dataclass(frozen=True)
class Tiles:
    block_m: int = 32              # at most: fewer rows take the next power of two (>= 16)
    block_n: int = 64
    groups_per_step: int = 2       # at most: the largest that divides a slice's groups
    splits: Optional[int] = None   # None: triton_rows.input_splits()
    num_warps: int = 4
    num_stages: int = 3
    dequant: str = "convert"       # how a byte becomes a float: _to_float


def default_tiles(m: int) -> Tiles:
    """The engine's tiling for m rows: two warps a program up to 8 rows, four from 16 (the int4
    GEMM's measured choice, int4_gemm.default_tiles; this kernel's own sweep is
    `bench/quant_gemm.py --sweep`)."""
    return Tiles(num_warps=2) if m <= 8 else Tiles()


def fits(n: int, k: int, group: int) -> bool:
    """Whether the kernel's tiles divide these sizes: N by the smallest column tile, K by the
    group, and the group a power of two from the tensor cores' 16 inputs to MAX_GROUP."""
    return (n % MIN_BLOCK_N == 0 and group > 0 and k % group == 0
            and 16 <= group <= MAX_GROUP and group & (group - 1) == 0)


def int8_matmul(x: jax.Array, w: jax.Array, scale: jax.Array, mn: Optional[jax.Array] = None,
                *, tiles: Optional[Tiles] = None, interpret: bool = False) -> jax.Array:
    """x [M, K] times the int8 weight w [N, K] with float32 scale and min (or
    None) [G, N] (w's value (n, k) is w[n, k] * scale[g, n] + mn[g, n], g = k // (K / G)) ->
    [M, N] in x's dtype, float32 accumulation. `tiles`: default_tiles(M) unless given."""
    m, k = x.shape
    n = w.shape[0]
    groups = scale.shape[0]
    group = k // groups
    if (w.shape[1] != k or scale.shape[1] != n or not fits(n, k, group)
            or mn is not None and mn.shape != scale.shape):
        raise ValueError(f"int8_matmul: {m} rows, w {tuple(w.shape)}, scale {tuple(scale.shape)} "
                         f"do not fit the kernel (N % {MIN_BLOCK_N}, w [N, K], "
                         f"scale and min [K / group, N], a group a power of two in "
                         f"16..{MAX_GROUP})")
    tiles = tiles or default_tiles(m)
    bm, bn, splits = grouped_tiles(m, n, k, groups, tiles, PARTIAL_SHARE, "int8_matmul")
    per_slice = groups // splits
    per_step = max(d for d in range(1, tiles.groups_per_step + 1) if per_slice % d == 0)
    if tiles.dequant not in ("bits", "convert"):
        raise ValueError(f"int8_matmul: dequant {tiles.dequant!r} is not 'bits' or 'convert'")
    kernel = functools.partial(_kernel, group=group, block_m=bm, block_n=bn, per_step=per_step,
                               steps=per_slice // per_step, dequant=tiles.dequant)
    group_rows = pl.BlockSpec((groups, bn), lambda r, i, j: (0, i))
    partials = split_k_call(
        kernel, (x, w, scale) + (() if mn is None else (mn,)),
        [pl.BlockSpec((m, k), lambda r, i, j: (0, 0)),
         pl.BlockSpec((bn, k), lambda r, i, j: (i, 0)),
         group_rows] + ([] if mn is None else [group_rows]),
        # Row tiles vary fastest: the programs that read one weight tile run together and the
        # later ones find it in the L2.
        grid=(-(-m // bm), n // bn, splits), m=m, n=n, splits=splits, tiles=tiles,
        interpret=interpret, name="int8_matmul")
    return partials.sum(0).astype(x.dtype)


# A byte b set into the low bits of the float32 2**23 (0x4B000000), whose unit is 1, reads
# 2**23 + b exactly; flipping b's sign bit first (XOR 0x80) makes it q + 128, so subtracting
# 2**23 + 128 leaves q, exact.
_MAGIC_BITS = 0x4B000080
_MAGIC = float(2**23 + 128)


def _to_float(q: jax.Array, how: str) -> jax.Array:
    """int8 -> float32, exact. "convert": a type conversion, which Hopper issues at an eighth
    of its float32 rate (16 a cycle per SM against 128, CUDA's throughput table); "bits": integer
    and float32 arithmetic, full-rate instructions (_MAGIC_BITS). The default is the conversion:
    in the int4 GEMM's one-row form the bits were the slower of the two (bench/RESULTS.md, "int4
    at one row: three dequantization forms"); which is faster here is the sweep's to say
    (bench/quant_gemm.py --sweep)."""
    if how == "convert":
        return q.astype(jnp.float32)
    bits = (q.astype(jnp.int32) & 0xFF) ^ _MAGIC_BITS
    return lax.bitcast_convert_type(bits, jnp.float32) - _MAGIC


def _kernel(x_ref, w_ref, s_ref, *refs, group, block_m, block_n, per_step, steps, dequant):
    *min_ref, o_ref = refs  # the min's ref where the weight has one
    dtype = x_ref.dtype
    first = pl.program_id(2) * steps * per_step  # the slice's first group
    r0 = pl.program_id(0) * block_m
    rows = pl.ds(r0, block_m)

    def live(cols: int) -> jax.Array:  # [block_m, cols]: which rows are < M
        return r0 + lax.broadcasted_iota(jnp.int32, (block_m, cols), 0) < x_ref.shape[0]

    def k_step(i, acc):
        for u in range(per_step):
            g = first + i * per_step + u
            k0 = pl.multiple_of(g * group, group)
            q = _to_float(w_ref[:, pl.ds(k0, group)], dequant)             # [BN, group]
            wt = q * s_ref[g, :].astype(jnp.float32)[:, None]
            if min_ref:
                wt += min_ref[0][g, :].astype(jnp.float32)[:, None]
            wt = wt.astype(dtype)
            xt = plgpu.load(x_ref.at[rows, pl.ds(k0, group)], mask=live(group), other=0)
            acc += plgpu.dot(xt, wt, trans_b=True)
        return acc

    acc = lax.fori_loop(0, steps, k_step, jnp.zeros((block_m, block_n), jnp.float32))
    plgpu.store(o_ref.at[pl.program_id(2), rows, pl.ds(pl.program_id(1) * block_n, block_n)],
                acc, mask=live(block_n))
