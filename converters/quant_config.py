"""A checkpoint's `quantization_config` (config.json), where HF puts it: at the top or, for a
multimodal checkpoint, in its text config. converters/fp8.py and converters/integer.py read it."""
from __future__ import annotations

from typing import Any


def quantization_config(hf_config: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint's quantization_config, {} for an unquantized one."""
    return (hf_config.get("quantization_config")
            or (hf_config.get("text_config") or {}).get("quantization_config") or {})


def compressed_tensors_formats(qc: dict[str, Any]) -> set[str]:
    """The formats of a compressed-tensors checkpoint's config groups ("pack-quantized",
    "float-quantized", ...): each group's own, else the config's (newer releases write both, and
    "mixed-precision" at the top when the groups differ)."""
    groups = (qc.get("config_groups") or {}).values()
    return {g.get("format") or qc.get("format") for g in groups} or {qc.get("format")}
