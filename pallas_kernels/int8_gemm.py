"""int8 weight GEMM with a scale (and a min) per output channel and group of inputs (W8A16: a
GGUF's 5- to 8-bit projections, `quantization="gguf"`; Pallas Triton), which the engine runs for
decode-sized batches (up to MAX_ROWS rows): the weight is read at a byte a value and dequantized
in registers, group by group.

XLA writes the dequantized bf16 weight to memory before its GEMM whatever the batch (its GEMM does
not take group scales into its tiles: 400-490 us for an 8B layer's linears on an H200 at 1 to 256
rows, bench/RESULTS.md, "GGUF Q8_0 on the GPU"), three times the bytes the weight holds. Here a
program owns `block_m` rows, `block_n` output columns and one of `splits` equal slices of the
input dimension, as in the int4 GEMM (int4_gemm.py): it loads a [block_n, group] tile of bytes,
turns them into floats, multiplies each column by its group's scale (and adds its min), rounds the
result to x's dtype (the weight a load in that dtype would hold) and feeds it to the tensor cores
against the group's input columns; `groups_per_step` groups a loop step. Three ways of making the
weights (dequantize_tile; Tiles.dequant): through float32 by a type conversion or by the bytes' bits,
or in float16 pairs against an input made float16 row by row (triton_rows.f16_rows). Each
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

from pallas_kernels.triton_rows import MIN_BLOCK_N, f16_rows, grouped_tiles, split_k_call

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
    dequant: str = "convert"       # how a byte becomes a weight: dequantize_tile


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
    """x [M, K] times the int8 weight w [N, K] with float32 scale and min (or None) [G, N] (w's
    value (n, k) is w[n, k] * scale[g, n] + mn[g, n], g = k // (K / G)) -> [M, N] in x's dtype,
    float32 accumulation. `tiles`: default_tiles(M) unless given."""
    m, k = x.shape
    n = w.shape[0]
    groups = scale.shape[0]
    group = k // groups
    if (w.shape[1] != k or scale.shape[1] != n or not fits(n, k, group)
            or mn is not None and mn.shape != scale.shape):
        raise ValueError(f"int8_matmul: x {tuple(x.shape)}, w {tuple(w.shape)}, scale "
                         f"{tuple(scale.shape)} do not fit the kernel (w [N, K] with N % "
                         f"{MIN_BLOCK_N}, scale and min [K / group, N], a group a power of two "
                         f"in 16..{MAX_GROUP})")
    tiles = tiles or default_tiles(m)
    bm, bn, splits = grouped_tiles(m, n, k, groups, tiles, PARTIAL_SHARE, "int8_matmul")
    per_slice = groups // splits
    per_step = max(d for d in range(1, tiles.groups_per_step + 1) if per_slice % d == 0)
    if tiles.dequant not in DEQUANT:
        raise ValueError(f"int8_matmul: dequant {tiles.dequant!r} is not one of {DEQUANT}")
    kernel = functools.partial(_kernel, group=group, block_m=bm, block_n=bn, per_step=per_step,
                               steps=per_slice // per_step, dequant=tiles.dequant,
                               asm=not interpret)
    xk, shift = (x, None) if tiles.dequant != "f16" else f16_rows(x)
    group_rows = pl.BlockSpec((groups, bn), lambda r, i, j: (0, i))
    partials = split_k_call(
        kernel, (xk, w, scale) + (() if mn is None else (mn,)),
        [pl.BlockSpec((m, k), lambda r, i, j: (0, 0)),
         pl.BlockSpec((bn, k), lambda r, i, j: (i, 0)),
         group_rows] + ([] if mn is None else [group_rows]),
        # Row tiles vary fastest: the programs that read one weight tile run together and the
        # later ones find it in the L2.
        grid=(-(-m // bm), n // bn, splits), m=m, n=n, splits=splits, tiles=tiles,
        interpret=interpret, name="int8_matmul")
    y = partials.sum(0)
    return (y if shift is None else y * jnp.exp2(-shift)).astype(x.dtype)


DEQUANT = ("convert", "bits", "f16")

# A byte b set into the low bits of the float32 2**23 (0x4B000000), whose unit is 1, reads
# 2**23 + b exactly; flipping b's sign bit first (XOR 0x80) makes it q + 128, so subtracting
# 2**23 + 128 leaves q, exact.
_MAGIC_BITS = 0x4B000080
_MAGIC = float(2**23 + 128)

# "f16": four weights from four bytes (Triton's pack=4; operands are 32-bit words: $0-$1 the
# weights as f16 pairs, $2 the bytes, $3-$4 the scales and $5-$6 the mins, f16 pairs). XOR 0x80
# makes each byte q + 128; prmt sets bytes 0,1 (then 2,3) under 0x64 in the two halves of a word,
# so each half reads the float16 1024 + q + 128 exactly (0x6400 is 1024, unit 1); subtracting 1152
# leaves q, exact; one multiply by the scale (or fma with the min) rounds once.
def _f16_asm(with_min: bool) -> str:
    last = ("fma.rn.f16x2 $0, w01, $3, $5;\nfma.rn.f16x2 $1, w23, $4, $6;\n" if with_min else
            "mul.rn.f16x2 $0, w01, $3;\nmul.rn.f16x2 $1, w23, $4;\n")
    return ("{\n.reg .b32 biased, w01, w23, base;\nxor.b32 biased, $2, 0x80808080;\n"
            "prmt.b32 w01, biased, 0x64646464, 0x5140;\n"
            "prmt.b32 w23, biased, 0x64646464, 0x5342;\n"
            "mov.b32 base, 0x64806480;\nsub.f16x2 w01, w01, base;\nsub.f16x2 w23, w23, base;\n"
            + last + "}")


def dequantize_tile(q: jax.Array, scale: jax.Array, mn, how: str, dtype, asm: bool) -> jax.Array:
    """[BN, group] int8 and [BN] scales (and mins, or None) of their group -> the weights
    [BN, group] in `dtype`. "convert": int8 to float32 by a type conversion, which Hopper issues
    at an eighth of its float32 rate (16 a cycle per SM against 128, CUDA's throughput table);
    "bits": by integer and float32 arithmetic (_MAGIC_BITS), full-rate instructions; both then
    scaled in float32 and rounded to `dtype`. "f16": in float16 pairs, two weights an instruction
    (_f16_asm; `dtype` float16; emulated where `asm` is off, as in interpret mode). The default is
    the conversion: in the int4 GEMM's one-row form the bits were the slower of the two
    (bench/RESULTS.md, "int4 at one row: three dequantization forms"); which form is fastest here
    is the sweep's to say (bench/quant_gemm.py --sweep)."""
    if how == "f16" and asm:
        halves = [jnp.broadcast_to(a.astype(jnp.float16)[:, None], q.shape)
                  for a in (scale,) + (() if mn is None else (mn,))]
        return plgpu.elementwise_inline_asm(
            _f16_asm(mn is not None), args=[q] + halves, pack=4,
            constraints="=r,=r,r,r,r" + (",r,r" if mn is not None else ""),
            result_shape_dtypes=[jax.ShapeDtypeStruct(q.shape, jnp.float16)])[0]
    if how == "bits":
        bits = (q.astype(jnp.int32) & 0xFF) ^ _MAGIC_BITS
        w = lax.bitcast_convert_type(bits, jnp.float32) - _MAGIC
    else:
        w = q.astype(jnp.float32)
    if how == "f16":  # the asm's arithmetic: scale and min rounded to float16 first
        scale = scale.astype(jnp.float16)
        mn = None if mn is None else mn.astype(jnp.float16)
    w = w * scale.astype(jnp.float32)[:, None]
    if mn is not None:
        w = w + mn.astype(jnp.float32)[:, None]
    return w.astype(dtype)


def _kernel(x_ref, w_ref, s_ref, *refs, group, block_m, block_n, per_step, steps, dequant,
            asm):
    *min_ref, o_ref = refs  # the min's ref where the weight has one
    first = pl.program_id(2) * steps * per_step  # the slice's first group
    r0 = pl.program_id(0) * block_m
    rows = pl.ds(r0, block_m)

    def live(cols: int) -> jax.Array:  # [block_m, cols]: which rows are < M
        return r0 + lax.broadcasted_iota(jnp.int32, (block_m, cols), 0) < x_ref.shape[0]

    def k_step(i, acc):
        for u in range(per_step):
            g = first + i * per_step + u
            k0 = pl.multiple_of(g * group, group)
            wt = dequantize_tile(w_ref[:, pl.ds(k0, group)], s_ref[g, :],
                             min_ref[0][g, :] if min_ref else None, dequant, x_ref.dtype, asm)
            xt = plgpu.load(x_ref.at[rows, pl.ds(k0, group)], mask=live(group), other=0)
            acc += plgpu.dot(xt, wt, trans_b=True)
        return acc

    acc = lax.fori_loop(0, steps, k_step, jnp.zeros((block_m, block_n), jnp.float32))
    plgpu.store(o_ref.at[pl.program_id(2), rows, pl.ds(pl.program_id(1) * block_n, block_n)],
                acc, mask=live(block_n))
