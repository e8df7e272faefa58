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
consumer, or, through int4_partials, to a kernel that adds them up itself (decode_epilogue.py).
Rows past M are masked, neither padded in memory nor written: the kernel is the GEMM's
only launch (padding, zeroing an atomic accumulator and casting it cost a kernel each, more than
the GEMM at decode sizes).

Packed layout (models/int4.py): w uint8 [N, K/2]; within each group of `group` inputs, byte j holds
input j in its low 4 bits and input j + group/2 in its high 4 bits, so the two halves of a tile are
two contiguous slices of x and no value needs moving between lanes. scale [G, N] (float32) and
the offset [G, N] are stored group-major so a program reads a contiguous row of each per group. The
offset is either a float32 min (w = q * scale + min: GGUF's Q4_1 and Q4_K) or a uint8 integer zero
point (w = (q - zero) * scale: AWQ, GPTQ, GGUF's Q4_0 and the engine's own quantization). With zero
points and bf16 x on the GPU the dequantization runs in bf16 pairs (_pairs_asm), two weights
an instruction and exact but for the scale's rounding to bf16 (as vLLM's Marlin kernels round it);
the other forms convert each weight through float32. A bf16 min could not take the pair path: a
rounded min is shared by its group and biases every weight of it alike (bench/RESULTS.md, "int4
with integer zero points"). `Tiles(f16=True)` dequantizes either offset in float16 pairs instead
(a min rounded to float16 carries an eighth of bf16's error), against x made float16 row by row
(triton_rows.f16_rows): for the sweep to weigh (bench/decode_gemm.py).
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

# Larger batches take the dequantize-then-GEMM path (models/int4.py): each row tile dequantizes
# the whole weight again, and from 128 rows that cost more than XLA's dequantization written once
# (H200, 8B shapes; bench/RESULTS.md, "int4").
MAX_ROWS = 64
MAX_STEP = 64    # packed bytes per reduction step (2 x 64 inputs)
# Partial sums cost splits * M * N * 4 bytes written and read again: at most an eighth of the
# weight's N * K / 2 bytes, so splits * M <= K / 64 (fewer splits as the rows grow).
PARTIAL_SHARE = 64

# Four weights from four bytes of the packed tile (Triton's pack=4; operands are 32-bit words:
# $0-$1 the weights as half-precision pairs, $2 the bytes, $3-$4 the scales, $5-$6 the offsets,
# pairs). prmt spreads bytes 0,1 (then 2,3) to the two halves of a word; lop3 0xEA ((a & b) | c)
# puts a nibble in the low mantissa bits of a power of two whose unit is 1 (bf16 128.0, 0x4300;
# float16 1024.0, 0x6400), so each half reads that base + q exactly. Zero points ("bf16", "f16"):
# subtracting base + zero leaves q - zero, exact, and one multiply by the scale rounds once. A min
# ("f16-min"; bf16 would round the min a group shares too coarsely, bench/RESULTS.md, "GGUF at 4
# bits"): subtracting the base leaves q, and one fma with the scale and min rounds once. One call
# per half of the byte (the low nibbles, then the high): Pallas lowers an inline asm of one result
# only.
_PAIRS = {"bf16": (jnp.bfloat16, "bf16x2", "0x43004300", 128.0),
          "f16": (jnp.float16, "f16x2", "0x64006400", 1024.0),
          "f16-min": (jnp.float16, "f16x2", "0x64006400", 1024.0)}  # (dtype, PTX type, base)


def _pairs_asm(high: bool, form: str) -> str:
    _, kind, base, _ = _PAIRS[form]
    shift = "shr.u32 b01, b01, 4;\nshr.u32 b23, b23, 4;\n" if high else ""

    def pair(src: str, out: int) -> str:
        made = f"lop3.b32 v, {src}, 0x000F000F, m, 0xEA;\n"
        if form == "f16-min":
            return made + f"sub.{kind} v, v, m;\nfma.rn.{kind} ${out}, v, ${3 + out}, ${5 + out};\n"
        return made + f"sub.{kind} v, v, ${5 + out};\nmul.rn.{kind} ${out}, v, ${3 + out};\n"
    return ("{\n.reg .b32 b01, b23, v, m;\n" + f"mov.b32 m, {base};\n"
            "prmt.b32 b01, $2, 0, 0x4140;\nprmt.b32 b23, $2, 0, 0x4342;\n" + shift
            + pair("b01", 0) + pair("b23", 1) + "}")


@dataclasses.dataclass(frozen=True)
class Tiles:
    block_m: int = 32              # at most: fewer rows take the next power of two (>= 16)
    block_n: int = 64
    splits: Optional[int] = None   # None: triton_rows.input_splits()
    num_warps: int = 4
    num_stages: int = 3
    # Dequantize in float16 pairs, either offset, against x made float16 row by row
    # (triton_rows.f16_rows); else bf16 pairs for zero points and a bf16 x, float32 otherwise.
    f16: bool = False


def default_tiles(m: int) -> Tiles:
    """The engine's tiling for m rows: two warps a program up to 8 rows, where the input is split
    into as many slices as for one row (H200, 8B shapes, one row: 66.6 µs a layer's linears against
    70.7 with four; bench/RESULTS.md, "int4 with integer zero points"); four from 16 rows, where
    fewer slices leave fewer programs and two warps were slower (36.2 against 35.5 µs, gate+up)."""
    return Tiles(num_warps=2) if m <= 8 else Tiles()


def fits(n: int, k: int, group: int) -> bool:
    """Whether the kernel's tiles divide these sizes: N by the smallest column tile, and each half
    group (the bytes of a group) by a reduction step of at least 16 inputs (the tensor cores'
    minimum) and a power of two (Triton's tiles are)."""
    return n % MIN_BLOCK_N == 0 and group % 2 == 0 and k % group == 0 and step_bytes(group) >= 16


def step_bytes(group: int) -> int:
    """Packed bytes a reduction step of a weight with groups of `group` inputs takes: at most
    MAX_STEP and a power of two that divides the half group (0: none fits)."""
    half = group // 2
    step = min(half, MAX_STEP)
    return step if half % step == 0 and step & (step - 1) == 0 else 0


def int4_matmul(x: jax.Array, w: jax.Array, scale: jax.Array, offset: jax.Array, *,
                tiles: Optional[Tiles] = None, interpret: bool = False) -> jax.Array:
    """x [M, K] (M <= MAX_ROWS) times the packed int4 weight (w uint8 [N, K/2], scale [G, N],
    offset [G, N]: a float32 min or uint8 zero points) -> [M, N] in x's dtype, float32
    accumulation. `tiles`: default_tiles(M) unless given."""
    tiles = tiles or default_tiles(x.shape[0])
    xk, shift = f16_rows(x) if tiles.f16 else (x, None)
    y = int4_partials(xk, w, scale, offset, tiles=tiles, interpret=interpret).sum(0)
    return (y if shift is None else y * jnp.exp2(-shift)).astype(x.dtype)


def int4_partials(x: jax.Array, w: jax.Array, scale: jax.Array, offset: jax.Array, *,
                  tiles: Optional[Tiles] = None, interpret: bool = False) -> jax.Array:
    """int4_matmul's float32 partial sums [splits, M, N], one for each slice of K (x as the kernel
    reads it: float16 rows under Tiles.f16), for a consumer that adds them up itself
    (decode_epilogue.py)."""
    m, k = x.shape
    n = w.shape[0]
    groups = scale.shape[0]
    group = k // groups
    if m > MAX_ROWS or not fits(n, k, group):
        raise ValueError(f"int4_matmul: {m} rows, N {n}, K {k}, group {group} do not fit the "
                         f"kernel (rows <= {MAX_ROWS}, N % {MIN_BLOCK_N}, a half group of >= 16 "
                         f"inputs)")
    tiles = tiles or default_tiles(m)
    bm, bn, splits = grouped_tiles(m, n, k, groups, tiles, PARTIAL_SHARE, "int4_matmul")
    step = step_bytes(group)
    dequant = dequant_form(offset.dtype, x.dtype, tiles.f16)
    kernel = functools.partial(_kernel, group=group, step=step, block_m=bm, block_n=bn,
                               steps=(k // 2) // splits // step, dequant=dequant,
                               asm=not interpret)
    return split_k_call(
        kernel, (x, w, scale, offset),
        [pl.BlockSpec((m, k), lambda r, i, j: (0, 0)),
         pl.BlockSpec((bn, k // 2), lambda r, i, j: (i, 0)),
         pl.BlockSpec((groups, bn), lambda r, i, j: (0, i)),
         pl.BlockSpec((groups, bn), lambda r, i, j: (0, i))],
        # Row tiles vary fastest: the programs that read one weight tile run together and the
        # later ones find it in the L2.
        grid=(-(-m // bm), n // bn, splits), m=m, n=n, splits=splits, tiles=tiles,
        interpret=interpret, name="int4_matmul")


def dequant_form(offset_dtype, x_dtype, f16: bool = False) -> str:
    """How dequantize_tile turns weights with this offset into operands for x: in bf16 pairs for
    zero points and a bf16 x, in float16 pairs under `f16` (Tiles.f16), else through float32."""
    zero = offset_dtype == jnp.uint8
    if f16:
        return "f16" if zero else "f16-min"
    if zero:
        return "bf16" if x_dtype == jnp.bfloat16 else "zero"
    return "min"


def dequantize_tile(packed, scale, offset, dtype, how: str, asm: bool):
    """[BN, step] packed bytes and [BN] scales and offsets of their group -> the low and the high
    nibbles' weights, [BN, step] each in `dtype`. `how`: "min" (q * scale + min), "zero"
    ((q - zero) * scale), both through float32; "bf16", "f16" (zero points) and "f16-min" in
    half-precision pairs (_pairs_asm; emulated where `asm` is off, as in interpret mode: the same
    arithmetic, the scale and offset rounded to the pairs' type first)."""
    if how in _PAIRS:
        half, _, _, base = _PAIRS[how]
        base = 0.0 if how == "f16-min" else base  # zero points go in as base + zero
        s = scale.astype(half)
        off = (offset.astype(jnp.float32) + base).astype(half)
        if asm:
            s, off = (jnp.broadcast_to(a[:, None], packed.shape) for a in (s, off))
            out = [jax.ShapeDtypeStruct(packed.shape, half)]
            return tuple(plgpu.elementwise_inline_asm(
                _pairs_asm(high, how), args=[packed, s, off], constraints="=r,=r,r,r,r,r,r",
                pack=4, result_shape_dtypes=out)[0] for high in (False, True))
        scale, offset = s.astype(jnp.float32), off.astype(jnp.float32) - base
        how = "min" if how == "f16-min" else "zero"
    scale = scale.astype(jnp.float32)[:, None]
    offset = offset.astype(jnp.float32)[:, None]
    nibbles = ((packed & 15).astype(jnp.float32), (packed >> 4).astype(jnp.float32))
    if how == "zero":
        return tuple(((q - offset) * scale).astype(dtype) for q in nibbles)
    return tuple((q * scale + offset).astype(dtype) for q in nibbles)


def _kernel(x_ref, w_ref, s_ref, off_ref, o_ref, *, group, step, block_m, block_n, steps,
            dequant, asm):
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
        lo, hi = dequantize_tile(packed, s_ref[g, :], off_ref[g, :], dtype, dequant, asm)
        acc += plgpu.dot(x_tile(e0), lo, trans_b=True)
        return acc + plgpu.dot(x_tile(e0 + half), hi, trans_b=True)

    acc = lax.fori_loop(0, steps, k_step, jnp.zeros((block_m, block_n), jnp.float32))
    plgpu.store(o_ref.at[pl.program_id(2), rows, pl.ds(pl.program_id(1) * block_n, block_n)],
                acc, mask=live(block_n))
