"""logprobs_mode (vLLM's engine argument): what logprobs and prompt_logprobs hold, on the default
model through the engine: processed log-probabilities are the distribution each token was drawn
from, raw logits are the model's own (against HF transformers)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from jaxvllm import LLM, SamplingParams

PROMPT = "The capital of France is"


def _llm(mode: str) -> LLM:
    return LLM(dtype="float32", max_model_len=128, max_num_seqs=4, max_num_batched_tokens=64,
               num_gpu_blocks_override=64, enforce_eager=True, token_buckets=(8, 64),
               logprobs_mode=mode)


def test_processed_logprobs_are_the_sampling_distribution():
    """top_k=5 at temperature 0.7: the processed distribution has exactly five tokens, so the five
    logprobs returned at each step sum to probability 1 and hold the sampled token (raw logprobs
    of the same five sum to less); greedy rows' processed logprobs carry no temperature."""
    llm = _llm("processed_logprobs")
    sp = SamplingParams(temperature=0.7, top_k=5, max_tokens=8, logprobs=5, seed=3)
    out = llm.generate([PROMPT], sp, use_tqdm=False)[0].outputs[0]
    for tok, entry in zip(out.token_ids, out.logprobs):
        assert tok in entry and len(entry) == 5
        assert abs(sum(math.exp(lp.logprob) for lp in entry.values()) - 1) < 1e-4
        assert sorted(lp.rank for lp in entry.values()) == [1, 2, 3, 4, 5]
    greedy = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=4, logprobs=1),
                          use_tqdm=False)[0].outputs[0]
    assert all(entry[t].logprob < 0 for t, entry in zip(greedy.token_ids, greedy.logprobs))


def test_raw_logits_are_the_models_logits(hf_default_model):
    import torch
    llm = _llm("raw_logits")
    ids = llm.get_tokenizer().encode(PROMPT)
    sp = SamplingParams(temperature=0, max_tokens=1, logprobs=3, prompt_logprobs=3)
    out = llm.generate([{"prompt_token_ids": ids}], sp, use_tqdm=False)[0]
    with torch.no_grad():
        want = hf_default_model(torch.tensor([ids])).logits[0].double().numpy()
    entries = out.prompt_logprobs[1:] + out.outputs[0].logprobs  # position i scores token i + 1
    for pos, entry in enumerate(entries):
        top = np.argsort(-want[pos])[:3]
        assert set(top) <= set(entry), (pos, top, entry)
        for tok, lp in entry.items():
            assert abs(lp.logprob - want[pos, tok]) < 2e-3 * max(1.0, abs(want[pos, tok]))


def test_logprobs_mode_is_checked():
    from jaxvllm.config import EngineArgs
    with pytest.raises(ValueError, match="logprobs_mode"):
        EngineArgs(logprobs_mode="logprobs")
