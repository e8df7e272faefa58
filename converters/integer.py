"""Integer-quantized checkpoints (AWQ, GPTQ and compressed-tensors pack-quantized, 4 or 8 bits, as
vLLM loads them): what config.json's `quantization_config` says, and each linear's packed tensors
unpacked into integer values [out, in] with scales and zero points per output channel and group of
inputs (w = (q - zero) * scale) and an input order for activation order, which the loader puts
into the engine's int4 layout (models/int4.py) at 4 bits and its int8 layout (models/int8.py) at 8.
The weights stay at their bits; nothing is dequantized at load.

AWQ (`quant_method: "awq"`, version "gemm", zero points, 4 bits): `qweight` int32 [in, out/8] and
`qzeros` int32 [groups, out/8], eight 4-bit values per int32 along the output dimension in AWQ's
interleaved order (output 8k+j sits at bit 4*AWQ_NIBBLE[j]), `scales` [groups, out].
GPTQ (`quant_method: "gptq"`, `bits` 4 or 8; p = 32 / bits values an int32): `qweight` int32
[in/p, out], p input rows per int32 (row pk+j at bit bits*j), `qzeros` [groups, out/p] (output
pk+j at bit bits*j) holding zero - 1 in the original format (`checkpoint_format` "gptq";
"gptq_v2" stores the zero itself), `scales` [groups, out], `g_idx` [in] (each input row's group;
with `desc_act` the groups are not in row order).
compressed-tensors `pack-quantized` (`quant_method: "compressed-tensors"`, 4- or 8-bit int weights,
strategy "group" or "channel": llm-compressor's W4A16 and W8A16): `weight_packed`
int32 [out, in/p], input pk+j at bit bits*j, each value stored plus 2**(bits-1) (the signed
value's offset); `weight_scale` [out, groups]; `weight_shape` [out, in]; for asymmetric schemes
`weight_zero_point` int32 [out/p, groups] (output pk+j at bit bits*j, plus the same offset);
symmetric ones store none (zero 2**(bits-1)); `weight_g_idx` [in] where the checkpoint was
quantized in activation order (older releases' "group" actorder).
compressed-tensors `int-quantized` (`naive-quantized` in older releases; llm-compressor's W8A8
INT8): `weight` int8 [out, in], one signed value a byte; `weight_scale` [out, groups]; for
asymmetric schemes `weight_zero_point` int8 [out, groups]; w = (q - zero) * scale.
A compressed-tensors checkpoint that quantizes activations too (W8A8, W4A8) loads its weights so
and runs its activations in the model's dtype (weight-only: closer to the unquantized model than
its integer activations, without an integer GEMM's speed).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Union

import numpy as np

from converters.errors import WeightLoadError
from converters.quant_config import compressed_tensors_formats, quantization_config
from jaxvllm.config import INT_CHECKPOINTS
from jaxvllm.models.int4 import pack
from pallas_kernels.reference import int4_dequantize, int8_dequantize

AWQ_NIBBLE = np.array([0, 4, 1, 5, 2, 6, 3, 7])  # AWQ packs outputs 0..7 as 0 2 4 6 1 3 5 7
BITS = (4, 8)
_CT_INT_FORMATS = ("pack-quantized", "int-quantized", "naive-quantized")  # compressed-tensors'


@dataclasses.dataclass(frozen=True)
class IntCheckpoint:
    method: str          # one of INT_CHECKPOINTS
    group_size: int      # input rows per scale; -1: one group (per output channel)
    zero_offset: int     # added to each stored zero point (1 for GPTQ's original format)
    symmetric: bool = False  # compressed-tensors: no zero points stored (each is 2**(bits-1))
    bits: int = 4
    packed: bool = True  # compressed-tensors: int32 words (pack-quantized), else a value a byte
    activations: bool = False  # compressed-tensors: the checkpoint quantizes activations too

    @property
    def parts(self) -> tuple[str, ...]:
        """The tensors of one linear, "<prefix>.<part>", the packed weight first."""
        if self.method == "compressed-tensors":
            head = (("weight_packed", "weight_scale", "weight_shape") if self.packed
                    else ("weight", "weight_scale"))
            return head + ("weight_zero_point", "weight_g_idx")
        return ("qweight", "qzeros", "scales", "g_idx")


# A packed integer weight's tensor suffix in any of the formats.
PACKED = (".qweight", ".weight_packed")


@dataclasses.dataclass
class Int4Weight:
    """One linear's weight unpacked: q uint8 values 0..15 [out, in], float32 scale [out, groups],
    offset [out, groups]: uint8 zero points (w = (q - zero) * scale) or a float32 min
    (w = q * scale + min), perm [in] or None."""
    q: np.ndarray
    scale: np.ndarray
    offset: np.ndarray
    perm: Optional[np.ndarray]


@dataclasses.dataclass
class Int8Weight:
    """One linear's weight in the int8 layout: q int8 [out, in], float32 scale [out, groups] and
    either no offset (w = q * scale) or a float32 min [out, groups] (w = q * scale + min); perm
    [in] or None, as Int4Weight's."""
    q: np.ndarray
    scale: np.ndarray
    offset: Optional[np.ndarray] = None
    perm: Optional[np.ndarray] = None


def dequantize(w: Union[Int4Weight, Int8Weight]) -> Any:
    """The weight an unpacked checkpoint linear holds, float32 [out, in], its inputs in the
    checkpoint's order (for the linears the int4 and int8 layouts do not hold: MoE experts, an LM
    head): laid out as its layout lays it and dequantized by the layout's own reference."""
    if isinstance(w, Int4Weight):
        deq = int4_dequantize(pack(w.q, w.q.shape[1] // w.scale.shape[1]), w.scale.T, w.offset.T)
    else:
        deq = int8_dequantize(w.q, w.scale.T, None if w.offset is None else w.offset.T)
    return deq if w.perm is None else deq[:, np.argsort(w.perm)]


def int_checkpoint(hf_config: dict[str, Any]) -> Optional[IntCheckpoint]:
    """The checkpoint's integer format; None for any other. Raises ValueError naming the
    `quantization_config` field a checkpoint of INT_CHECKPOINTS this engine cannot load has wrong."""
    qc = quantization_config(hf_config)
    if qc.get("quant_method") not in INT_CHECKPOINTS:
        return None
    method = qc["quant_method"]
    if method == "compressed-tensors":
        return _compressed_tensors(qc)
    bits = qc.get("bits", qc.get("w_bit"))
    if bits not in (BITS if method == "gptq" else (4,)):
        raise ValueError(f"quantization_config.bits {bits!r}: {method} checkpoints of "
                         f"{' or '.join(map(str, BITS)) if method == 'gptq' else '4'} bits load")
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
        return IntCheckpoint("awq", group, 0)
    fmt = qc.get("checkpoint_format", "gptq")
    if fmt not in ("gptq", "gptq_v2"):
        raise ValueError(f"quantization_config.checkpoint_format {fmt!r}: 'gptq' or 'gptq_v2'")
    return IntCheckpoint("gptq", group, 1 if fmt == "gptq" else 0, bits=bits)


def _compressed_tensors(qc: dict[str, Any]) -> Optional[IntCheckpoint]:
    """A compressed-tensors config's integer format; None for its other formats (float-quantized:
    converters/fp8.py)."""
    formats = compressed_tensors_formats(qc)
    if not formats & set(_CT_INT_FORMATS):
        return None
    if len(formats) != 1:
        raise ValueError(f"quantization_config.config_groups: formats {sorted(map(str, formats))} "
                         "in one checkpoint; only one integer format "
                         f"({', '.join(_CT_INT_FORMATS)}) or all float-quantized (FP8) load")
    schemes, activations = set(), False
    for name, group in (qc.get("config_groups") or {}).items():
        where = f"quantization_config.config_groups.{name}"
        w = group.get("weights") or {}
        if w.get("type") != "int" or w.get("num_bits") not in BITS:
            raise ValueError(f"{where}.weights: only 4- or 8-bit int weights load from a "
                             f"{next(iter(formats))} checkpoint, got {w.get('type')!r} "
                             f"{w.get('num_bits')!r} bits")
        activations |= bool(group.get("input_activations"))
        if w.get("strategy") == "group":
            size = w.get("group_size")
            if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
                raise ValueError(f"{where}.weights.group_size must be a positive int, got {size!r}")
        elif w.get("strategy") == "channel":
            size = -1
        else:
            raise ValueError(f"{where}.weights.strategy {w.get('strategy')!r}: 'group' or 'channel' "
                             "scales load")
        schemes.add((size, bool(w.get("symmetric", True)), w["num_bits"]))
    if len(schemes) != 1:
        raise ValueError("quantization_config.config_groups: "
                         + (f"a {next(iter(formats))} checkpoint names none" if not schemes
                            else "one group size, symmetry and bits for all groups"))
    size, symmetric, bits = schemes.pop()
    return IntCheckpoint("compressed-tensors", size, 0, symmetric, bits,
                         packed=formats == {"pack-quantized"}, activations=activations)


def _values(packed: np.ndarray, bits: int) -> np.ndarray:
    """int32 [..., n] -> uint8 [..., n, 32 / bits]: the values of each word, low bits first."""
    words = np.ascontiguousarray(packed).view(np.uint32)
    shifts = np.arange(32 // bits, dtype=np.uint32) * bits
    return ((words[..., None] >> shifts) & ((1 << bits) - 1)).astype(np.uint8)


def unpack(fmt: IntCheckpoint, name: str, tensors: dict[str, np.ndarray],
           source: str) -> Union[Int4Weight, Int8Weight]:
    """The tensors of one linear (fmt.parts; those a linear lacks left out) -> an Int4Weight at 4
    bits, an Int8Weight at 8. A tensor missing or of a shape that does not fit the format is a
    WeightLoadError naming it."""
    def bad(what: str) -> WeightLoadError:
        return WeightLoadError(f"{source}: int{fmt.bits} tensor {name!r}: {what}")

    read = (_awq_gptq_parts if fmt.method != "compressed-tensors" else
            _compressed_tensors_parts if fmt.packed else _int_quantized_parts)
    q, zeros, scales, g_idx = read(fmt, {k: np.asarray(v) for k, v in tensors.items()}, bad)
    inp, out = q.shape
    group = inp if fmt.group_size == -1 else fmt.group_size
    groups = -(-inp // group)
    if inp % group or scales.shape != (groups, out) or zeros.shape != (groups, out):
        raise bad(f"scales {list(scales.shape)} and zero points {list(zeros.shape)} do not fit a "
                  f"weight of {inp} inputs and {out} outputs in groups of {group}")
    zeros = zeros.astype(np.int32) + fmt.zero_offset
    if zeros.min(initial=0) < 0:  # an asymmetric compressed-tensors zero point below the range
        raise bad(f"a zero point of {zeros.min()}: outside the {fmt.bits}-bit values it offsets")
    if zeros.max(initial=0) >= 1 << fmt.bits:  # GPTQ's original format cannot store a zero of 0
        raise bad(f"a zero point of {1 << fmt.bits}: the checkpoint's zeros are stored minus 1 "
                  "(quantization_config.checkpoint_format 'gptq') and one wrapped from 0; "
                  "requantize with checkpoint_format 'gptq_v2'")
    perm = None
    if g_idx is not None:
        g_idx = g_idx.astype(np.int64)
        in_order = np.arange(inp) // group
        if g_idx.shape != (inp,):
            raise bad(f"g_idx shape {list(g_idx.shape)}, expected [{inp}]")
        if not np.array_equal(g_idx, in_order):  # activation order: gather each group's rows
            perm = np.argsort(g_idx, kind="stable")
            if not np.array_equal(g_idx[perm], in_order):
                raise bad(f"g_idx does not put {group} input rows in each group")
            q = q[perm]
            perm = perm.astype(np.int32)
    scale = np.ascontiguousarray(scales.T.astype(np.float32))  # exact: float16 or bfloat16 scales
    zeros, q = zeros.T, np.ascontiguousarray(q.T)
    if fmt.bits == 4:
        return Int4Weight(q=q, scale=scale, offset=np.ascontiguousarray(zeros.astype(np.uint8)),
                          perm=perm)
    # int8 layout: q - 128 signed, w = (q - zero) * scale = (q - 128) * scale + (128 - zero) * scale
    # (the min exact in float32 for a 16-bit scale: times an integer of at most 9 bits).
    q8 = (q.astype(np.int16) - 128).astype(np.int8)
    offset = (None if (zeros == 128).all()
              else np.ascontiguousarray(((128 - zeros) * scale).astype(np.float32)))
    return Int8Weight(q=q8, scale=scale, offset=offset, perm=perm)


_Parts = tuple[np.ndarray, np.ndarray, np.ndarray, Optional[np.ndarray]]


def _awq_gptq_parts(fmt: IntCheckpoint, tensors: dict[str, np.ndarray], bad: Any) -> _Parts:
    """AWQ's or GPTQ's tensors -> (unsigned values [in, out], stored zero points [groups, out],
    scales [groups, out], GPTQ's g_idx or None)."""
    for part in ("qweight", "qzeros", "scales"):
        if part not in tensors:
            raise bad(f"no {part!r} beside it")
    qweight, qzeros, scales = (tensors[p] for p in ("qweight", "qzeros", "scales"))
    if not qweight.ndim == qzeros.ndim == scales.ndim == 2:
        raise bad(f"qweight, qzeros and scales must be 2-D, got shapes {list(qweight.shape)}, "
                  f"{list(qzeros.shape)}, {list(scales.shape)}")
    if qweight.dtype != np.int32 or qzeros.dtype != np.int32:
        raise bad(f"qweight and qzeros must be int32, got {qweight.dtype} and {qzeros.dtype}")
    if fmt.method == "awq":
        inp, out = qweight.shape[0], qweight.shape[1] * 8
        q = _values(qweight, 4)[..., AWQ_NIBBLE].reshape(inp, out)
        zeros = _values(qzeros, 4)[..., AWQ_NIBBLE].reshape(qzeros.shape[0], -1)
        return q, zeros, scales, None
    per = 32 // fmt.bits
    inp, out = qweight.shape[0] * per, qweight.shape[1]
    q = np.moveaxis(_values(qweight, fmt.bits), -1, 1).reshape(inp, out)
    zeros = _values(qzeros, fmt.bits).reshape(qzeros.shape[0], -1)
    return q, zeros, scales, tensors.get("g_idx")


def _compressed_tensors_parts(fmt: IntCheckpoint, tensors: dict[str, np.ndarray],
                              bad: Any) -> _Parts:
    """compressed-tensors' pack-quantized tensors -> (values [in, out], zero points [groups, out],
    scales [groups, out], weight_g_idx or None). The values are stored plus 2**(bits-1) and so are
    the zero points, so both come out unsigned as the engine's layouts take them."""
    for part in ("weight_packed", "weight_scale", "weight_shape"):
        if part not in tensors:
            raise bad(f"no {part!r} beside it")
    packed, scale, shape = (tensors[p] for p in ("weight_packed", "weight_scale", "weight_shape"))
    if packed.ndim != 2 or packed.dtype != np.int32 or scale.ndim != 2:
        raise bad(f"weight_packed must be 2-D int32 and weight_scale 2-D, got {packed.dtype} "
                  f"{list(packed.shape)} and {list(scale.shape)}")
    per = 32 // fmt.bits
    out, inp = packed.shape[0], packed.shape[1] * per
    if [int(v) for v in shape.reshape(-1)] != [out, inp]:
        raise bad(f"weight_shape {shape.reshape(-1).tolist()} does not fit weight_packed "
                  f"{list(packed.shape)} ({per} inputs an int32; inputs not a multiple of {per} "
                  "do not load)")
    q = _values(packed, fmt.bits).reshape(out, inp).T
    groups = scale.shape[1]
    if fmt.symmetric:
        zeros = np.full((groups, out), 1 << (fmt.bits - 1), np.int32)
    elif "weight_zero_point" not in tensors:
        raise bad("no 'weight_zero_point' beside it (the scheme is asymmetric)")
    else:
        zp = tensors["weight_zero_point"]
        if zp.dtype != np.int32 or zp.shape != (-(-out // per), groups):
            raise bad(f"weight_zero_point {zp.dtype} {list(zp.shape)}, expected int32 "
                      f"[{-(-out // per)}, {groups}]")
        zeros = _values(zp.T, fmt.bits).reshape(groups, -1)[:, :out]
    return q, zeros, scale.T, tensors.get("weight_g_idx")


def _int_quantized_parts(fmt: IntCheckpoint, tensors: dict[str, np.ndarray], bad: Any) -> _Parts:
    """compressed-tensors' int-quantized tensors -> (values [in, out], zero points [groups, out],
    scales [groups, out], weight_g_idx or None), values and zero points signed there, shifted by
    2**(bits-1) here to come out unsigned as the engine's layouts take them."""
    for part in ("weight", "weight_scale"):
        if part not in tensors:
            raise bad(f"no {part!r} beside it")
    q, scale = tensors["weight"], tensors["weight_scale"]
    if q.ndim != 2 or q.dtype != np.int8 or scale.ndim != 2:
        raise bad(f"weight must be 2-D int8 and weight_scale 2-D, got {q.dtype} "
                  f"{list(q.shape)} and {list(scale.shape)}")
    half = 1 << (fmt.bits - 1)
    if q.size and (q.min() < -half or q.max() >= half):
        raise bad(f"values outside the {fmt.bits}-bit range [{-half}, {half - 1}]")
    if fmt.symmetric:
        zeros = np.full((scale.shape[1], q.shape[0]), half, np.int32)
    elif "weight_zero_point" not in tensors:
        raise bad("no 'weight_zero_point' beside it (the scheme is asymmetric)")
    else:
        zp = tensors["weight_zero_point"]
        if zp.shape != scale.shape:
            raise bad(f"weight_zero_point {list(zp.shape)}, expected {list(scale.shape)} (as "
                      "weight_scale)")
        zeros = zp.astype(np.int32).T + half
    return ((q.astype(np.int16) + half).astype(np.uint8).T, zeros, scale.T,
            tensors.get("weight_g_idx"))
