"""A checkpoint's `quantization_config` (config.json), where HF puts it: at the top or, for a
multimodal checkpoint, in its text config. converters/fp8.py and converters/integer.py read it."""
from __future__ import annotations

from typing import Any


def quantization_config(hf_config: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint's quantization_config, {} for an unquantized one."""
    return (hf_config.get("quantization_config")
            or (hf_config.get("text_config") or {}).get("quantization_config") or {})


def modelopt_settings(qc: dict[str, Any]) -> dict[str, Any]:
    """A ModelOpt quantization_config's settings (quant_algo, kv_cache_quant_algo, ...): under
    "quantization" in its hf_quant_config.json (converters/hf.read_config_dict folds that file in),
    at the top in config.json's form."""
    return qc["quantization"] if isinstance(qc.get("quantization"), dict) else qc


def asks_fp8_kv_cache(hf_config: dict[str, Any]) -> bool:
    """Whether the checkpoint's config asks for an FP8 KV cache, as vLLM reads it for its default
    kv_cache_dtype ("auto"): ModelOpt's `kv_cache_quant_algo: "FP8"` (hf_quant_config.json puts it
    under "quantization") or a `kv_cache_scheme` of 8-bit floats (compressed-tensors', and
    ModelOpt's in config.json)."""
    qc = quantization_config(hf_config)
    scheme = qc.get("kv_cache_scheme")
    return (str(modelopt_settings(qc).get("kv_cache_quant_algo")).upper() == "FP8"
            or (isinstance(scheme, dict) and scheme.get("type") == "float"
                and scheme.get("num_bits") == 8))


def quantizes_kv_cache_only(qc: dict[str, Any]) -> bool:
    """Whether a quantization_config quantizes the KV cache and no weight: compressed-tensors with
    a kv_cache_scheme and no config groups, ModelOpt with a kv_cache_quant_algo and no quant_algo."""
    if qc.get("quant_method") == "compressed-tensors":
        return bool(qc.get("kv_cache_scheme")) and not qc.get("config_groups")
    if qc.get("quant_method") == "modelopt":
        settings = modelopt_settings(qc)
        return bool(settings.get("kv_cache_quant_algo")) and not settings.get("quant_algo")
    return False


def compressed_tensors_formats(qc: dict[str, Any]) -> set[str]:
    """The formats of a compressed-tensors checkpoint's config groups ("pack-quantized",
    "float-quantized", ...): each group's own, else the config's (newer releases write both, and
    "mixed-precision" at the top when the groups differ)."""
    groups = (qc.get("config_groups") or {}).values()
    return {g.get("format") or qc.get("format") for g in groups} or {qc.get("format")}
