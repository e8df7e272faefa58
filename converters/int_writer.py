"""AWQ, GPTQ and compressed-tensors int-quantized checkpoints written: a float weight rounded to
nearest per output channel and group of inputs (no calibration data, so neither AWQ's scale search
nor GPTQ's error feedback) and stored as those formats store it, the inverse of
converters/integer.py's `unpack`. For the tests and the quality benchmark
(bench/quant_quality.py), which need integer checkpoints of a given model.
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np

from converters.integer import AWQ_NIBBLE

_AWQ_ORDER = np.argsort(AWQ_NIBBLE)  # nibble i of an AWQ word holds output 8k + _AWQ_ORDER[i]


def _words(values: list[np.ndarray], bits: int) -> np.ndarray:
    word = np.zeros(values[0].shape, np.uint32)
    for i, n in enumerate(values):
        word |= n.astype(np.uint32) << np.uint32(bits * i)
    return word.view(np.int32)


def pack_awq(v: np.ndarray) -> np.ndarray:
    """[rows, cols] 4-bit values -> int32 [rows, cols/8], AWQ's interleaved order."""
    return _words([v[:, _AWQ_ORDER[i]::8] for i in range(8)], 4)


def pack_cols(v: np.ndarray, bits: int = 4) -> np.ndarray:
    """[rows, cols] -> int32 [rows, cols/p] (p = 32 / bits), column pk+i at bits * i (GPTQ's
    qzeros)."""
    p = 32 // bits
    return _words([v[:, i::p] for i in range(p)], bits)


def pack_rows(v: np.ndarray, bits: int = 4) -> np.ndarray:
    """[rows, cols] -> int32 [rows/p, cols], row pk+i at bits * i (GPTQ's qweight)."""
    p = 32 // bits
    return _words([v[i::p] for i in range(p)], bits)


def quantize(w: np.ndarray, g_idx: np.ndarray, groups: int, bits: int = 4,
             symmetric: bool = False, min_zero: int = 0) -> tuple[np.ndarray, ...]:
    """w [out, in] float, g_idx [in] (each input's group) -> q uint8 [out, in], zero int32 [out,
    groups], scale float16 [out, groups] and the weight they dequantize to, float32 [out, in].
    Asymmetric: the group's range (0 included) over 2**bits levels, zero points of at least
    `min_zero` (GPTQ's original format stores zero - 1, so 1 there); symmetric (GPTQ's `sym`): the
    largest magnitude over 2**bits - 1 steps around a zero of 2**(bits-1)."""
    out, top = w.shape[0], (1 << bits) - 1
    w = np.asarray(w, np.float32)
    q = np.zeros(w.shape, np.uint8)
    zero = np.zeros((out, groups), np.int32)
    scale = np.zeros((out, groups), np.float16)
    for g in range(groups):
        cols = g_idx == g
        lo, hi = np.minimum(w[:, cols].min(1), 0), np.maximum(w[:, cols].max(1), 0)
        if symmetric:
            hi = np.maximum(hi, -lo)
            lo = -hi
        s = np.maximum((hi - lo) / top, np.finfo(np.float16).tiny).astype(np.float16)
        z = (np.full(out, (top + 1) // 2) if symmetric
             else np.clip(np.round(-lo / s.astype(np.float32)), min_zero, top))
        scale[:, g], zero[:, g] = s, z
        q[:, cols] = np.clip(np.round(w[:, cols] / s[:, None].astype(np.float32)) + z[:, None],
                             0, top)
    deq = (q.astype(np.float32) - zero[:, g_idx]) * scale[:, g_idx].astype(np.float32)
    return q, zero, scale, deq


def linear_tensors(w: np.ndarray, method: str, group: int, bits: int = 4,
                   g_idx: Optional[np.ndarray] = None,
                   symmetric: bool = False) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """One linear's weight w [out, in] as an AWQ ("awq", 4 bits, zero points), GPTQ ("gptq",
    4 or 8 bits, its original format) or compressed-tensors int-quantized ("compressed-tensors":
    llm-compressor's W8A8 weights, symmetric per output channel; `group` and `g_idx` unused)
    checkpoint stores it: its tensors by part name ("qweight", ...) and the float32 weight they
    dequantize to. g_idx: each input's group under GPTQ's activation order (default: groups in
    input order)."""
    inp = w.shape[1]
    if method == "compressed-tensors":
        q, _, scale, deq = quantize(w, np.zeros(inp, np.int64), 1, bits, symmetric=True)
        signed = (q.astype(np.int16) - (1 << (bits - 1))).astype(np.int8)
        return {"weight": signed, "weight_scale": scale.astype(np.float32)}, deq
    if g_idx is None:
        g_idx = np.arange(inp) // group
    q, zero, scale, deq = quantize(w, g_idx, inp // group, bits, symmetric,
                                   min_zero=1 if method == "gptq" else 0)
    if method == "awq":
        tensors = {"qweight": pack_awq(q.T), "qzeros": pack_awq(zero.T)}
    else:
        tensors = {"qweight": pack_rows(q.T, bits), "qzeros": pack_cols(zero.T - 1, bits),
                   "g_idx": g_idx.astype(np.int32)}
    tensors["scales"] = np.ascontiguousarray(scale.T)
    return tensors, deq


def quantization_config(method: str, group: int, bits: int = 4, act_order: bool = False,
                        symmetric: bool = False) -> dict[str, Any]:
    """config.json's `quantization_config` for checkpoints written by linear_tensors."""
    if method == "compressed-tensors":  # W8A8: int activations per token, dynamic
        int_args = {"type": "int", "symmetric": True, "dynamic": False}
        return {"quant_method": "compressed-tensors", "format": "int-quantized", "config_groups": {
            "group_0": {"targets": ["Linear"],
                        "weights": {**int_args, "num_bits": bits, "strategy": "channel"},
                        "input_activations": {**int_args, "num_bits": 8, "strategy": "token",
                                              "dynamic": True}}},
            "ignore": ["lm_head"]}
    if method == "awq":
        return {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True,
                "version": "gemm"}
    return {"quant_method": "gptq", "bits": bits, "group_size": group, "desc_act": act_order,
            "sym": symmetric}
