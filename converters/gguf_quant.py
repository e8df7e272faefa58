"""GGUF's 4- to 8-bit block formats kept small (`quantization="gguf"`): the Q4_0, Q4_1 and Q4_K
tensors of the attention and dense MLP projections split into 4-bit values with a scale and an
offset per 32 inputs (Q4_0's zero point of 8, the others' min), which the loader packs into the
int4 layout (models/int4.py), and the Q5_0, Q5_1, Q5_K, Q6_K and Q8_0 ones as integer values a
byte each with a scale (and a min where the format has one) per group of inputs (the int8 layout,
models/int8.py), instead of dequantizing them. Other types load dequantized, as without it.

Blocks run along each row (an output channel's inputs), the scales in float16:
- Q4_0, 32 values in 18 bytes: d, then 16 bytes whose low 4 bits hold values 0..15 and high 4
  bits values 16..31; w = d * (q - 8), so scale d and zero point 8.
- Q4_1, 32 values in 20 bytes: d, m, the same 16 bytes; w = d * q + m.
- Q4_K, 256 values in 144 bytes: d, dmin, 12 bytes of eight 6-bit scales and mins (one pair per 32
  values, unpacked by gguf's own `Q4_K.get_scale_min`), then 128 bytes: each run of 32 bytes holds
  one group of 32 in its low 4 bits and the next group in its high 4 bits; w = d * sc * q - dmin * m.
- Q5_0 and Q5_1, 32 values: as Q4_0 and Q4_1 with a fifth bit a value; w = d * (q - 16), d * q + m.
- Q5_K, 256 values: as Q4_K with a fifth bit a value; w = d * sc * q - dmin * m per 32.
- Q6_K, 256 values: 6-bit q, a signed 8-bit sc per 16 values and one d; w = d * sc * (q - 32).
- Q8_0, 32 values in 34 bytes: d, then 32 signed bytes q; w = d * q.
The 5- and 6-bit values are read through gguf's own dequantization of the blocks with their
scales set to 1 and their mins to 0 (exact: small integers in float32), so their bit layouts are
gguf's, not restated here.
"""
from __future__ import annotations

from typing import Any, Union

import numpy as np

from converters.integer import Int4Weight, Int8Weight


def kept_types() -> tuple:
    """The GGUF types `quantization="gguf"` keeps quantized."""
    return int4_types() + int8_types()


def int4_types() -> tuple:
    """The GGUF types kept in the int4 layout."""
    import gguf
    T = gguf.GGMLQuantizationType
    return (T.Q4_0, T.Q4_1, T.Q4_K)


def int8_types() -> tuple:
    """The GGUF types kept in the int8 layout."""
    import gguf
    T = gguf.GGMLQuantizationType
    return (T.Q5_0, T.Q5_1, T.Q5_K, T.Q6_K, T.Q8_0)


def _blocks(t: Any, types: tuple, layout: str) -> np.ndarray:
    """A GGUF tensor's raw blocks, uint8 [out, blocks, bytes a block] (a stack of experts' rows
    one after another), if its type is one of `types` (those the `layout` holds)."""
    import gguf
    if t.tensor_type not in types:
        raise ValueError(f"{t.name}: {t.tensor_type.name} is not a GGUF type kept in the {layout} "
                         f"layout ({', '.join(k.name for k in types)})")
    inp, out = int(t.shape[0]), int(np.prod([int(s) for s in t.shape[1:]]))
    block, size = gguf.GGML_QUANT_SIZES[t.tensor_type]
    return np.asarray(t.data).view(np.uint8).reshape(out, inp // block, size)


def _f16(b: np.ndarray) -> np.ndarray:
    """[..., 2] bytes of float16 -> float32 [...]."""
    return b.copy().view(np.float16)[..., 0].astype(np.float32)


def kept_weight(t: Any) -> Union[Int4Weight, Int8Weight]:
    """A GGUF tensor of one of kept_types() ([out, in] in numpy order; a stack of experts as
    [experts * out, in]) in the layout that holds its type."""
    return int8_weight(t) if t.tensor_type in int8_types() else int4_weight(t)


def int8_weight(t: Any) -> Int8Weight:
    """A GGUF tensor of one of int8_types() ([out, in] in numpy order; a stack of experts as
    [experts * out, in]) as its integer values, a byte each, with their scales (and mins)."""
    import gguf
    T = gguf.GGMLQuantizationType
    blocks = _blocks(t, int8_types(), "int8")
    out = blocks.shape[0]
    kind = t.tensor_type
    if kind == T.Q8_0:
        q = np.ascontiguousarray(blocks[..., 2:]).view(np.int8).reshape(out, -1)
        return Int8Weight(q=q, scale=_f16(blocks[..., 0:2]))
    one, zero = _f16_bytes(1.0), _f16_bytes(0.0)
    unit = blocks.copy()
    if kind == T.Q6_K:  # ql, qh, 16 int8 scales, d last
        unit[..., -18:-2], unit[..., -2:] = 1, one
        q = _dequantized(unit, kind, out)                                  # q - 32
        sc = blocks[..., -18:-2].copy().view(np.int8).astype(np.float32)
        return Int8Weight(q=q, scale=(_f16(blocks[..., -2:])[..., None] * sc).reshape(out, -1))
    d = _f16(blocks[..., 0:2])
    unit[..., 0:2] = one
    if kind == T.Q5_0:
        return Int8Weight(q=_dequantized(unit, kind, out), scale=d)    # q - 16
    unit[..., 2:4] = zero
    if kind == T.Q5_1:
        return Int8Weight(q=_dequantized(unit, kind, out), scale=d, offset=_f16(blocks[..., 2:4]))
    # Q5_K: with d 1 and dmin 0 the blocks read sc * q.
    sc, scale, offset = _k_scales(blocks)
    scaled = _dequantized(unit, kind, out, np.float32).reshape(*sc.shape, -1)
    q = np.divide(scaled, sc[..., None], out=np.zeros_like(scaled), where=sc[..., None] > 0)
    return Int8Weight(q=q.astype(np.int8).reshape(out, -1), scale=scale, offset=offset)


def _k_scales(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q4_K's and Q5_K's blocks [out, blocks, bytes] -> their 6-bit scales sc [out, blocks, 8]
    (float32) and each group of 32's scale d * sc and min -dmin * m, [out, groups] each."""
    import gguf
    out = blocks.shape[0]
    d, dmin = _f16(blocks[..., 0:2]), _f16(blocks[..., 2:4])
    sc, m = gguf.quants.Q4_K.get_scale_min(blocks[..., 4:16].reshape(-1, 12))
    sc, m = (a.reshape(out, -1, 8).astype(np.float32) for a in (sc, m))
    return sc, (d[..., None] * sc).reshape(out, -1), -(dmin[..., None] * m).reshape(out, -1)


def _f16_bytes(value: float) -> np.ndarray:
    """`value` as the two bytes of a float16, to write into a block."""
    return np.frombuffer(np.float16(value).tobytes(), np.uint8)


def _dequantized(blocks: np.ndarray, kind: Any, out: int, dtype: Any = np.int8) -> np.ndarray:
    """gguf's dequantization of `blocks` [out, blocks, bytes], [out, in] in `dtype` (values that
    are small integers, exact)."""
    from gguf.quants import dequantize
    return dequantize(blocks.reshape(out, -1), kind).reshape(out, -1).astype(dtype)


def int4_weight(t: Any) -> Int4Weight:
    """A GGUF tensor of one of int4_types() ([out, in] in numpy order; a stack of experts
    [experts, out, in] as [experts * out, in]) as an Int4Weight."""
    import gguf
    T = gguf.GGMLQuantizationType
    blocks = _blocks(t, int4_types(), "int4")
    out = blocks.shape[0]
    if t.tensor_type in (T.Q4_0, T.Q4_1):
        d = _f16(blocks[..., 0:2])
        offset = (np.full(d.shape, 8, np.uint8) if t.tensor_type == T.Q4_0  # a zero point of 8
                  else _f16(blocks[..., 2:4]))
        qs = blocks[..., -16:]
        q = np.concatenate([qs & 15, qs >> 4], axis=-1)              # [out, blocks, 32]
        scale = d
    else:  # Q4_K
        _, scale, offset = _k_scales(blocks)
        qs = blocks[..., 16:].reshape(out, -1, 4, 1, 32)
        q = np.concatenate([qs & 15, qs >> 4], axis=-2)              # [out, blocks, 4, 2, 32]
    return Int4Weight(q=np.ascontiguousarray(q.reshape(out, -1)),
                      scale=np.ascontiguousarray(scale.reshape(out, -1)),
                      offset=np.ascontiguousarray(offset.reshape(out, -1)), perm=None)
