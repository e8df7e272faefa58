"""int4 checkpoints (AWQ and GPTQ, 4 bits, as vLLM loads them): what config.json's
`quantization_config` says, and each linear's packed tensors unpacked into 4-bit values [out, in]
with scale and zero points [out, groups] (w = (q - zero) * scale) and an input order for GPTQ's
activation order, which the loader
packs into the engine's int4 layout (models/int4.py). The weights stay at 4 bits; nothing is
dequantized at load.

AWQ (`quant_method: "awq"`, version "gemm", zero points): `qweight` int32 [in, out/8] and
`qzeros` int32 [groups, out/8], eight 4-bit values per int32 along the output dimension in AWQ's
interleaved order (output 8k+j sits at bit 4*_AWQ_NIBBLE[j]), `scales` [groups, out].
GPTQ (`quant_method: "gptq"`): `qweight` int32 [in/8, out], eight input rows per int32 (row
8k+j at bit 4j), `qzeros` [groups, out/8] (output 8k+j at bit 4j) holding zero - 1 in the
original format (`checkpoint_format` "gptq"; "gptq_v2" stores the zero itself), `scales`
[groups, out], `g_idx` [in] (each input row's group; with `desc_act` the groups are not in row
order).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import numpy as np

from converters.errors import WeightLoadError
from converters.quant_config import quantization_config
from jaxvllm.config import INT4_QUANTIZATIONS

# Tensors that come with a packed weight "<prefix>.qweight" and are read with it.
COMPANIONS = ("qzeros", "scales", "g_idx")
_AWQ_NIBBLE = np.array([0, 4, 1, 5, 2, 6, 3, 7])  # AWQ packs outputs 0..7 in the order 0 2 4 6 1 3 5 7
_SHIFTS = np.arange(8, dtype=np.uint32) * 4


@dataclasses.dataclass(frozen=True)
class Int4Checkpoint:
    method: str          # "awq" | "gptq"
    group_size: int      # input rows per scale; -1: one group (per output channel)
    zero_offset: int     # added to each stored zero point (1 for GPTQ's original format)


@dataclasses.dataclass
class Int4Weight:
    """One linear's weight unpacked: q uint8 values 0..15 [out, in], float32 scale [out, groups],
    offset [out, groups]: uint8 zero points (w = (q - zero) * scale) or a float32 min
    (w = q * scale + min), perm [in] or None."""
    q: np.ndarray
    scale: np.ndarray
    offset: np.ndarray
    perm: Optional[np.ndarray]


def int4_checkpoint(hf_config: dict[str, Any]) -> Optional[Int4Checkpoint]:
    """The checkpoint's int4 format; None for any other. Raises ValueError naming the
    `quantization_config` field an AWQ or GPTQ checkpoint this engine cannot load has wrong."""
    qc = quantization_config(hf_config)
    if qc.get("quant_method") not in INT4_QUANTIZATIONS:
        return None
    method = qc["quant_method"]
    bits = qc.get("bits", qc.get("w_bit"))
    if bits != 4:
        raise ValueError(f"quantization_config.bits {bits!r}: only 4-bit {method} checkpoints load")
    group = qc.get("group_size", qc.get("q_group_size", -1))
    if not isinstance(group, int) or isinstance(group, bool) or not (group == -1 or group > 0):
        raise ValueError(f"quantization_config.group_size must be a positive int or -1, got {group!r}")
    if method == "awq":
        version = str(qc.get("version", "gemm")).lower()
        if version != "gemm":
            raise ValueError(f"quantization_config.version {qc.get('version')!r}: AWQ's 'gemm' "
                             "packing loads")
        if not qc.get("zero_point", True):
            raise ValueError("quantization_config.zero_point false: AWQ checkpoints with zero "
                             "points load")
        return Int4Checkpoint("awq", group, 0)
    fmt = qc.get("checkpoint_format", "gptq")
    if fmt not in ("gptq", "gptq_v2"):
        raise ValueError(f"quantization_config.checkpoint_format {fmt!r}: 'gptq' or 'gptq_v2'")
    return Int4Checkpoint("gptq", group, 1 if fmt == "gptq" else 0)


def _nibbles(packed: np.ndarray) -> np.ndarray:
    """int32 [..., n] -> uint8 [..., n, 8]: the eight 4-bit values of each word, low bits first."""
    words = np.ascontiguousarray(packed).view(np.uint32)
    return ((words[..., None] >> _SHIFTS) & 0xF).astype(np.uint8)


def unpack(fmt: Int4Checkpoint, name: str, tensors: dict[str, np.ndarray],
           source: str) -> Int4Weight:
    """The packed tensors of one linear ("qweight", "qzeros", "scales", "g_idx" for GPTQ) ->
    Int4Weight. A shape that does not fit the format is a WeightLoadError naming the tensor."""
    def bad(what: str) -> WeightLoadError:
        return WeightLoadError(f"{source}: int4 tensor {name!r}: {what}")

    for part in ("qweight", "qzeros", "scales"):
        if part not in tensors:
            raise bad(f"no {part!r} beside it")
    qweight, qzeros, scales = (np.asarray(tensors[p]) for p in ("qweight", "qzeros", "scales"))
    if not qweight.ndim == qzeros.ndim == scales.ndim == 2:
        raise bad(f"qweight, qzeros and scales must be 2-D, got shapes {list(qweight.shape)}, "
                  f"{list(qzeros.shape)}, {list(scales.shape)}")
    if qweight.dtype != np.int32 or qzeros.dtype != np.int32:
        raise bad(f"qweight and qzeros must be int32, got {qweight.dtype} and {qzeros.dtype}")
    if fmt.method == "awq":
        inp, out = qweight.shape[0], qweight.shape[1] * 8
        q = _nibbles(qweight)[..., _AWQ_NIBBLE].reshape(inp, out)
        zeros = _nibbles(qzeros)[..., _AWQ_NIBBLE].reshape(qzeros.shape[0], -1)
    else:
        inp, out = qweight.shape[0] * 8, qweight.shape[1]
        q = np.moveaxis(_nibbles(qweight), -1, 1).reshape(inp, out)
        zeros = _nibbles(qzeros).reshape(qzeros.shape[0], -1)
    group = inp if fmt.group_size == -1 else fmt.group_size
    groups = -(-inp // group)
    if inp % group or scales.shape != (groups, out) or zeros.shape != (groups, out):
        raise bad(f"scales {list(scales.shape)} and qzeros {list(qzeros.shape)} do not fit a "
                  f"weight of {inp} inputs and {out} outputs in groups of {group}")
    zeros = zeros.astype(np.int32) + fmt.zero_offset
    if zeros.max(initial=0) > 15:  # GPTQ's original format cannot store a zero point of 0
        raise bad("a zero point of 16: the checkpoint's zeros are stored minus 1 "
                  "(quantization_config.checkpoint_format 'gptq') and one wrapped from 0; "
                  "requantize with checkpoint_format 'gptq_v2'")
    perm = None
    g_idx = tensors.get("g_idx")
    if fmt.method == "gptq" and g_idx is not None:
        g_idx = np.asarray(g_idx).astype(np.int64)
        in_order = np.arange(inp) // group
        if g_idx.shape != (inp,):
            raise bad(f"g_idx shape {list(g_idx.shape)}, expected [{inp}]")
        if not np.array_equal(g_idx, in_order):  # activation order: gather each group's rows
            perm = np.argsort(g_idx, kind="stable")
            if not np.array_equal(g_idx[perm], in_order):
                raise bad(f"g_idx does not put {group} input rows in each group")
            q = q[perm]
    scale = scales.T.astype(np.float32)  # exact: the checkpoints' scales are float16
    return Int4Weight(q=np.ascontiguousarray(q.T), scale=np.ascontiguousarray(scale),
                      offset=np.ascontiguousarray(zeros.T.astype(np.uint8)),
                      perm=None if perm is None else perm.astype(np.int32))
