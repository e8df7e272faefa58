"""LoRA adapters (vLLM's multi-LoRA serving): requests name an adapter, the engine holds up to
`max_loras` of them in device slots and runs tokens of different adapters in one step."""
from jaxvllm.lora.request import LoRARequest

__all__ = ["LoRARequest"]
