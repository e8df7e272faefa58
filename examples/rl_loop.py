"""An RL loop with one model definition and one set of arrays: the engine samples groups of
completions, a reward scores them, the Flax NNX module (models/flax_module.py) takes a GRPO-style
optax step, and the new weights go back into the engine in chunks, while the engine sleeps through
the training step so the trainer has the device.

Engine and module run in batch-invariant mode: the module's forward sums in the engine's order, so
the log-probabilities `generate` reported for the sampled tokens are bitwise the trainer's for the
same tokens (the on-policy ratio is exactly 1). Each round prints the mean reward and the largest
gap between the two (0 in this mode; ~1e-6 in float32 without it: `--no-batch-invariant`).

    python examples/rl_loop.py [--rounds 8]
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from converters import load_model
from jaxvllm import LLM, SamplingParams
from jaxvllm.models.flax_module import CausalLM, token_logprobs

CONFIG = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=512,
              hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512)
PROMPT_LEN, COMPLETION_LEN, GROUP = 8, 12, 4


def reward(tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The share of a completion's tokens that are even: something to learn."""
    valid = np.arange(tokens.shape[1])[None, :] < lengths[:, None]
    return ((tokens % 2 == 0) & valid).sum(1) / lengths


def completion_logprobs(model: CausalLM, ids: jax.Array) -> jax.Array:
    logits = model(ids)
    return token_logprobs(logits, ids, model.config.batch_invariant)[:, PROMPT_LEN - 1:]


def grpo_loss(model: CausalLM, ids: jax.Array, advantages: jax.Array) -> jax.Array:
    """Policy gradient with group-normalised advantages over the completions' tokens."""
    logp = completion_logprobs(model, ids)
    return -jnp.mean(advantages * logp.sum(axis=1))


@nnx.jit
def train_step(model: CausalLM, optimizer: nnx.Optimizer, ids: jax.Array,
               advantages: jax.Array) -> jax.Array:
    loss, grads = nnx.value_and_grad(grpo_loss)(model, ids, advantages)
    optimizer.update(model, grads)
    return loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--batch-invariant", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()

    loaded = load_model(CONFIG, load_format="dummy", dtype="float32", load_tokenizer=False)
    model = CausalLM(loaded.params, loaded.config, batch_invariant=args.batch_invariant)
    # The engine serves the module's own arrays (no copy).
    llm = LLM.from_params(nnx.state(model), CONFIG, max_model_len=64, max_num_seqs=32,
                          num_gpu_blocks_override=256, enforce_eager=True,
                          batch_invariant=args.batch_invariant)
    scored = nnx.jit(completion_logprobs)
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    rng = np.random.default_rng(0)
    prompts = [{"prompt_token_ids": rng.integers(1, 512, PROMPT_LEN).tolist()} for _ in range(8)]
    sampling = SamplingParams(n=GROUP, temperature=1.0, max_tokens=COMPLETION_LEN, ignore_eos=True,
                              logprobs=0, seed=0)

    for step in range(args.rounds):
        batch = llm.generate_arrays(prompts, sampling)
        r = reward(batch.token_ids, batch.lengths)
        groups = r.reshape(-1, GROUP)
        adv = ((groups - groups.mean(1, keepdims=True)) / (groups.std(1, keepdims=True) + 1e-6))
        prompt_ids = np.array([prompts[i]["prompt_token_ids"] for i in batch.prompt_index])
        ids = jnp.asarray(np.concatenate([prompt_ids, batch.token_ids], axis=1))
        gap = np.abs(np.asarray(scored(model, ids)) - batch.logprobs).max()

        # The KV cache freed and the engine's hold on the weights let go (they are the module's:
        # level 2 keeps no host copy) while the trainer has the device.
        llm.sleep(level=2)
        loss = float(train_step(model, optimizer, ids, jnp.asarray(adv.reshape(-1))))
        llm.wake_up(tags=["weights"])
        llm.start_weight_update()  # a layer at a time, as a trainer on other devices would stream
        for chunk in model.weight_chunks():
            llm.update_weights(chunk)
        llm.finish_weight_update()
        llm.wake_up(tags=["kv_cache"])
        print(f"round {step}: mean reward {r.mean():.3f}  loss {loss:+.3f}  "
              f"max |generate logprob - trainer logprob| {gap:.2e}")


if __name__ == "__main__":
    main()
