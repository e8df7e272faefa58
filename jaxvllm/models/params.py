"""The engine's parameter layout, in one place (converters, dummy init, sharding and weight swaps use it).

params = {
  "embed":      [vocab, hidden],
  "layers": [   one dict per layer (a list: layers run unrolled, see docs/architecture.md)
    {"input_norm": [hidden], "post_attn_norm": [hidden],
     "q": [hidden, heads*head_dim], "k": [hidden, kv_heads*head_dim], "v": [hidden, kv_heads*head_dim],
     "o": [heads*head_dim, hidden],
     "q_bias"/"k_bias"/"v_bias": [heads*head_dim] / [kv_heads*head_dim]   (qkv_bias models only)
     "q_norm"/"k_norm": [head_dim]                                         (qk_norm models only)
     "pre_ffn_norm"/"post_ffn_norm": [hidden]                              (Gemma's extra norms)
     "gate": [hidden, inter], "up": [hidden, inter], "down": [inter, hidden]    (dense MLP layers)
     "router": [hidden, experts],                                             (MoE layers instead)
     "experts_gate"/"experts_up": [experts, hidden, moe_inter], "experts_down": [experts, moe_inter, hidden]
     "shared_gate"/"shared_up": [hidden, shared_inter], "shared_down": [shared_inter, hidden],
     "shared_router": [hidden, 1]                                  (Qwen2-MoE's shared expert)
    }, ...],
  "final_norm": [hidden],
  "lm_head":    [hidden, vocab]   (absent when tie_word_embeddings)
}
Linear weights are stored [in, out] (HF's torch weights transposed) so `x @ w` needs no transpose.
With `quantization="fp8"` (models/quant.py) the quantized ones are float8 [out, in] (the layout
cuBLASLt's FP8 GEMM reads) with a float32 `<name>_scale` [out] beside each. With "awq"/"gptq"/
"compressed-tensors" (models/int4.py) they are packed uint8 [out, in/2] with `<name>_scale`
[groups, out] (float32), `<name>_zero` (uint8 zero points) or `<name>_min` (float32, GGUF's Q4_1
and Q4_K) [groups, out], and `<name>_perm` int32 [in] for GPTQ in activation order. A GGUF's 5- to
8-bit projection (models/int8.py) is int8 [out, in] with `<name>_scale` and, for Q5_1 and Q5_K,
`<name>_min` [groups, out] (float32). A checkpoint with FP8 KV-cache scales adds KV_CACHE_SCALES
to every layer, float32 scalars or [kv_heads] vectors (models/llama.attend). FP8 experts keep
their [experts, in, out] as float8 with `<name>_scale` [experts, out] (float32); int4 experts are
each packed as an int4 linear and stacked, uint8 [experts, out, in/2] with `<name>_scale` and
`<name>_zero` or `<name>_min` [experts, groups, out] (int8 experts alike, [experts, out, in]);
in GPTQ's activation order `experts_gate_perm` [experts, hidden] (gate's and up's input order) and
`experts_down_perm` [experts, intermediate] (down's, and gate's and up's output order) beside
them (models/moe.py).
"""
from __future__ import annotations

from typing import Any

from jaxvllm.models.config import ModelConfig

Shapes = dict[str, Any]
KV_CACHE_SCALES = ("k_cache_scale", "v_cache_scale")  # a layer's FP8 KV-cache scales (K, V)


def layer_shapes(cfg: ModelConfig, layer: int) -> dict[str, tuple[int, ...]]:
    h, i = cfg.hidden_size, cfg.intermediate_size
    shapes = {
        "input_norm": (h,), "post_attn_norm": (h,),
        "q": (h, cfg.q_size), "k": (h, cfg.kv_size), "v": (h, cfg.kv_size), "o": (cfg.q_size, h),
    }
    if cfg.is_moe_layer(layer):
        e, m, s = cfg.num_experts, cfg.moe_intermediate_size, cfg.shared_expert_intermediate_size
        shapes.update(router=(h, e), experts_gate=(e, h, m), experts_up=(e, h, m),
                      experts_down=(e, m, h))
        if s:
            shapes.update(shared_gate=(h, s), shared_up=(h, s), shared_down=(s, h),
                          shared_router=(h, 1))
    else:
        shapes.update(gate=(h, i), up=(h, i), down=(i, h))
    if cfg.post_norms:  # Gemma: post_attn_norm is then the attention output's norm
        shapes.update(pre_ffn_norm=(h,), post_ffn_norm=(h,))
    if cfg.qkv_bias:
        shapes.update(q_bias=(cfg.q_size,), k_bias=(cfg.kv_size,), v_bias=(cfg.kv_size,))
    if cfg.qk_norm:
        shapes.update(q_norm=(cfg.head_dim,), k_norm=(cfg.head_dim,))
    return shapes


def param_shapes(cfg: ModelConfig) -> Shapes:
    shapes: Shapes = {
        "embed": (cfg.vocab_size, cfg.hidden_size),
        "layers": [layer_shapes(cfg, i) for i in range(cfg.num_layers)],
        "final_norm": (cfg.hidden_size,),
    }
    if not cfg.tie_word_embeddings:
        shapes["lm_head"] = (cfg.hidden_size, cfg.vocab_size)
    return shapes

