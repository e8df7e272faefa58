"""jaxvllm: LLM inference and serving on JAX/XLA. `from jaxvllm import LLM, SamplingParams`."""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Lazy, so that `jaxvllm.core` and the CLI's --help do not pay for importing JAX.
_EXPORTS = {
    "LLM": "jaxvllm.entrypoints.llm",
    "SamplingParams": "jaxvllm.sampling_params",
    "StructuredOutputsParams": "jaxvllm.sampling_params",
    "RequestOutput": "jaxvllm.outputs",
    "CompletionOutput": "jaxvllm.outputs",
    "Logprob": "jaxvllm.outputs",
    "EngineArgs": "jaxvllm.config",
    "LLMEngine": "jaxvllm.engine.llm_engine",
    "AsyncLLMEngine": "jaxvllm.engine.async_llm_engine",
    "LoRARequest": "jaxvllm.lora.request",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'jaxvllm' has no attribute {name!r}")
