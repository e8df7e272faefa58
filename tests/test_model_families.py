"""The engine end to end on the model families beyond the plain Llama layout (tiny random HF models,
float32, CPU): prompt logprobs within 2e-3 of HF transformers and greedy tokens equal to HF's
generate, through the scheduler's chunked prefill and prefix caching, on prompts longer than the
sliding window where the model has one."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from hf_builders import FAR_FROM_FLAT, save_word_tokenizer, tiny_config, tiny_model
from jaxvllm import LLM, SamplingParams

_SMALL = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
              num_attention_heads=8, max_position_embeddings=256)
FAMILIES = {
    "mixtral": lambda: tiny_config("mixtral", **_SMALL, num_key_value_heads=2, num_local_experts=4,
                                   num_experts_per_tok=2, sliding_window=11),
    "qwen2_moe": lambda: tiny_config("qwen2_moe", **_SMALL, num_key_value_heads=4, num_experts=6,
                                     num_experts_per_tok=2, moe_intermediate_size=32,
                                     shared_expert_intermediate_size=48, decoder_sparse_step=2),
    # LongRoPE within its original context (short factors), partial rotary, sliding window;
    # fused qkv and gate_up weights, split when loaded.
    "phi3": lambda: tiny_config("phi3", **dict(_SMALL, num_attention_heads=4), num_key_value_heads=2,
                                pad_token_id=0, partial_rotary_factor=0.5, sliding_window=11,
                                original_max_position_embeddings=128,
                                rope_scaling={"type": "longrope", "short_factor": [1.0, 1.3, 2.0, 3.5],
                                              "long_factor": [2.0, 3.0, 5.0, 9.0]}),
    "gemma2": lambda: tiny_config("gemma2", **dict(_SMALL, num_attention_heads=4), num_key_value_heads=2,
                                  head_dim=16, query_pre_attn_scalar=24, sliding_window=11,
                                  attn_logit_softcapping=20.0, final_logit_softcapping=10.0),
    "gemma3": lambda: tiny_config("gemma3_text", **dict(_SMALL, num_attention_heads=4),
                                  num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16,
                                  sliding_window=11, sliding_window_pattern=3),
    "qwen3_moe": lambda: tiny_config("qwen3_moe", **_SMALL, num_key_value_heads=2, head_dim=16,
                                     num_experts=8, num_experts_per_tok=3, moe_intermediate_size=32,
                                     norm_topk_prob=True, mlp_only_layers=[0]),
}
PROMPTS = [list(np.random.RandomState(n).randint(2, 256, size=n)) for n in (7, 30, 45)]
MAX_TOKENS = 10


def _gemma3_multimodal():
    """A Gemma 3 checkpoint with a (tiny) vision tower: the engine runs its text model."""
    from transformers import Gemma3Config
    cfg = Gemma3Config(text_config=dict(_SMALL, num_attention_heads=4, num_key_value_heads=1,
                                        head_dim=16, query_pre_attn_scalar=16, sliding_window=11,
                                        sliding_window_pattern=3),
                       vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                          num_attention_heads=2, image_size=28, patch_size=14),
                       mm_tokens_per_image=4, image_token_index=255, boi_token_index=253,
                       eoi_token_index=254)
    cfg.architectures = ["Gemma3ForConditionalGeneration"]
    return cfg


FAMILIES["gemma3_multimodal"] = _gemma3_multimodal


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    model = tiny_model(FAMILIES[request.param](), **FAR_FROM_FLAT)
    model.save_pretrained(d)
    save_word_tokenizer(d, 256)
    return request.param, model, str(d)


def _hf_reference(model, prompt):
    ids = torch.tensor(prompt)[None]
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0].double(), -1).numpy()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_TOKENS,
                             do_sample=False, pad_token_id=0)
    return logprobs, out[0, len(prompt):].tolist()


def test_prompt_logprobs_and_greedy_tokens_match_hf(family):
    name, model, d = family
    llm = LLM(model=d, dtype="float32", max_model_len=128, max_num_seqs=4,
              max_num_batched_tokens=16, num_gpu_blocks_override=64, enforce_eager=True,
              token_buckets=(8, 16), enable_prefix_caching=True, weights_cache_dir="none")
    refs = [_hf_reference(model, p) for p in PROMPTS]
    sp = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, prompt_logprobs=0)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], sp, use_tqdm=False)
    for prompt, out, (ref_logprobs, ref_tokens) in zip(PROMPTS, outs, refs):
        assert list(out.outputs[0].token_ids) == ref_tokens, (name, len(prompt))
        got = [next(iter(pos.values())).logprob for pos in out.prompt_logprobs[1:]]
        want = ref_logprobs[np.arange(len(prompt) - 1), prompt[1:]]
        assert np.abs(np.asarray(got) - want).max() < 2e-3, (name, len(prompt))
    # Again without prompt logprobs: the prompts' blocks now come from the prefix cache.
    sp = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], sp, use_tqdm=False)
    assert [list(o.outputs[0].token_ids) for o in outs] == [t for _, t in refs], name
    assert outs[2].num_cached_tokens > 0
