"""The engine's parameter layout, in one place (converters, dummy init, sharding and weight swaps use it).

params = {
  "embed":      [vocab, hidden],
  "layers": [   one dict per layer (a list: layers run unrolled, see docs/architecture.md)
    {"input_norm": [hidden], "post_attn_norm": [hidden],
     "q": [hidden, heads*head_dim], "k": [hidden, kv_heads*head_dim], "v": [hidden, kv_heads*head_dim],
     "o": [heads*head_dim, hidden],
     "q_bias"/"k_bias"/"v_bias": [heads*head_dim] / [kv_heads*head_dim]   (qkv_bias models only)
     "q_norm"/"k_norm": [head_dim]                                         (qk_norm models only)
     "gate": [hidden, inter], "up": [hidden, inter], "down": [inter, hidden]}, ...],
  "final_norm": [hidden],
  "lm_head":    [hidden, vocab]   (absent when tie_word_embeddings)
}
Linear weights are stored [in, out] (HF's torch weights transposed) so `x @ w` needs no transpose.
"""
from __future__ import annotations

from typing import Any

from jaxvllm.models.config import ModelConfig

Shapes = dict[str, Any]


def layer_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    h, i = cfg.hidden_size, cfg.intermediate_size
    shapes = {
        "input_norm": (h,), "post_attn_norm": (h,),
        "q": (h, cfg.q_size), "k": (h, cfg.kv_size), "v": (h, cfg.kv_size), "o": (cfg.q_size, h),
        "gate": (h, i), "up": (h, i), "down": (i, h),
    }
    if cfg.qkv_bias:
        shapes.update(q_bias=(cfg.q_size,), k_bias=(cfg.kv_size,), v_bias=(cfg.kv_size,))
    if cfg.qk_norm:
        shapes.update(q_norm=(cfg.head_dim,), k_norm=(cfg.head_dim,))
    return shapes


def param_shapes(cfg: ModelConfig) -> Shapes:
    shapes: Shapes = {
        "embed": (cfg.vocab_size, cfg.hidden_size),
        "layers": [layer_shapes(cfg) for _ in range(cfg.num_layers)],
        "final_norm": (cfg.hidden_size,),
    }
    if not cfg.tie_word_embeddings:
        shapes["lm_head"] = (cfg.hidden_size, cfg.vocab_size)
    return shapes

