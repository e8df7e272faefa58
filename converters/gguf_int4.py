"""GGUF's 4- and 8-bit block formats kept small (`quantization="gguf"`): the Q4_0, Q4_1, Q4_K and
Q8_0 tensors of the attention and dense MLP projections split into 4-bit values with a scale and
an offset per 32 inputs (Q4_0's zero point of 8, the others' min), which the loader packs into the
int4 layout (models/int4.py) instead of dequantizing them. Other types load dequantized, as
without it.

Blocks run along each row (an output channel's inputs), the scales in float16:
- Q4_0, 32 values in 18 bytes: d, then 16 bytes whose low 4 bits hold values 0..15 and high 4
  bits values 16..31; w = d * (q - 8), so scale d and zero point 8.
- Q4_1, 32 values in 20 bytes: d, m, the same 16 bytes; w = d * q + m.
- Q4_K, 256 values in 144 bytes: d, dmin, 12 bytes of eight 6-bit scales and mins (one pair per 32
  values, unpacked by gguf's own `Q4_K.get_scale_min`), then 128 bytes: each run of 32 bytes holds
  one group of 32 in its low 4 bits and the next group in its high 4 bits; w = d * sc * q - dmin * m.
- Q8_0, 32 values in 34 bytes: d, then 32 signed bytes q; w = d * q. Kept as two 4-bit weights
  along the input (Int4Weight.halves): with q + 128 = 16 h + l, w = 16 d (h - 8) + d l, so the high
  halves h take scale 16 d and zero point 8 and the low halves l scale d and zero point 0, exactly;
  the layer multiplies its input, taken twice, by both (models/int4.int4_linear). A byte a weight
  and one GEMM, on the int4 kernel, where an int8 path would need a kernel of its own.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from converters.int4 import Int4Weight

GROUP = 32  # inputs per scale in every format here (Q4_K's sub-blocks)


def kept_types() -> tuple:
    """The GGUF types `quantization="gguf"` keeps in the int4 layout."""
    import gguf
    T = gguf.GGMLQuantizationType
    return (T.Q4_0, T.Q4_1, T.Q4_K, T.Q8_0)


def int4_weight(t: Any) -> Int4Weight:
    """A GGUF tensor of one of kept_types() ([out, in] in numpy order) as an Int4Weight."""
    import gguf
    T = gguf.GGMLQuantizationType
    if t.tensor_type not in kept_types():
        raise ValueError(f"{t.name}: {t.tensor_type.name} is not a GGUF type kept in the int4 "
                         f"layout ({', '.join(k.name for k in kept_types())})")
    out, inp = (int(s) for s in reversed(list(t.shape)))
    block, size = gguf.GGML_QUANT_SIZES[t.tensor_type]
    blocks = np.asarray(t.data).view(np.uint8).reshape(out, inp // block, size)
    f16 = lambda b: b.copy().view(np.float16)[..., 0].astype(np.float32)
    if t.tensor_type == T.Q8_0:
        d = f16(blocks[..., 0:2])                                      # [out, blocks]
        u = (blocks[..., 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        q = np.concatenate([u >> 4, u & 15], axis=1)                  # [out, 2 blocks, 32]
        scale = np.concatenate([16 * d, d], axis=1)
        offset = np.concatenate([np.full(d.shape, 8, np.uint8), np.zeros(d.shape, np.uint8)],
                                axis=1)
        return Int4Weight(q=np.ascontiguousarray(q.reshape(out, 2 * inp)), scale=scale,
                          offset=offset, perm=None, halves=True)
    if t.tensor_type in (T.Q4_0, T.Q4_1):
        d = f16(blocks[..., 0:2])
        offset = (np.full(d.shape, 8, np.uint8) if t.tensor_type == T.Q4_0  # a zero point of 8
                  else f16(blocks[..., 2:4]))
        qs = blocks[..., -16:]
        q = np.concatenate([qs & 15, qs >> 4], axis=-1)              # [out, blocks, 32]
        scale = d
    else:  # Q4_K
        d, dmin = f16(blocks[..., 0:2]), f16(blocks[..., 2:4])
        sc, m = gguf.quants.Q4_K.get_scale_min(blocks[..., 4:16].reshape(-1, 12))
        sc, m = (a.reshape(out, -1, 8).astype(np.float32) for a in (sc, m))
        scale = (d[..., None] * sc).reshape(out, -1)
        offset = -(dmin[..., None] * m).reshape(out, -1)
        qs = blocks[..., 16:].reshape(out, -1, 4, 1, 32)
        q = np.concatenate([qs & 15, qs >> 4], axis=-2)              # [out, blocks, 4, 2, 32]
    return Int4Weight(q=np.ascontiguousarray(q.reshape(out, inp)),
                      scale=np.ascontiguousarray(scale.reshape(out, -1)),
                      offset=np.ascontiguousarray(offset.reshape(out, -1)), perm=None)
