"""PEFT LoRA adapters read into the engine's layout: per layer and projection, A [in, r] and
B [r, out] with the scaling folded into B, so a token's update is (x @ A) @ B."""
from __future__ import annotations

import json
import math
import os
import re
from typing import Any, Optional

import numpy as np

from jaxvllm.lora.request import LoRARequest
from jaxvllm.models.config import ModelConfig
from jaxvllm.models.params import layer_shapes

# HF module name -> the engine's projection name (models/params.py).
TARGETS = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "gate_proj": "gate",
           "up_proj": "up", "down_proj": "down"}
_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")

Adapter = dict[tuple[int, str], tuple[np.ndarray, np.ndarray]]


def load_peft_adapter(path: str, num_layers: int, max_rank: int) -> Adapter:
    """{(layer, projection): (A, B)} from a PEFT adapter directory, float32. Raises ValueError
    naming what does not fit (a rank over max_rank, biases, other modules, a missing file)."""
    from safetensors.numpy import load_file
    cfg_file = os.path.join(path, "adapter_config.json")
    weights_file = os.path.join(path, "adapter_model.safetensors")
    for f in (cfg_file, weights_file):
        if not os.path.isfile(f):
            raise ValueError(f"lora_path {path!r}: no {os.path.basename(f)} (a PEFT adapter "
                             "directory saved with safetensors is needed)")
    with open(cfg_file) as fh:
        config = json.load(fh)
    rank, alpha = int(config["r"]), float(config.get("lora_alpha", config["r"]))
    if rank > max_rank:
        raise ValueError(f"lora_path {path!r}: rank {rank} exceeds max_lora_rank={max_rank}")
    if config.get("bias", "none") != "none" or config.get("modules_to_save"):
        raise ValueError(f"lora_path {path!r}: LoRA biases and modules_to_save are not supported")
    if config.get("fan_in_fan_out"):
        raise ValueError(f"lora_path {path!r}: fan_in_fan_out adapters are not supported")
    scale = alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
    pieces: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    for key, value in load_file(weights_file).items():
        m = _KEY.search(key)
        if m is None or m.group(2) not in TARGETS:
            raise ValueError(f"lora_path {path!r}: weight {key!r} is not a LoRA weight of an "
                             f"attention or MLP projection ({', '.join(TARGETS)})")
        layer = int(m.group(1))
        if layer >= num_layers:
            raise ValueError(f"lora_path {path!r}: {key!r} names layer {layer}; the model has "
                             f"{num_layers}")
        pieces.setdefault((layer, TARGETS[m.group(2)]), {})[m.group(3)] = value
    adapter: Adapter = {}
    for (layer, name), ab in pieces.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(f"lora_path {path!r}: layer {layer} {name} lacks lora_A or lora_B")
        a = np.asarray(ab["A"], np.float32).T              # [in, r]
        b = np.asarray(ab["B"], np.float32).T * scale      # [r, out]
        adapter[(layer, name)] = (a, b)
    return adapter


def read_adapter(lora: LoRARequest, cfg: ModelConfig, max_rank: int,
                 known_path: Optional[str]) -> Optional[Adapter]:
    """A LoRARequest's adapter checked against the model (`cfg`, the model's ModelConfig: its own
    shapes, not a sharded runner's); None when its id is already known at `known_path`. An id
    names one adapter for the engine's life: another path for it is a ValueError."""
    if known_path is not None:
        if known_path != lora.lora_path:
            raise ValueError(f"lora_int_id {lora.lora_int_id} is already the adapter at "
                             f"{known_path!r}, not {lora.lora_path!r}")
        return None
    adapter = load_peft_adapter(lora.lora_path, cfg.num_layers, max_rank)
    check_shapes(adapter, lora.lora_path, [layer_shapes(cfg, i) for i in range(cfg.num_layers)])
    return adapter


def check_shapes(adapter: Adapter, path: str, shapes: Any) -> None:
    """Each A/B against the projection's [in, out] (shapes: models/params.layer_shapes per layer)."""
    for (layer, name), (a, b) in adapter.items():
        want = shapes[layer].get(name)
        if want is None or (a.shape[0], b.shape[1]) != tuple(want):
            raise ValueError(f"lora_path {path!r}: layer {layer} {name} is [{a.shape[0]}, "
                             f"{b.shape[1]}]; the model's is {want}")
