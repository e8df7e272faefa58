"""Structured outputs (grammar-constrained decoding) on the real engine with the default model: each
kind of constraint holds on the output, unconstrained requests in the same batch are unaffected,
and the pieces (the device mask, the scheduler's rules) against references."""
from __future__ import annotations

import json
import re

import jax.numpy as jnp
import jsonschema
import numpy as np
import pytest

from jaxvllm import LLM, SamplingParams, StructuredOutputsParams
from jaxvllm.worker.sampler import apply_token_bitmask

PERSON = {"type": "object",
          "properties": {"name": {"type": "string", "maxLength": 24},
                         "age": {"type": "integer", "minimum": 0, "maximum": 150},
                         "pets": {"type": "array", "items": {"type": "string", "maxLength": 12},
                                  "maxItems": 3}},
          "required": ["name", "age", "pets"], "additionalProperties": False}


@pytest.fixture(scope="module")
def llm():
    return LLM(dtype="float32", max_model_len=256, max_num_seqs=8, max_num_batched_tokens=64,
               num_gpu_blocks_override=96, enforce_eager=True, token_buckets=(8, 16, 32, 64))


def constrained(max_tokens: int = 80, temperature: float = 0.0, **spec) -> SamplingParams:
    return SamplingParams(temperature=temperature, max_tokens=max_tokens, seed=7,
                          structured_outputs=StructuredOutputsParams(**spec))


def test_json_schema_choice_regex_and_grammars_hold(llm):
    gbnf = 'root ::= "yes" | "no" | "maybe"'
    lark = 'start: NUM "+" NUM\nNUM: /[0-9]{1,3}/'
    outs = llm.generate(
        ["Describe a person as JSON:", "What colour is the sky?", "Today's date is",
         "Answer yes or no: is water wet?", "Write a sum:", "Give me any JSON object:"],
        [constrained(json=PERSON), constrained(choice=["red", "green", "blue"]),
         constrained(regex=r"\d{4}-\d{2}-\d{2}"), constrained(grammar=gbnf),
         constrained(max_tokens=12, grammar=lark), constrained(json_object=True)],
        use_tqdm=False)
    texts = [o.outputs[0].text for o in outs]
    jsonschema.validate(json.loads(texts[0]), PERSON)
    assert texts[1] in ("red", "green", "blue")
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", texts[2]), texts[2]
    assert texts[3] in ("yes", "no", "maybe")
    assert re.fullmatch(r"[0-9]{1,3}\+[0-9]{1,3}", texts[4]), texts[4]
    assert isinstance(json.loads(texts[5]), dict)
    # A complete output ends the request as a stop, its last token's text kept.
    for o in outs[:5]:
        assert o.outputs[0].finish_reason == "stop", o.outputs[0]


def test_json_schema_as_text_and_n_seeded_samples(llm):
    sp = constrained(temperature=1.0, json=json.dumps(PERSON))
    sp.n = 3
    sp.best_of = 3
    first = llm.generate(["Describe a person as JSON:"], sp, use_tqdm=False)[0]
    again = llm.generate(["Describe a person as JSON:"], sp, use_tqdm=False)[0]
    assert [c.token_ids for c in first.outputs] == [c.token_ids for c in again.outputs]
    assert len({tuple(c.token_ids) for c in first.outputs}) > 1  # distinct seeded samples
    for c in first.outputs:
        if c.finish_reason == "stop":
            jsonschema.validate(json.loads(c.text), PERSON)


def test_unconstrained_requests_beside_constrained_ones_are_unchanged(llm):
    free = SamplingParams(temperature=0.0, max_tokens=24)
    prompts = ["Tell me about rivers.", "Name three colours."]
    alone = [o.outputs[0].token_ids for o in llm.generate(prompts, free, use_tqdm=False)]
    mixed = llm.generate([prompts[0], "Describe a person as JSON:", prompts[1]],
                         [free, constrained(json=PERSON), free], use_tqdm=False)
    assert [mixed[0].outputs[0].token_ids, mixed[2].outputs[0].token_ids] == alone
    jsonschema.validate(json.loads(mixed[1].outputs[0].text), PERSON)


def test_logprobs_and_stop_strings_with_a_grammar(llm):
    sp = constrained(regex=r"[a-z]+( [a-z]+){5}")
    sp.logprobs = 2
    out = llm.generate(["Write six words:"], sp, use_tqdm=False)[0].outputs[0]
    assert re.fullmatch(r"[a-z]+( [a-z]+){5}", out.text), out.text
    assert len(out.logprobs) == len(out.token_ids)
    # The sampled token of each step is one the grammar allowed: its logprob is finite.
    assert all(np.isfinite(step[t].logprob) for step, t in zip(out.logprobs, out.token_ids))
    words = out.text.split(" ")
    sp.logprobs, sp.stop = None, [" " + words[2]]
    stopped = llm.generate(["Write six words:"], sp, use_tqdm=False)[0].outputs[0]
    assert stopped.text == " ".join(words[:2]) and stopped.stop_reason == " " + words[2]


def test_constrained_requests_survive_preemption():
    """A cache too small for all of them: requests are preempted and recomputed, and every output
    still validates."""
    small = LLM(dtype="float32", max_model_len=160, max_num_seqs=8, max_num_batched_tokens=64,
                num_gpu_blocks_override=12, enforce_eager=True, token_buckets=(8, 16, 32, 64))
    prompts = [f"Person number {i} as JSON:" for i in range(6)]
    outs = small.generate(prompts, constrained(max_tokens=120, json=PERSON), use_tqdm=False)
    assert small.llm_engine.scheduler.num_preemptions > 0
    for o in outs:
        jsonschema.validate(json.loads(o.outputs[0].text), PERSON)


@pytest.mark.parametrize("spec, field", [
    ({"json": {"type": "object", "properties": {"a": {"type": "no-such-type"}}}}, "json"),
    ({"json": "{not json"}, "json"),
    ({"regex": "(unclosed"}, "regex"),
    ({"grammar": "start: undefined_rule"}, "grammar"),
])
def test_a_bad_spec_is_a_value_error_naming_it(llm, spec, field):
    with pytest.raises(ValueError, match=f"structured_outputs.{field}"):
        llm.generate(["x"], constrained(**spec), use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()


def test_params_need_exactly_one_constraint():
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams()
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams(regex="a", choice=["a"])
    with pytest.raises(ValueError, match="choice"):
        StructuredOutputsParams(choice=[])
    with pytest.raises(ValueError, match="structured_outputs"):
        SamplingParams(structured_outputs={"regex": "a"})


def test_device_mask_matches_a_reference():
    rng = np.random.default_rng(0)
    r, v = 5, 70  # 70 ids: the last word is partly past the vocabulary
    bitmask = rng.integers(-2 ** 31, 2 ** 31, size=(r, (v + 31) // 32), dtype=np.int64)
    bitmask = bitmask.astype(np.int32)
    logits = rng.standard_normal((r, v)).astype(np.float32)
    want = logits.copy()
    for i in range(r):
        for t in range(v):
            if not (int(bitmask[i, t // 32]) >> (t % 32)) & 1:
                want[i, t] = -np.inf
    got = np.asarray(apply_token_bitmask(jnp.asarray(logits), jnp.asarray(bitmask)))
    np.testing.assert_array_equal(got, want)


def test_logit_bias_and_allowed_token_ids(llm):
    """OpenAI's logit_bias (+100 forces a token, -100 bans one) and vLLM's allowed_token_ids, each
    in a batch beside an unbiased request that keeps its own tokens."""
    greedy = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    prompts = ["The capital of France is", "Tell me about rivers."]
    plain = llm.generate(prompts, greedy, use_tqdm=False)
    first = plain[0].outputs[0].token_ids[0]
    forced, banned, allowed = greedy.clone(), greedy.clone(), greedy.clone()
    forced.logit_bias = {1234: 100.0}
    banned.logit_bias = {first: -100.0}
    allowed.allowed_token_ids = [300, 301, 302]
    outs = llm.generate([prompts[0], prompts[0], prompts[0], prompts[1]],
                        [forced, banned, allowed, greedy], use_tqdm=False)
    assert outs[0].outputs[0].token_ids == [1234] * 6
    assert outs[1].outputs[0].token_ids[0] != first
    assert set(outs[2].outputs[0].token_ids) <= {300, 301, 302}
    assert outs[3].outputs[0].token_ids == plain[1].outputs[0].token_ids
    sampled = greedy.clone()
    sampled.temperature, sampled.seed, sampled.allowed_token_ids = 1.0, 3, [300, 301, 302]
    assert set(llm.generate(prompts[:1], sampled, use_tqdm=False)[0].outputs[0].token_ids) <= {
        300, 301, 302}
    bad = greedy.clone()
    bad.logit_bias = {10 ** 6: 1.0}
    with pytest.raises(ValueError, match="logit_bias"):
        llm.generate(prompts[:1], bad, use_tqdm=False)


def test_chat_renders_tools_and_tool_turns(llm):
    """LLM.chat(tools=...) hands the tools to the chat template, and tool-call turns and tool
    results render through it; a malformed tool is a ValueError naming it."""
    template = ("{% for t in tools %}TOOL {{ t.function.name }}|{% endfor %}"
                "{% for m in messages %}{{ m.role }}: {{ m.content }}"
                "{% for c in m.tool_calls or [] %}CALL {{ c.function.name }} "
                "{{ c.function.arguments | tojson }}{% endfor %}|{% endfor %}")
    tools = [{"type": "function", "function": {"name": "get_weather",
                                               "parameters": {"type": "object"}}}]
    messages = [{"role": "user", "content": "Weather?"},
                {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {
                    "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    out = llm.chat(messages, SamplingParams(max_tokens=2), use_tqdm=False,
                   chat_template=template, tools=tools)[0]
    assert out.prompt == ('TOOL get_weather|user: Weather?|assistant: CALL get_weather '
                          '{"city": "Paris"}|tool: sunny|')
    with pytest.raises(ValueError, match=r"tools\[0\]\.function"):
        llm.chat(messages[:1], tools=[{"type": "function"}], use_tqdm=False)


def _contains(seq, sub):
    return any(seq[i:i + len(sub)] == sub for i in range(len(seq) - len(sub) + 1))


def test_bad_words_are_never_generated(llm):
    greedy = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    prompt = ["Tell me about rivers."]
    plain = llm.generate(prompt, greedy, use_tqdm=False)[0].outputs[0]
    tok = llm.llm_engine.tokenizer
    # A two-token phrase the model wrote, banned: it may start the phrase, never finish it.
    ids = plain.token_ids
    phrase = next(tok.decode(ids[i:i + 2]) for i in range(len(ids) - 1)
                  if len(tok.encode(tok.decode(ids[i:i + 2]), add_special_tokens=False)) == 2)
    banned = greedy.clone()
    banned.bad_words = [phrase]
    out = llm.generate(prompt, banned, use_tqdm=False)[0].outputs[0]
    for variant in {phrase, " " + phrase.lstrip()}:
        assert not _contains(out.token_ids, tok.encode(variant, add_special_tokens=False))
    assert out.token_ids != plain.token_ids
    # A one-token word is banned everywhere.
    word = tok.decode(ids[:1])
    banned.bad_words = [word]
    out = llm.generate(prompt, banned, use_tqdm=False)[0].outputs[0]
    assert ids[0] not in out.token_ids
    with pytest.raises(ValueError, match="bad_words"):
        SamplingParams(bad_words=["x"], allowed_token_ids=[1])


def test_constrained_requests_guess_and_decode_as_without_guessing():
    """With prompt-lookup speculation, grammars (JSON schema, regex, choice) and bad_words mask
    every guess row (the matcher advanced over the guesses before it, then rolled back): greedy
    output token for token as plain decoding's (batch-invariant mode: a verified row's logits are
    a single row's), the constraints hold, and guesses are kept."""
    text = '{"name": "Ada Lovelace", "age": 36, "pets": ["cat", "owl"]}'
    prompts = [f"Copy this JSON exactly.\n{text}\n{text}\n", "Repeat: 2024-01-15, 2024-01-15, ",
               "Pick one: red, green or blue. Answer: blue, blue, ",
               "The cat sat on the mat. The cat sat on the mat. The cat"]
    g = dict(temperature=0.0, max_tokens=40)
    kinds = [constrained(**g, json=PERSON),
             constrained(**g, regex=r"\d{4}-\d{2}-\d{2}(, \d{4}-\d{2}-\d{2}){0,2}"),
             constrained(**g, choice=["red", "green", "blue"]),
             SamplingParams(**g, ignore_eos=True, bad_words=[" mat"])]
    outs, stats = {}, None
    for spec in (None, {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4,
                        "prompt_lookup_min": 2}):
        llm = LLM(dtype="float32", max_model_len=256, max_num_seqs=8, max_num_batched_tokens=64,
                  num_gpu_blocks_override=96, enforce_eager=True, batch_invariant=True,
                  speculative_config=spec)
        outs[spec is None] = llm.generate(prompts, kinds, use_tqdm=False)
        stats = llm.llm_engine.get_stats().spec_decode
    for a, b in zip(outs[True], outs[False]):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert a.outputs[0].finish_reason == b.outputs[0].finish_reason
    assert stats.num_accepted_tokens > 20, stats
    texts = [o.outputs[0].text for o in outs[False]]
    jsonschema.validate(json.loads(texts[0]), PERSON)
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}(, \d{4}-\d{2}-\d{2}){0,2}", texts[1])
    assert texts[2] in ("red", "green", "blue")
    tok = outs[False][3].outputs[0].token_ids
    assert not _contains(tok, llm.llm_engine.tokenizer.encode(" mat", add_special_tokens=False))
