"""A toy RL-style loop on the JAX research API: generate, score, nudge the weights, regenerate.

The "reward" favours completions that use even token ids; the "update" is a crude step that moves the
LM head towards the tokens of the best-rewarded completion. Nothing is written to disk and nothing
recompiles after the first round.

    python examples/rl_loop.py
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from transformers import LlamaConfig

from converters import init_dummy_params
from jaxvllm import LLM, SamplingParams
from jaxvllm.models.config import ModelConfig

config = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                     architectures=["LlamaForCausalLM"])
params = init_dummy_params(ModelConfig.from_hf(config), "float32", seed=0)
llm = LLM.from_params(params, config, max_model_len=256, max_num_seqs=16, enforce_eager=True,
                      num_gpu_blocks_override=256)

prompts = [{"prompt_token_ids": list(range(i, i + 8))} for i in range(8)]
sampling = SamplingParams(n=4, temperature=1.0, max_tokens=16, seed=0, logprobs=0)
for step in range(5):
    batch = llm.generate_arrays(prompts, sampling)
    valid = batch.token_ids >= 0
    reward = ((batch.token_ids % 2 == 0) & valid).sum(1) / batch.lengths
    best = int(np.argmax(reward))
    best_tokens = batch.token_ids[best, :batch.lengths[best]].tolist()
    # Score the best completion under the current weights (log-probabilities per token).
    prompt = prompts[batch.prompt_index[best]]["prompt_token_ids"]
    logp = llm.score([prompt], [best_tokens])[0]
    print(f"step {step}: mean reward {reward.mean():.3f}, best completion logprob {logp.sum():.2f}")
    # Nudge: raise the output-embedding weights of even tokens a little, then swap in place.
    head = params["lm_head"]
    bump = jnp.zeros(head.shape[1]).at[jnp.arange(0, head.shape[1], 2)].set(0.05)
    params = dict(params, lm_head=head + jnp.sign(head.mean(0, keepdims=True)) * bump)
    llm.update_weights(params)
print("final params are the engine's:", jax.tree.structure(params) == jax.tree.structure(llm.llm_engine.runner.params))
