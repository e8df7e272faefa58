"""FP8 checkpoints: what config.json's `quantization_config` says, and each float8 weight
dequantized with its scale as it is read.

Four formats, as vLLM loads them: HF's `quant_method: "fp8"` (weights e4m3 [out, in], a
`weight_scale_inv` per tensor or per `weight_block_size` block, e.g. 128x128 in the Qwen3 and
DeepSeek FP8 releases), compressed-tensors' `float-quantized` (a `weight_scale` per tensor, per
output channel or per block), NVIDIA ModelOpt's (`quant_method: "modelopt"` in config.json or the
`hf_quant_config.json` beside it; `quant_algo` FP8: a `weight_scale` per tensor,
FP8_PER_CHANNEL_PER_TOKEN: per output channel, FP8_PB_WO: per 128x128 block, stored
[out blocks, 1, in blocks, 1]) and FBGEMM's (`quant_method: "fbgemm_fp8"`, Meta's Llama 3.1 405B
FP8: a `weight_scale` per output channel). An FP8 checkpoint turns `quantization="fp8"` on
(engine/setup.py).
The linears the engine runs in FP8 (models/quant.py: e4m3 [out, in], a float32 scale per output
channel; the experts of mixture-of-experts layers alike per expert) keep a per-tensor or
per-channel checkpoint's bytes and scales as they are (channel_scales); block-scaled ones come out
dequantized in the engine's dtype and requantized per output channel (converters/hf.py), and the
other float8 tensors dequantized. Linears a checkpoint stores unquantized (its `ignore`,
`exclude_modules` or `modules_to_not_convert` list) stay so: the engine quantizes no weight of an
FP8 checkpoint on load, as vLLM. Activation scales stored for static quantization are not used:
the engine scales activations per token.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from converters.errors import WeightLoadError
from converters.quant_config import (compressed_tensors_formats, modelopt_settings,
                                     quantization_config, quantizes_kv_cache_only)
from converters.integer import int_checkpoint


@dataclasses.dataclass(frozen=True)
class Fp8Checkpoint:
    scale_suffix: str                    # a weight's scale is "<prefix>.<scale_suffix>"
    block: Optional[tuple[int, int]]     # (out, in) elements per scale; None: per tensor or channel


def fp8_checkpoint(hf_config: dict[str, Any]) -> Optional[Fp8Checkpoint]:
    """The checkpoint's FP8 format, None for an unquantized one. Raises ValueError naming
    `quantization_config` for a quantization this engine cannot load."""
    qc = quantization_config(hf_config)
    if not qc:
        return None
    if int_checkpoint(hf_config) is not None:
        return None
    method = qc.get("quant_method")
    if quantizes_kv_cache_only(qc):
        return None
    if method == "fp8":
        if qc.get("fmt", "e4m3") != "e4m3":
            raise ValueError(f"quantization_config.fmt {qc.get('fmt')!r}: only e4m3 FP8 loads")
        block = qc.get("weight_block_size")
        return Fp8Checkpoint("weight_scale_inv", _block(block, "weight_block_size"))
    if method == "compressed-tensors" and compressed_tensors_formats(qc) == {"float-quantized"}:
        blocks = set()
        for name, group in (qc.get("config_groups") or {}).items():
            w = group.get("weights") or {}
            if w.get("type") != "float" or w.get("num_bits") != 8:
                raise ValueError(f"quantization_config.config_groups.{name}.weights: only 8-bit "
                                 f"float weights load, got {w.get('type')!r} {w.get('num_bits')!r}")
            strategy = w.get("strategy")
            if strategy not in ("tensor", "channel", "block"):
                raise ValueError(f"quantization_config.config_groups.{name}.weights.strategy "
                                 f"{strategy!r}: tensor, channel or block scales load")
            blocks.add(_block(w.get("block_structure"), "block_structure")
                       if strategy == "block" else None)
        if len(blocks) > 1:
            raise ValueError("quantization_config.config_groups: one scale layout for all groups")
        return Fp8Checkpoint("weight_scale", blocks.pop() if blocks else None)
    if method == "modelopt":
        return _modelopt(qc)
    if method == "fbgemm_fp8":
        return Fp8Checkpoint("weight_scale", None)
    formats = sorted(map(str, compressed_tensors_formats(qc)))
    raise ValueError(f"quantization_config: quant_method {method!r}"
                     f"{'' if method != 'compressed-tensors' else ' format ' + ', '.join(formats)}"
                     " cannot be loaded (supported: 'fp8', 'compressed-tensors' float-quantized, "
                     "pack-quantized or int-quantized, 'modelopt' FP8, 'fbgemm_fp8', 'awq', "
                     "'gptq')")


# ModelOpt's FP8 algorithms -> their weight scales' block (None: per tensor or per channel).
_MODELOPT_FP8 = {"FP8": None, "FP8_PER_CHANNEL_PER_TOKEN": None, "FP8_PB_WO": (128, 128)}


def _modelopt(qc: dict[str, Any]) -> Fp8Checkpoint:
    """A ModelOpt checkpoint's format, from its quant_algo."""
    algo = str(modelopt_settings(qc).get("quant_algo") or "").upper()
    if algo not in _MODELOPT_FP8:
        raise ValueError(f"quantization_config.quant_algo {algo or None!r}: of ModelOpt's "
                         f"checkpoints, the FP8 ones load ({', '.join(_MODELOPT_FP8)})")
    return Fp8Checkpoint("weight_scale", _MODELOPT_FP8[algo])


def _block(value: Any, field: str) -> Optional[tuple[int, int]]:
    if value is None:
        return None
    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or not all(isinstance(v, int) and v > 0 for v in value)):
        raise ValueError(f"quantization_config.{field} must be two positive ints, got {value!r}")
    return int(value[0]), int(value[1])


def scale_name(fmt: Fp8Checkpoint, weight_name: str) -> str:
    return weight_name.rsplit(".", 1)[0] + "." + fmt.scale_suffix


def dequantize(fmt: Fp8Checkpoint, name: str, q: Any, scale: Any, source: str) -> jax.Array:
    """float8 [out, in] times its scale -> float32; a scale whose shape fits neither the format nor
    the weight is a WeightLoadError naming the tensor."""
    if fmt.block is not None and len(scale.shape) == 4 and scale.shape[1] == scale.shape[3] == 1:
        scale = scale.reshape(scale.shape[0], scale.shape[2])  # ModelOpt's [out, 1, in, 1] blocks
    _check_scale(fmt, name, q.shape, scale, source)
    return _dequantize(jnp.asarray(q), jnp.asarray(scale), fmt.block)


def channel_scales(fmt: Fp8Checkpoint, name: str, q: Any, scale: Any,
                   source: str) -> Optional[np.ndarray]:
    """The float32 scale per output channel [out] under which `q` [out, in] is the engine's FP8
    layout exactly: a per-tensor scale repeated, a per-channel one as it is. None for block scales,
    which that layout cannot hold. A scale that does not fit is a WeightLoadError naming `name`."""
    if fmt.block is not None:
        return None
    _check_scale(fmt, name, q.shape, scale, source)
    s = np.asarray(scale, np.float32).reshape(-1)
    return np.repeat(s, q.shape[0]) if s.size == 1 else s


def _check_scale(fmt: Fp8Checkpoint, name: str, shape: Any, scale: Any, source: str) -> None:
    out, inp = shape
    size = math.prod(scale.shape)
    if fmt.block is not None:
        want = (-(-out // fmt.block[0]), -(-inp // fmt.block[1]))
        ok = tuple(scale.shape) == want
    else:
        ok = size in (1, out) and len([d for d in scale.shape if d != 1]) <= 1
    if not ok:
        raise WeightLoadError(f"{source}: tensor {name!r}: scale shape {list(scale.shape)} does not "
                              f"fit a weight of shape {[out, inp]}"
                              + (f" in blocks of {list(fmt.block)}" if fmt.block else ""))


@functools.partial(jax.jit, static_argnames=("block",))
def _dequantize(q: jax.Array, scale: jax.Array, block: Optional[tuple[int, int]]) -> jax.Array:
    out, inp = q.shape
    s = scale.astype(jnp.float32)
    if block is not None:
        s = jnp.repeat(jnp.repeat(s, block[0], axis=0), block[1], axis=1)[:out, :inp]
    else:
        s = s.reshape(-1, 1)  # one per output channel, or a single one broadcast
    return q.astype(jnp.float32) * s
