"""Weights from memory: a params pytree in the engine's layout (the runner swaps them in)."""
from __future__ import annotations

from typing import Any, Mapping

from jaxvllm.models.config import ModelConfig
from jaxvllm.models.params import KV_CACHE_SCALES


def to_engine_layout(params: Any, cfg: ModelConfig, dtype: str = "auto") -> Any:
    """The engine's layout (models/params.py) from that layout (optionally wrapped as Flax's
    {"params": ...}, or a CausalLM's nnx.State), or an HF-named flat mapping
    ("model.layers.0.self_attn.q_proj.weight", ...). The arrays are the caller's, not copies."""
    if type(params).__module__.startswith("flax.nnx"):  # an NNX State (models/flax_module.py)
        from flax import nnx
        params = nnx.to_pure_dict(params)
    if isinstance(params, Mapping) and set(params) == {"params"}:
        params = params["params"]
    if isinstance(params, Mapping) and isinstance(params.get("layers"), Mapping):  # NNX: by index
        params = dict(params, layers=[params["layers"][i] for i in range(len(params["layers"]))])
    if isinstance(params, Mapping) and "layers" in params and "embed" in params:
        return params
    if isinstance(params, Mapping) and any(str(k).startswith("model.") for k in params):
        from converters import convert_hf_state_dict
        return convert_hf_state_dict(cfg, params, dtype, source="<params>")
    raise ValueError("params must be the engine's layout ({'embed', 'layers', 'final_norm', ...}) "
                     "or an HF-named state dict ({'model.embed_tokens.weight': ...})")


def keep_cache_scales(new: Any, current: Any) -> Any:
    """`new` (the engine's layout) with `current`'s FP8 KV-cache scales in the layers that have
    none: they come with a checkpoint's calibration, not with a trainer's weights."""
    layers = [dict(lp) for lp in new["layers"]]
    for lp, cur in zip(layers, current["layers"]):
        for key in KV_CACHE_SCALES:
            if key in cur and key not in lp:
                lp[key] = cur[key]
    return dict(new, layers=layers)
