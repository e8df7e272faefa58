"""Penalties (repetition, frequency, presence; vLLM semantics) and min_tokens stop-id masking on the
engine, against an independent reference: greedy decoding step by step with the HF transformers
model of the same tiny random Llama (float32), the penalties and the masking applied in numpy to
each step's last-position logits; for repetition alone also HF's own `generate`.

The engine keeps each request's seen tokens and output counts in a device table, written when the
request (re)enters the batch and updated on the device with every sampled token while the next step
is already dispatched (async scheduling). So the cases are the paths where that can go wrong: a
prompt prefilled in several chunks, prompt tokens that come from the prefix cache (never in a model
step), a batch of penalized and plain requests with n > 1, requests preempted and recomputed, and
min_tokens counted while the previous step's sample is still on the device."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pytest
import torch
from transformers import GenerationConfig, LlamaForCausalLM

from hf_builders import FAR_FROM_FLAT, tiny_config, tiny_model
from jaxvllm import LLM, SamplingParams

VOCAB = 256
EOS = 2  # written to generation_config.json: the engine masks it under min_tokens, as vLLM does
BLOCK = 8
MAX_TOKENS = 20
BUDGET = 32  # max_num_batched_tokens: the long prompts below are prefilled in three chunks
LONG = 70


def _prompt(seed: int, n: int) -> list[int]:
    return np.random.RandomState(seed).randint(0, VOCAB, size=n).tolist()


@pytest.fixture(scope="module")
def hf_model() -> LlamaForCausalLM:
    return tiny_model(tiny_config(vocab_size=VOCAB, intermediate_size=96, num_attention_heads=8,
                                  eos_token_id=EOS), **FAR_FROM_FLAT)


def _engine(model: LlamaForCausalLM, path: Path, num_blocks: int, max_model_len: int) -> LLM:
    model.save_pretrained(path)
    return LLM(model=str(path), dtype="float32", enforce_eager=True, max_model_len=max_model_len,
               max_num_seqs=8, max_num_batched_tokens=BUDGET, token_buckets=(8, 16, BUDGET),
               block_size=BLOCK, num_gpu_blocks_override=num_blocks, weights_cache_dir="none",
               compilation_cache_dir=os.environ.get("JAXVLLM_TEST_COMPILE_CACHE", "none"),
               disable_log_stats=True)


@pytest.fixture(scope="module")
def llm(hf_model, tmp_path_factory) -> LLM:
    return _engine(hf_model, tmp_path_factory.mktemp("llama"), num_blocks=64, max_model_len=128)


def reference(model: LlamaForCausalLM, prompt: Sequence[int], max_tokens: int = MAX_TOKENS, *,
              repetition_penalty: float = 1.0, frequency_penalty: float = 0.0,
              presence_penalty: float = 0.0, stop_token_ids: Sequence[int] = (),
              min_tokens: int = 0, seen_prompt: Optional[Sequence[int]] = None) -> list[int]:
    """Greedy tokens under vLLM's penalties: repetition over tokens of the prompt or the output,
    frequency and presence over the output's counts; stop ids (and EOS) masked while the output
    is shorter than min_tokens, and a stop id ends it after. `seen_prompt`: the prompt tokens the
    repetition penalty sees (default all), to show a case depends on them."""
    seen_prompt = prompt if seen_prompt is None else seen_prompt
    out: list[int] = []
    while len(out) < max_tokens:
        with torch.no_grad():
            x = model(torch.tensor([list(prompt) + out])).logits[0, -1].numpy()
        if len(out) < min_tokens:
            x[list(stop_token_ids) + [EOS]] = -np.inf
        seen = np.zeros(VOCAB, bool)
        seen[list(seen_prompt) + out] = True
        x = np.where(seen, np.where(x > 0, x / repetition_penalty, x * repetition_penalty), x)
        counts = np.bincount(np.asarray(out, np.int64), minlength=VOCAB)
        x = x - frequency_penalty * counts - presence_penalty * (counts > 0)
        top2 = np.sort(x)[-2:]
        # A near tie would make the comparison depend on rounding, not on the penalties.
        assert top2[1] - top2[0] > 1e-4, f"near tie at output {len(out)}: pick another case"
        out.append(int(np.argmax(x)))
        if out[-1] in stop_token_ids and len(out) >= min_tokens:
            break
    return out


def _greedy(**kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, **kw)


def _run(llm: LLM, prompts: list[list[int]], params) -> list[list[list[int]]]:
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [[list(c.token_ids) for c in o.outputs] for o in outs]


def test_async_scheduling_is_on(llm):
    # The penalty steps are meant to overlap: the next step is dispatched before the previous
    # one's samples reach the host, and every test below runs that way.
    assert llm.llm_engine.args.async_scheduling


def test_repetition_penalty_matches_hf_generate(llm, hf_model):
    prompt = _prompt(1, 20)
    want = reference(hf_model, prompt, repetition_penalty=1.6)
    assert want != reference(hf_model, prompt)  # the penalty changes the greedy path
    gen = GenerationConfig(do_sample=False, repetition_penalty=1.6, max_new_tokens=MAX_TOKENS,
                           min_new_tokens=0, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        hf = hf_model.generate(torch.tensor([prompt]), generation_config=gen)[0, len(prompt):]
    assert hf.tolist() == want
    assert _run(llm, [prompt], _greedy(repetition_penalty=1.6)) == [[want]]


# (prompt seed, penalties): each changes the greedy path, and the frequency/presence ones also give
# another path with the two swapped, so neither can stand in for the other.
CASES = {
    "frequency_negative_presence": (1, dict(frequency_penalty=0.4, presence_penalty=-0.6,
                                            repetition_penalty=1.2)),
    "negative_frequency": (4, dict(frequency_penalty=-0.3, presence_penalty=0.6)),
    "repetition_below_one": (1, dict(repetition_penalty=0.85, frequency_penalty=0.5,
                                     presence_penalty=0.1)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_mixed_penalties(llm, hf_model, case):
    seed, kw = CASES[case]
    prompt = _prompt(seed, 20)
    want = reference(hf_model, prompt, **kw)
    assert want != reference(hf_model, prompt)
    swapped = dict(kw, frequency_penalty=kw["presence_penalty"],
                   presence_penalty=kw["frequency_penalty"])
    assert want != reference(hf_model, prompt, **swapped)
    assert _run(llm, [prompt], _greedy(**kw)) == [[want]]


def test_long_prompt_in_chunks(llm, hf_model):
    # Prefilled in three chunks: only the last one samples, and the row must hold the whole prompt.
    prompt = _prompt(2, LONG)
    kw = dict(repetition_penalty=1.5, frequency_penalty=0.2)
    want = reference(hf_model, prompt, **kw)
    assert want != reference(hf_model, prompt)
    assert _run(llm, [prompt], _greedy(**kw)) == [[want]]


def test_prefix_cached_prompt_tokens_count_as_seen(llm, hf_model):
    first = _prompt(5, LONG)
    _run(llm, [first], _greedy())  # leaves its blocks in the prefix cache
    cached = 64  # whole blocks of the shared prefix
    prompt = first[:cached] + _prompt(6, LONG - cached)
    kw = dict(repetition_penalty=1.5)
    want = reference(hf_model, prompt, **kw)
    # Penalizing only the tokens the model step computes would give another path.
    assert want != reference(hf_model, prompt, seen_prompt=prompt[cached:], **kw)
    out = llm.generate({"prompt_token_ids": prompt}, _greedy(**kw), use_tqdm=False)[0]
    assert out.num_cached_tokens == cached
    assert list(out.outputs[0].token_ids) == want


def test_batch_of_penalized_plain_and_parallel_requests(llm, hf_model):
    # The same prompt penalized and plain in one batch: each row reads its own table row or none.
    # n = 2 siblings (the second hits the first's prompt blocks) each get a row of their own.
    shared, other, par = _prompt(7, 24), _prompt(10, 40), _prompt(9, 24)
    pen = dict(repetition_penalty=1.3, frequency_penalty=0.3, presence_penalty=-0.2)
    rep = dict(repetition_penalty=1.6)
    requests = [(shared, pen, 1), (shared, {}, 1), (other, rep, 1), (par, pen, 2), (par, {}, 2)]
    want = [[reference(hf_model, p, **kw)] * n for p, kw, n in requests]
    assert want[0] != want[1] and want[3] != want[4]
    got = _run(llm, [p for p, _, _ in requests], [_greedy(n=n, **kw) for _, kw, n in requests])
    assert got == want


@pytest.mark.parametrize("prompt,stop_ids,min_tokens,penalties", [
    (_prompt(1, 20), [17, 26], 4, {}),  # only stop bits in the row
    (_prompt(13, 16), [12, 231], 10, dict(repetition_penalty=1.2)),
], ids=["mask_only", "with_penalty"])
def test_min_tokens_masks_stop_ids(llm, hf_model, prompt, stop_ids, min_tokens, penalties):
    assert reference(hf_model, prompt, **penalties)[0] in stop_ids  # greedy would stop at once

    def ref(k: int) -> list[int]:
        return reference(hf_model, prompt, stop_token_ids=stop_ids, min_tokens=k, **penalties)

    want = ref(min_tokens)
    assert not set(want[:min_tokens]) & set(stop_ids)
    # Counting outputs one off either way (e.g. missing the sample still on the device) gives
    # another result.
    assert ref(min_tokens - 1) != want != ref(min_tokens + 1)
    got = _run(llm, [prompt], _greedy(stop_token_ids=stop_ids, min_tokens=min_tokens, **penalties))
    assert got == [[want]]


def test_preempted_requests_keep_their_counts(hf_model, tmp_path, monkeypatch):
    # 11 usable blocks of 8 tokens for four requests that need 6 each: they preempt each other and
    # come back with their outputs recomputed, and their rows rewritten from the host's tokens.
    llm = _engine(hf_model, tmp_path, num_blocks=12, max_model_len=64)
    batch = llm.llm_engine.runner.input_batch
    new_state, outputs_at_entry = batch._new_state, []

    def spy(nr):
        outputs_at_entry.append(len(nr.output_token_ids))
        return new_state(nr)

    monkeypatch.setattr(batch, "_new_state", spy)
    prompts = [_prompt(20 + i, 24) for i in range(4)]
    kws = [dict(repetition_penalty=1.3, frequency_penalty=0.3, presence_penalty=-0.2),
           dict(frequency_penalty=0.6), dict(presence_penalty=-0.5, repetition_penalty=1.1),
           dict(repetition_penalty=1.6)]
    want = [[reference(hf_model, p, **kw)] for p, kw in zip(prompts, kws)]
    got = _run(llm, prompts, [_greedy(**kw) for kw in kws])
    assert llm.llm_engine.scheduler.stats.num_preemptions > 0
    assert max(outputs_at_entry) > 1  # some request came back with outputs to count
    assert got == want
