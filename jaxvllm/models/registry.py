"""Architecture name (HF `architectures`) -> implementation module (`forward`, `compute_logits`;
the batch and cache helpers are llama.py's). One Flax-free functional implementation covers the
whole Llama family (Phi-3 too: its fused weights are split when loaded) and
its mixture-of-experts relatives (Mixtral, Qwen2-MoE, Qwen3-MoE); config flags select the
variants; Gemma 2/3 have their own (gemma.py)."""
from __future__ import annotations

import importlib
from types import ModuleType

MODEL_REGISTRY: dict[str, str] = {
    "LlamaForCausalLM": "jaxvllm.models.llama",
    "MistralForCausalLM": "jaxvllm.models.llama",
    "Qwen2ForCausalLM": "jaxvllm.models.llama",
    "Qwen3ForCausalLM": "jaxvllm.models.llama",
    "MixtralForCausalLM": "jaxvllm.models.llama",
    "Qwen2MoeForCausalLM": "jaxvllm.models.llama",
    "Qwen3MoeForCausalLM": "jaxvllm.models.llama",
    "Phi3ForCausalLM": "jaxvllm.models.llama",
    "Gemma2ForCausalLM": "jaxvllm.models.gemma",
    "Gemma3ForCausalLM": "jaxvllm.models.gemma",
}


def get_model_module(architecture: str) -> ModuleType:
    if architecture not in MODEL_REGISTRY:
        raise ValueError(f"Unsupported model architecture {architecture!r}; supported: "
                         f"{', '.join(MODEL_REGISTRY)}")
    return importlib.import_module(MODEL_REGISTRY[architecture])
