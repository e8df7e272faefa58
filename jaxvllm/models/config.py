"""ModelConfig: the Llama-family hyperparameters, read from an HF config (object or dict)."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Optional

from jaxvllm.models.registry import MODEL_REGISTRY

logger = logging.getLogger(__name__)
_DTYPES = ("float32", "bfloat16", "float16")

SUPPORTED_ARCHITECTURES = tuple(MODEL_REGISTRY)


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    qkv_bias: bool = False           # Qwen2
    qk_norm: bool = False            # Qwen3
    rope_scaling: Optional[dict] = field(default=None, hash=False)
    sliding_window: Optional[int] = None
    dtype: str = "float32"           # the checkpoint's dtype ("auto" resolves to this)
    bos_token_id: Optional[int] = None
    eos_token_id: Any = field(default=None, hash=False)  # int or list of ints
    # Mixture of experts (Mixtral, Qwen2-MoE, Qwen3-MoE): 0 experts is a dense model.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False       # the top-k routing weights renormalised to sum to 1
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE: a shared expert with its own gate
    dense_layers: tuple[int, ...] = ()  # layers of an MoE model with a dense MLP instead
    partial_rotary_factor: float = 1.0  # RoPE on the first head_dim x this of each head (Phi-4-mini)
    # Gemma 2/3: layers without the sliding window, norms after attention and the MLP too, query
    # scaling, soft caps, and the sliding layers' own RoPE base.
    full_attention_layers: tuple[int, ...] = ()
    post_norms: bool = False
    query_pre_attn_scalar: Optional[float] = None
    attn_logit_softcapping: Optional[float] = None
    final_logit_softcapping: Optional[float] = None
    rope_local_theta: Optional[float] = None
    batch_invariant: bool = False      # the engine's mode (EngineArgs.batch_invariant), not the model's
    # The engine's choice: quantized linears run their Pallas GEMMs (FP8 at one row, int4 and int8 at
    # decode sizes) on GPUs; under tensor parallelism per device (a GSPMD-sharded weight would be
    # gathered whole for a Pallas call: models/grouped.per_device).
    pallas_gemms: bool = False

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    def layer_sliding_window(self, i: int) -> Optional[int]:
        return None if i in self.full_attention_layers else self.sliding_window

    def is_moe_layer(self, i: int) -> bool:
        return self.num_experts > 0 and i not in self.dense_layers

    @classmethod
    def from_hf(cls, hf: Any) -> "ModelConfig":
        """From a transformers config object or a config dict (config.json as it is: fields it
        leaves out take transformers' defaults for its model type)."""
        d = hf if isinstance(hf, dict) else hf.to_dict()
        archs = d.get("architectures") or []
        text_of = next((_TEXT_MODEL_OF[a] for a in archs if a in _TEXT_MODEL_OF), None)
        if text_of is not None and isinstance(d.get("text_config"), dict):
            # A multimodal checkpoint: its text model (the loader skips the vision tensors).
            dtype = d.get("torch_dtype") or d.get("dtype")
            outer = {k: d[k] for k in ("tie_word_embeddings", "bos_token_id", "eos_token_id")
                     if d.get(k) is not None}
            d = {**outer, **d["text_config"], "architectures": [text_of],
                 "model_type": _ARCH_TO_MODEL_TYPE[text_of]}
            if dtype and not (d.get("torch_dtype") or d.get("dtype")):
                d["torch_dtype"] = dtype
            archs = d["architectures"]
        if not archs and d.get("model_type") in _MODEL_TYPE_TO_ARCH:
            archs = [_MODEL_TYPE_TO_ARCH[d["model_type"]]]
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise ValueError(f"Unsupported model architecture {archs or d.get('model_type')!r}; "
                             f"supported: {', '.join(SUPPORTED_ARCHITECTURES)} (and the text "
                             f"model of {', '.join(_TEXT_MODEL_OF)})")
        model_type = d.get("model_type") or _ARCH_TO_MODEL_TYPE[arch]
        d = {**HF_CONFIG_DEFAULTS.get(model_type, {}), **d}
        hidden = d["hidden_size"]
        heads = d["num_attention_heads"]
        kv_heads = d.get("num_key_value_heads") or heads
        if heads % kv_heads:
            raise ValueError(f"num_attention_heads ({heads}) must be a multiple of "
                             f"num_key_value_heads ({kv_heads})")
        head_dim = d.get("head_dim") or hidden // heads
        gemma = _gemma_fields(arch, d) if arch in _GEMMA else {}
        rope_scaling, rope_theta = ((gemma.pop("rope_scaling"), gemma.pop("rope_theta")) if gemma
                                    else _rope(d))
        partial_rotary = float(d.get("partial_rotary_factor")
                               or (d.get("rope_parameters") or {}).get("partial_rotary_factor") or 1.0)
        dtype = d.get("torch_dtype") or d.get("dtype") or "float32"
        dtype = str(dtype).replace("torch.", "")
        if dtype not in _DTYPES:  # e.g. float8: the engine computes in one of _DTYPES
            logger.warning("the config's dtype %r is not one of %s; the checkpoint counts as "
                           "float32 (pass dtype= to choose)", dtype, ", ".join(_DTYPES))
            dtype = "float32"
        if arch in ("Qwen2ForCausalLM", "Qwen2MoeForCausalLM"):
            qkv_bias = True
        else:
            qkv_bias = bool(d.get("attention_bias", False))
        sliding = d.get("sliding_window") if d.get("use_sliding_window", True) else None
        if arch in ("LlamaForCausalLM",):
            sliding = None
        return cls(
            **_moe_fields(arch, d), **gemma,
            architecture=arch,
            vocab_size=d["vocab_size"],
            hidden_size=hidden,
            intermediate_size=d["intermediate_size"],
            num_layers=d["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            qk_norm=arch in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM", "Gemma3ForCausalLM"),
            partial_rotary_factor=partial_rotary,
            rope_scaling=rope_scaling,
            sliding_window=sliding,
            dtype=dtype,
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
        )


_GEMMA = ("Gemma2ForCausalLM", "Gemma3ForCausalLM")


def _gemma_fields(arch: str, d: dict) -> dict[str, Any]:
    """Gemma 2/3's fields, from transformers 5's config (`layer_types`, RoPE per layer type) or
    the older one (`sliding_window_pattern`, `rope_theta` + `rope_local_base_freq`)."""
    n = d["num_hidden_layers"]
    types = d.get("layer_types")
    if not types:
        pattern = 2 if arch == "Gemma2ForCausalLM" else int(d.get("sliding_window_pattern") or 6)
        types = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
                 for i in range(n)]
    params = d.get("rope_parameters") or {}
    if "full_attention" in params:  # transformers 5: a RoPE per layer type
        rope_scaling, rope_theta = _rope({"rope_parameters": params["full_attention"]})
        local_theta = params.get("sliding_attention", {}).get("rope_theta")
    else:
        rope_scaling, rope_theta = _rope(d)
        local_theta = d.get("rope_local_base_freq")
    return dict(full_attention_layers=tuple(i for i, t in enumerate(types) if t != "sliding_attention"),
                post_norms=True, query_pre_attn_scalar=float(d["query_pre_attn_scalar"]),
                attn_logit_softcapping=d.get("attn_logit_softcapping"),
                final_logit_softcapping=d.get("final_logit_softcapping"),
                rope_local_theta=None if arch == "Gemma2ForCausalLM" else float(local_theta or 1e4),
                rope_scaling=rope_scaling, rope_theta=rope_theta)


def _moe_fields(arch: str, d: dict) -> dict[str, Any]:
    """The mixture-of-experts fields, as transformers' models of `arch` read them."""
    if arch == "MixtralForCausalLM":  # every layer; the top-k weights always renormalised
        return dict(num_experts=d["num_local_experts"], num_experts_per_tok=d["num_experts_per_tok"],
                    moe_intermediate_size=d["intermediate_size"], norm_topk_prob=True)
    if arch not in ("Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM"):
        return {}
    experts = d.get("num_experts") or d.get("num_local_experts")
    step = d.get("decoder_sparse_step") or 1
    only_mlp = set(d.get("mlp_only_layers") or ())
    dense = tuple(i for i in range(d["num_hidden_layers"])
                  if i in only_mlp or not (experts and (i + 1) % step == 0))
    return dict(num_experts=experts, num_experts_per_tok=d["num_experts_per_tok"],
                moe_intermediate_size=d["moe_intermediate_size"],
                norm_topk_prob=bool(d.get("norm_topk_prob", False)),
                shared_expert_intermediate_size=(d.get("shared_expert_intermediate_size") or 0
                                                 if arch == "Qwen2MoeForCausalLM" else 0),
                dense_layers=dense)


_MODEL_TYPE_TO_ARCH = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                       "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                       "mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
                       "qwen3_moe": "Qwen3MoeForCausalLM", "phi3": "Phi3ForCausalLM",
                       "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}
_ARCH_TO_MODEL_TYPE = {a: t for t, a in _MODEL_TYPE_TO_ARCH.items()}
# Multimodal architectures whose text model runs (text prompts only).
_TEXT_MODEL_OF = {"Gemma3ForConditionalGeneration": "Gemma3ForCausalLM"}

# transformers' config-class defaults (5.x) for the fields `from_hf` reads, so that a config.json is
# read without importing transformers: that import (it pulls in torch) was 8-11 s of a 24-31 s warm
# start on the GPU host. Fields transformers derives (head_dim, num_key_value_heads) are derived in
# `from_hf`. tests/test_models.py checks the result against transformers' own config classes.
_QWEN = dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
             num_attention_heads=32, num_key_value_heads=32, rms_norm_eps=1e-6,
             max_position_embeddings=32768, use_sliding_window=False, sliding_window=4096)
HF_CONFIG_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, rms_norm_eps=1e-6, max_position_embeddings=2048,
                  bos_token_id=1, eos_token_id=2),
    "mistral": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-6,
                    max_position_embeddings=131072, sliding_window=4096, bos_token_id=1, eos_token_id=2),
    "qwen2": _QWEN,
    "qwen3": dict(_QWEN, head_dim=128),
    "mixtral": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5,
                    max_position_embeddings=131072, bos_token_id=1,
                    rope_parameters={"rope_theta": 1e6, "rope_type": "default"},
                    eos_token_id=2, num_local_experts=8, num_experts_per_tok=2),
    "qwen2_moe": dict(_QWEN, hidden_size=2048, intermediate_size=5632, num_hidden_layers=24,
                      num_attention_heads=16, num_key_value_heads=16,
                      moe_intermediate_size=1408, num_experts=60, num_experts_per_tok=4,
                      shared_expert_intermediate_size=5632),
    "gemma2": dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                   num_attention_heads=8, num_key_value_heads=4, head_dim=256, rms_norm_eps=1e-6,
                   max_position_embeddings=8192, sliding_window=4096, query_pre_attn_scalar=256,
                   attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                   tie_word_embeddings=True, bos_token_id=2, eos_token_id=1),
    "gemma3_text": dict(vocab_size=262208, hidden_size=2304, intermediate_size=9216,
                        num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4,
                        head_dim=256, rms_norm_eps=1e-6, max_position_embeddings=131072,
                        sliding_window=4096, query_pre_attn_scalar=256, tie_word_embeddings=True,
                        bos_token_id=2, eos_token_id=1, rope_theta=1e6, rope_local_base_freq=1e4),
    "phi3": dict(vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
                 num_attention_heads=32, rms_norm_eps=1e-5, max_position_embeddings=4096,
                 bos_token_id=1, eos_token_id=32000),
    "qwen3_moe": dict(_QWEN, hidden_size=2048, intermediate_size=6144, num_hidden_layers=24,
                      num_attention_heads=32, num_key_value_heads=4,
                      moe_intermediate_size=768, num_local_experts=128, num_experts_per_tok=8),
}


def _rope(d: dict) -> tuple[Optional[dict], float]:
    """transformers < 5 keeps `rope_theta` + `rope_scaling`; >= 5 folds both into `rope_parameters`."""
    params = d.get("rope_parameters") or {}
    scaling = d.get("rope_scaling") or None
    theta = float(d.get("rope_theta") or params.get("rope_theta") or 10000.0)
    if scaling is None and params:
        scaling = params
    if scaling is not None:
        scaling = dict(scaling)
        kind = scaling.get("rope_type") or scaling.get("type") or "default"
        kind = "longrope" if kind == "su" else kind  # Phi-3's first name for it
        scaling["rope_type"] = kind
        for key in ("type", "rope_theta", "partial_rotary_factor"):
            scaling.pop(key, None)
        if kind == "default":
            scaling = None
        elif kind == "longrope":
            _longrope(scaling, d)
        elif kind not in ("linear", "dynamic", "llama3"):
            raise ValueError(f"Unsupported rope_scaling type {kind!r}; supported: linear, dynamic, "
                             f"llama3, longrope")
    return scaling, theta


def _longrope(scaling: dict, d: dict) -> None:
    """LongRoPE's derived fields, as transformers derives them: the original context (config or
    rope parameters), its ratio to the context as the factor, and the attention factor."""
    original = scaling.get("original_max_position_embeddings") or d.get(
        "original_max_position_embeddings") or d["max_position_embeddings"]
    scaling["original_max_position_embeddings"] = int(original)
    factor = scaling.get("factor") or d["max_position_embeddings"] / original
    if scaling.get("attention_factor") is None:
        scaling["attention_factor"] = (1.0 if factor <= 1.0 else
                                       math.sqrt(1 + math.log(factor) / math.log(original)))
    for key in ("short_factor", "long_factor"):
        if not isinstance(scaling.get(key), (list, tuple)):
            raise ValueError(f"rope_scaling of type longrope needs a list {key}")
        scaling[key] = tuple(float(f) for f in scaling[key])
