"""A Llama model's weights placed inside a larger Llama shape that computes the same function.

No 8B checkpoint can be read here, and a dummy one's outputs are noise: a speculative-decoding run
on it says what a verification step costs, not how many guesses are kept. Grown, a small real model
keeps its outputs (so prompt lookup keeps as many guesses as on the small model) while each step
reads and multiplies every weight of the larger shape (the added ones are zeros, which dense GEMMs
do not skip). What is kept of the larger shape: hidden and intermediate sizes, heads, head size,
layers; its vocabulary is the small model's (a token the tokenizer does not have could win
otherwise), and its RoPE base and norm epsilon are the small model's (scaled; they cost nothing).

How the function is kept: the small model's hidden dimensions are the first ones of the larger
residual stream and the rest stay zero, so each RMSNorm weight is scaled by sqrt(H / H') and its
epsilon by H / H' (the mean square is taken over H' values). A head of size d sits in one of size
d' = m d with its rotate-half pairs (i, i + d/2) at (m i, m i + d'/2), which turn at the same
frequency under the same RoPE base; queries are scaled by sqrt(d' / d) for the softmax scale. Query
head r of KV group g goes to query head r of the larger model's group g; the other heads, and the
layers beyond the small model's, have zero weights (an attention or MLP output of zero: the
residual passes through).
"""
from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxvllm.models.config import ModelConfig


def grown_config(src: ModelConfig, target: dict) -> dict:
    """The HF config of `src` grown to `target`'s sizes (see the module docstring)."""
    h, h2 = src.hidden_size, target["hidden_size"]
    heads2, kv2 = target["num_attention_heads"], target["num_key_value_heads"]
    d2 = target.get("head_dim") or h2 // heads2
    plain = not (src.qk_norm or src.qkv_bias or src.rope_scaling or src.num_experts
                 or src.post_norms or src.sliding_window or src.partial_rotary_factor != 1.0)
    if src.architecture != "LlamaForCausalLM" or not plain:
        raise ValueError("only a plain Llama model (no biases, q/k norms, RoPE scaling, experts "
                         "or sliding window) can be grown")
    for name, small, large in (("hidden_size", h, h2),
                               ("intermediate_size", src.intermediate_size,
                                target["intermediate_size"]),
                               ("num_hidden_layers", src.num_layers, target["num_hidden_layers"]),
                               ("num_key_value_heads", src.num_kv_heads, kv2),
                               ("query heads per KV head", src.num_heads // src.num_kv_heads,
                                heads2 // kv2)):
        if large < small:
            raise ValueError(f"target {name} {large} is smaller than the model's {small}")
    if d2 % src.head_dim:
        raise ValueError(f"target head_dim {d2} is not a multiple of the model's {src.head_dim}")
    return {**target, "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "head_dim": d2, "vocab_size": src.vocab_size, "rope_theta": src.rope_theta,
            "rope_scaling": None, "rms_norm_eps": src.rms_norm_eps * h / h2,
            "tie_word_embeddings": False, "bos_token_id": src.bos_token_id,
            "eos_token_id": src.eos_token_id,
            "max_position_embeddings": src.max_position_embeddings}


def grow(params: Any, src: ModelConfig, target: dict, dtype: Any = jnp.bfloat16
         ) -> tuple[dict, dict]:
    """`params` of `src` (the engine's layout) grown to `target`'s sizes: (params in `dtype`,
    made on the default device, and their HF config)."""
    cfg = grown_config(src, target)
    h, h2, d, d2 = src.hidden_size, cfg["hidden_size"], src.head_dim, cfg["head_dim"]
    group, group2 = src.num_heads // src.num_kv_heads, (cfg["num_attention_heads"]
                                                        // cfg["num_key_value_heads"])
    half = np.arange(d // 2)
    dims = np.concatenate([d2 // d * half, d2 // d * half + d2 // 2])
    q_heads = np.array([g * group2 + r for g in range(src.num_kv_heads) for r in range(group)])
    q_cols = (q_heads[:, None] * d2 + dims).ravel()
    kv_cols = (np.arange(src.num_kv_heads)[:, None] * d2 + dims).ravel()
    hidden, inter = np.arange(h), np.arange(src.intermediate_size)
    q_size, kv_size = cfg["num_attention_heads"] * d2, cfg["num_key_value_heads"] * d2
    i2 = cfg["intermediate_size"]
    norm_scale = (h / h2) ** 0.5

    def place(w: Any, shape: tuple[int, ...], *index: np.ndarray, scale: float = 1.0) -> Any:
        w = jnp.asarray(w, jnp.float32) * scale
        return jnp.zeros(shape, dtype).at[np.ix_(*index)].set(w.astype(dtype))

    placed = {  # name: (shape, row index, column index, scale)
        "q": ((h2, q_size), hidden, q_cols, (d2 / d) ** 0.5),
        "k": ((h2, kv_size), hidden, kv_cols, 1.0), "v": ((h2, kv_size), hidden, kv_cols, 1.0),
        "o": ((q_size, h2), q_cols, hidden, 1.0),
        "gate": ((h2, i2), hidden, inter, 1.0), "up": ((h2, i2), hidden, inter, 1.0),
        "down": ((i2, h2), inter, hidden, 1.0)}
    layers = []
    for i in range(cfg["num_hidden_layers"]):
        lp = params["layers"][i] if i < src.num_layers else None
        layer = {n: (jnp.zeros(shape, dtype) if lp is None else place(lp[n], shape, rows, cols,
                                                                      scale=s))
                 for n, (shape, rows, cols, s) in placed.items()}
        for n in ("input_norm", "post_attn_norm"):
            layer[n] = (jnp.zeros(h2, dtype) if lp is None
                        else place(lp[n], (h2,), hidden, scale=norm_scale))
        layers.append(layer)
    head = params["embed"].T if src.tie_word_embeddings else params["lm_head"]
    vocab = np.arange(src.vocab_size)
    grown = {"embed": place(params["embed"], (src.vocab_size, h2), vocab, hidden),
             "final_norm": place(params["final_norm"], (h2,), hidden, scale=norm_scale),
             "lm_head": place(head, (h2, src.vocab_size), hidden, vocab), "layers": layers}
    return grown, cfg
