"""Speculative decoding with a draft model (vLLM's "draft_model" method), on the device.

A smaller model of the same vocabulary keeps a KV cache of its own, laid out as the target's
(same blocks, block size and block tables: a request's blocks hold both models' K/V, so prefix
caching, preemption and freeing need nothing more). Each step, right after the target's sampler:

1. the draft runs over the step's tokens, as the target did, so its cache follows the target's
   token for token (prompt chunks, guesses, requests that never guess: a prefix-cache hit may
   hand their blocks to one that does);
2. for each request that sampled, the token after the guesses the target kept (known on the
   device from the sampler's `accepted` rows) is fed to the draft, and the draft decodes
   `num_speculative_tokens` guesses greedily, writing their K/V into the request's next slots
   (the scheduler allocates them ahead: SpeculativeConfig.num_lookahead_tokens).

The guesses come back with the step's samples. Greedy guesses are a certain proposal, so the
sampler's verification (accept with the target's probability, else redraw without the guess)
keeps the target distribution exactly, as for prompt lookup.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax

from jaxvllm.models import llama
from jaxvllm.models.config import ModelConfig
from jaxvllm.models.registry import get_model_module
from jaxvllm.worker.input_batch import PAD_SLOT

# Vocabularies of one tokenizer may be padded to different multiples (Qwen2.5-0.5B has 151,936
# rows, Qwen2.5-7B 152,064); a difference beyond this is another tokenizer.
VOCAB_PADDING_SLACK = 256


class Drafter:
    """The draft model's config and weights and its jittable guessing; the runner owns its cache."""

    def __init__(self, cfg: ModelConfig, params: Any, num_speculative_tokens: int,
                 target_vocab_size: int, max_model_len: int, block_size: int,
                 attention_fn: Callable[..., jax.Array], experts_fn: Callable[..., jax.Array]) -> None:
        self.cfg = cfg
        self.params = params
        self.model = get_model_module(cfg.architecture)
        self.k = num_speculative_tokens
        # A draft with padding rows past the target's vocabulary never guesses those ids.
        self.vocab = min(cfg.vocab_size, target_vocab_size)
        self.max_model_len = max_model_len
        self.block_size = block_size
        self.attention_fn = attention_fn
        self.experts_fn = experts_fn

    def bytes_per_block(self, kv_dtype: Any) -> int:
        return llama.kv_cache_bytes_per_block(self.cfg, self.block_size, kv_dtype)

    def make_cache(self, num_blocks: int, kv_dtype: Any,
                   sharding: Any = None) -> llama.KVCache:
        return llama.make_kv_cache(self.cfg, num_blocks, self.block_size, kv_dtype, sharding)

    def propose(self, params: Any, kv_cache: llama.KVCache, inp: llama.ModelInputs,
                num_drafts: jax.Array, guessing: jax.Array, sampled: jax.Array,
                accepted: jax.Array) -> tuple[llama.KVCache, jax.Array]:
        """Traced inside the runner's jitted propose program. `inp`: the step's batch (token ids
        resolved); `num_drafts` int32[R]: guesses each request verified in it; `guessing` bool[R]:
        the request sampled and may guess; `sampled` / `accepted`: the target sampler's rows.
        Returns the cache and int32[R, k] guesses (rows not guessing: unspecified)."""
        _, kv_cache = self.model.forward(params, kv_cache, inp, self.cfg, self.attention_fn,
                                         self.experts_fn)
        r, k, bs = inp.seq_lens.shape[0], self.k, self.block_size
        # Each request's logits rows start after the previous one's 1 + guesses.
        starts = jnp.cumsum(1 + num_drafts) - (1 + num_drafts)
        j = jnp.arange(k)
        rows = jnp.minimum(starts[:, None] + j, accepted.shape[0] - 1)
        kept = accepted[rows] & (j < num_drafts[:, None])
        num_kept = jnp.cumprod(kept.astype(jnp.int32), axis=1).sum(axis=1)  # guesses kept before the first rejected
        token = sampled[jnp.minimum(starts + num_kept, sampled.shape[0] - 1)]
        # The new token's position: the step ended at seq_lens - 1 with every guess in it.
        first_pos = inp.seq_lens - num_drafts + num_kept
        query_start = jnp.minimum(jnp.arange(r + 1), inp.num_seqs[0])
        req = jnp.arange(r)

        def guess(i: jax.Array, carry: tuple) -> tuple:
            cache, tok, out = carry
            pos = first_pos + i
            # Past max_model_len nothing is written (no block there) and the guess is unused.
            live = guessing & (pos < self.max_model_len)
            pos = jnp.where(live, pos, 0)
            slot = jnp.where(live, inp.block_tables[req, pos // bs] * bs + pos % bs, PAD_SLOT)
            step = llama.ModelInputs(tok, pos, slot, query_start, pos + 1, inp.block_tables,
                                     inp.num_seqs)
            hidden, cache = self.model.forward(params, cache, step, self.cfg, self.attention_fn,
                                               self.experts_fn)
            logits = self.model.compute_logits(params, hidden, self.cfg)[:, :self.vocab]
            nxt = jnp.argmax(logits, axis=-1).astype(jnp.int32)
            return cache, nxt, out.at[:, i].set(nxt)

        kv_cache, _, guesses = lax.fori_loop(
            0, k, guess, (kv_cache, token, jnp.zeros((r, k), jnp.int32)))
        return kv_cache, guesses


def check_draft_config(draft: ModelConfig, target: ModelConfig) -> None:
    """ValueError where a draft cannot guess for `target`: their vocabularies must agree, padding
    aside."""
    if abs(draft.vocab_size - target.vocab_size) > VOCAB_PADDING_SLACK:
        raise ValueError(f"speculative_config.model: the draft's vocabulary ({draft.vocab_size} "
                         f"tokens) is not the target's ({target.vocab_size}); a draft model must "
                         f"share the target's tokenizer")
