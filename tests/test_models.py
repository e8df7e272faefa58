"""Model forward vs HF transformers: every supported architecture (tiny random weights, float32), bf16
runs, and the embedded SmolLM2 GGUF against HF loading the same GGUF."""
from __future__ import annotations

import copy

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from converters import load_model
from hf_builders import FAR_FROM_FLAT, tiny_config, tiny_model
from jaxvllm.models import llama
from jaxvllm.models.config import ModelConfig
from jaxvllm.models.registry import MODEL_REGISTRY, get_model_module
from pallas_kernels import ragged_paged_attention_reference

BLOCK = 4

_SMALL = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=8, max_position_embeddings=256)

CONFIGS = {
    "llama-gqa4-tied": lambda: tiny_config("llama", **_SMALL, num_key_value_heads=2,
                                           tie_word_embeddings=True),
    "llama3-rope": lambda: tiny_config("llama", **_SMALL, num_key_value_heads=8, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32}),
    "llama-linear-rope": lambda: tiny_config("llama", **_SMALL, num_key_value_heads=1,
                                             rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "llama-dynamic-rope": lambda: tiny_config("llama", **_SMALL, num_key_value_heads=4,
                                              rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
    "mistral": lambda: tiny_config("mistral", **_SMALL, num_key_value_heads=2, sliding_window=None),
    "mistral-sliding": lambda: tiny_config("mistral", **_SMALL, num_key_value_heads=2,
                                           sliding_window=7),
    "qwen2-bias": lambda: tiny_config("qwen2", **_SMALL, num_key_value_heads=4),
    "qwen3-qknorm": lambda: tiny_config("qwen3", **_SMALL, num_key_value_heads=1, head_dim=16),
    # LongRoPE past its original context (32) for the whole 37-token prompt, partial rotary.
    "phi3-longrope": lambda: tiny_config(
        "phi3", **dict(_SMALL, num_attention_heads=4), num_key_value_heads=2, pad_token_id=0,
        partial_rotary_factor=0.5, original_max_position_embeddings=32,
        rope_scaling={"type": "longrope", "short_factor": [1.0, 1.3, 2.0, 3.5],
                      "long_factor": [2.0, 3.0, 5.0, 9.0]}),
    "phi3-sliding": lambda: tiny_config("phi3", **_SMALL, num_key_value_heads=8, sliding_window=9,
                                        pad_token_id=0),
    # Soft caps (both), local layers (sliding window 9) alternating with global ones.
    "gemma2": lambda: tiny_config("gemma2", **dict(_SMALL, num_attention_heads=4), num_key_value_heads=2,
                                  head_dim=16, query_pre_attn_scalar=24, sliding_window=9,
                                  attn_logit_softcapping=20.0, final_logit_softcapping=10.0),
    # Two local layers (RoPE base 1e4) then a global one (1e6, linear scaling), q/k norms.
    "gemma3": lambda: tiny_config(
        "gemma3_text", **dict(_SMALL, num_attention_heads=4, num_hidden_layers=3),
        num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16, sliding_window=9,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "factor": 2.0,
                                            "rope_theta": 1000000.0}}),
    "mixtral-moe": lambda: tiny_config("mixtral", **_SMALL, num_key_value_heads=2,
                                       num_local_experts=4, num_experts_per_tok=2, sliding_window=9),
    "qwen2-moe-shared": lambda: tiny_config("qwen2_moe", **_SMALL, num_key_value_heads=4,
                                            num_experts=6, num_experts_per_tok=2,
                                            moe_intermediate_size=32,
                                            shared_expert_intermediate_size=48),
    "qwen3-moe-dense-layer": lambda: tiny_config("qwen3_moe", **_SMALL, num_key_value_heads=2,
                                                 head_dim=16, num_experts=8, num_experts_per_tok=3,
                                                 moe_intermediate_size=32, norm_topk_prob=True,
                                                 mlp_only_layers=[1]),
}


def run_sequence(params, cfg: ModelConfig, ids: np.ndarray, chunks: tuple[int, ...] = ()) -> np.ndarray:
    """All-position logits of one sequence through the engine's paged path, optionally prefilled in
    several chunks (each chunk attends to the cache the previous ones wrote)."""
    n = len(ids)
    num_blocks = n // BLOCK + 3
    cache = llama.make_kv_cache(cfg, num_blocks, BLOCK, params["final_norm"].dtype)
    # A permuted block table: physical blocks need not be contiguous.
    table = np.random.RandomState(0).permutation(np.arange(1, num_blocks))[None].astype(np.int32)
    bounds = [0, *chunks, n]
    out = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        pos = np.arange(lo, hi, dtype=np.int32)
        inp = llama.ModelInputs(
            jnp.asarray(ids[lo:hi], jnp.int32), jnp.asarray(pos),
            jnp.asarray(table[0, pos // BLOCK] * BLOCK + pos % BLOCK),
            jnp.array([0, hi - lo], jnp.int32), jnp.array([hi], jnp.int32), jnp.asarray(table),
            jnp.array([1], jnp.int32))
        model = get_model_module(cfg.architecture)
        hidden, cache = model.forward(params, cache, inp, cfg, ragged_paged_attention_reference)
        out.append(np.asarray(model.compute_logits(params, hidden, cfg)))
    return np.concatenate(out)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_match_hf(name, tmp_path):
    model = tiny_model(CONFIGS[name](), **FAR_FROM_FLAT)
    model.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path), dtype="float32", cache_dir=None)
    ids = np.random.RandomState(1).randint(0, 256, size=37)
    with torch.no_grad():
        ref = model(torch.tensor(ids)[None]).logits[0].numpy()
    runs = [((), ids, ref)]
    if "longrope" in name:
        # Chunked, a prompt within the original context (short factors); HF takes the long ones
        # for a whole forward pass past it, which chunks of a longer prompt would not match.
        with torch.no_grad():
            short_ref = model(torch.tensor(ids[:30])[None]).logits[0].numpy()
        runs.append(((5, 16, 17), ids[:30], short_ref))
        assert np.abs(short_ref - ref[:30]).max() > 1e-2  # the long factors mattered
    else:
        runs.append(((5, 16, 17), ids, ref))
    for chunks, seq, want in runs:
        got = run_sequence(loaded.params, loaded.config, seq, chunks)
        err = np.abs(got - want).max()
        assert err < 2e-4 * max(1.0, np.abs(want).max()), (name, chunks, err, np.abs(want).max())
    assert np.abs(ref).max() > 1.0  # not flat


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_runs(dtype, tmp_path):
    model = tiny_model(CONFIGS["qwen3-qknorm"](), **FAR_FROM_FLAT)
    model.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path), dtype=dtype, cache_dir=None)
    assert loaded.params["layers"][0]["q"].dtype == jnp.dtype(dtype)
    ids = np.random.RandomState(2).randint(0, 256, size=20)
    got = run_sequence(loaded.params, loaded.config, ids)
    with torch.no_grad():
        ref = model(torch.tensor(ids)[None]).logits[0].numpy()
    assert np.isfinite(got).all()
    # Half precision: the argmax agrees almost everywhere and the logits are close in relative terms.
    assert (got.argmax(-1) == ref.argmax(-1)).mean() > 0.8
    assert np.abs(got - ref).max() < 0.1 * np.abs(ref).max()


def test_default_gguf_matches_hf(default_model, hf_default_model):
    hf = hf_default_model
    tok = default_model.tokenizer
    ids = np.asarray(tok.encode("The quick brown fox jumps over the lazy dog. Paris is the capital of"))
    with torch.no_grad():
        ref = hf(torch.tensor(ids)[None]).logits[0].numpy()
    got = run_sequence(default_model.params, default_model.config, ids)
    assert np.abs(got - ref).max() < 2e-3, np.abs(got - ref).max()
    assert (got.argmax(-1) == ref.argmax(-1)).all()


def test_registry_rejects_unknown_architecture():
    with pytest.raises(ValueError, match="supported: LlamaForCausalLM"):
        get_model_module("GPT2LMHeadModel")
    with pytest.raises(ValueError, match="Unsupported model architecture"):
        ModelConfig.from_hf({"architectures": ["GPT2LMHeadModel"], "hidden_size": 8})
    assert set(MODEL_REGISTRY) == {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
                                   "Qwen3ForCausalLM", "MixtralForCausalLM", "Qwen2MoeForCausalLM",
                                   "Qwen3MoeForCausalLM", "Phi3ForCausalLM", "Gemma2ForCausalLM",
                                   "Gemma3ForCausalLM"}


_PARTIAL_CONFIGS = [
    {},
    {"hidden_size": 64, "num_attention_heads": 8, "intermediate_size": 96, "num_hidden_layers": 2,
     "vocab_size": 100},
    {"hidden_size": 64, "num_attention_heads": 4, "torch_dtype": "bfloat16", "tie_word_embeddings": True,
     "num_key_value_heads": 2},
    {"use_sliding_window": True, "rope_scaling": {"type": "linear", "factor": 2.0}, "rope_theta": 5e5},
    {"sliding_window": None, "max_position_embeddings": 4096, "attention_bias": True,
     "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}},
]


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3", "mixtral",
                                        "qwen2_moe", "qwen3_moe", "phi3", "gemma2",
                                        "gemma3_text"])
@pytest.mark.parametrize("partial", range(len(_PARTIAL_CONFIGS)))
def test_config_dict_defaults_match_transformers(model_type, partial):
    """A config.json that leaves fields out is read (without transformers) as transformers reads it."""
    from transformers import AutoConfig

    if model_type == "phi3" and "rope_scaling" in _PARTIAL_CONFIGS[partial]:
        pytest.skip("transformers' Phi-3 config takes LongRoPE only")
    if model_type == "gemma3_text" and "type" in _PARTIAL_CONFIGS[partial].get("rope_scaling", {}):
        pytest.skip("transformers' Gemma 3 config keeps a legacy rope_scaling 'type' unapplied")
    # A deep copy: transformers writes into the rope_scaling dict it is given.
    raw = copy.deepcopy(dict(_PARTIAL_CONFIGS[partial], model_type=model_type))
    try:
        want = ModelConfig.from_hf(AutoConfig.for_model(**raw))
    except ValueError as e:  # e.g. 8 heads with Qwen's default of 32 KV heads: rejected alike
        with pytest.raises(ValueError, match=str(e).split(" (")[0]):
            ModelConfig.from_hf(raw)
        return
    assert ModelConfig.from_hf(raw) == want
    # Architectures alone name the model type too.
    no_type = {k: v for k, v in raw.items() if k != "model_type"}
    no_type["architectures"] = [want.architecture]
    assert ModelConfig.from_hf(no_type) == want
