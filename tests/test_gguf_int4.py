"""GGUF's 4-bit tensors kept at 4 bits (`quantization="gguf"`, converters/gguf_int4.py): each
block format split into 4-bit values, scales and mins against gguf's own dequantization, and the
default model (its projections are Q4_1) run at 4 bits against itself dequantized."""
from __future__ import annotations

import types

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
from gguf.quants import dequantize, quantize

from converters.gguf_int4 import int4_weight

T = gguf.GGMLQuantizationType
_PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ",
            "Once upon a time, in a small village,"]


def _tensor(qtype, out: int, inp: int, rng) -> types.SimpleNamespace:
    """A GGUF tensor of shape [out, in] (numpy order) in `qtype`, as GGUFReader gives it."""
    if qtype == T.Q4_K:  # gguf cannot quantize to Q4_K: random blocks with finite scales
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        raw = rng.integers(0, 256, (out, inp // block, size), dtype=np.uint8)
        raw[..., 0:4] = np.frombuffer(np.array([0.013, 0.021], np.float16).tobytes(), np.uint8)
        data = raw.reshape(out, -1)
    else:
        data = quantize(rng.standard_normal((out, inp)).astype(np.float32), qtype)
    return types.SimpleNamespace(name="blk.0.attn_q.weight", shape=[inp, out], tensor_type=qtype,
                                 data=data)


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_1, T.Q4_K], ids=lambda t: t.name)
def test_four_bit_blocks_against_gguf(qtype):
    """(q - zero) * scale (Q4_0: a zero point of 8) or q * scale + min per group of 32 is exactly
    gguf's dequantized tensor, the values span 0..15 (Q4_K: its two groups a byte run, its 6-bit
    scales and mins)."""
    t = _tensor(qtype, 6, 512, np.random.default_rng(int(qtype)))
    w = int4_weight(t)
    assert w.q.shape == (6, 512) and w.q.dtype == np.uint8 and w.perm is None
    assert w.scale.shape == w.offset.shape == (6, 16)
    assert (w.offset.dtype == np.uint8) == (qtype == T.Q4_0)
    g = np.arange(512) // 32
    off = w.offset[:, g]
    deq = ((w.q - off.astype(np.float32)) * w.scale[:, g] if qtype == T.Q4_0
           else w.q * w.scale[:, g] + off)
    np.testing.assert_array_equal(deq, dequantize(t.data, qtype).reshape(6, 512))
    assert w.q.min() == 0 and w.q.max() == 15


def test_other_types_are_refused():
    t = _tensor(T.Q4_0, 2, 64, np.random.default_rng(0))
    t.tensor_type = T.Q8_0
    with pytest.raises(ValueError, match="Q8_0"):
        int4_weight(t)


def _run(**engine_kw):
    from jaxvllm import LLM, SamplingParams
    llm = LLM(dtype="float32", max_model_len=128, max_num_seqs=4, max_num_batched_tokens=64,
              num_gpu_blocks_override=64, enforce_eager=True, token_buckets=(8, 64), **engine_kw)
    outs = llm.generate(_PROMPTS, SamplingParams(temperature=0, max_tokens=8, prompt_logprobs=0),
                        use_tqdm=False)
    return llm.llm_engine.runner.params, outs


def test_default_model_at_four_bits_matches_it_dequantized():
    """quantization="gguf": every projection of the default model stays packed (a quarter of a
    byte per weight plus a scale and min per 32) and, in float32, the model's prompt logprobs and
    greedy tokens are those of the same GGUF dequantized on load (the same values, multiplied in
    another order). q and k also check that llama.cpp's row permutation is undone on the packed
    rows, scales and mins."""
    params4, four = _run(quantization="gguf")
    params, ref = _run()
    lp4, lp = params4["layers"][0], params["layers"][0]
    for names in (("q", "k", "v"), ("o",), ("gate", "up"), ("down",)):  # fused where one input
        key = "+".join(names)
        inp, out = lp[names[0]].shape[0], sum(lp[n].shape[1] for n in names)
        assert lp4[key].dtype == jnp.uint8 and lp4[key].shape == (out, inp // 2), key
        assert lp4[key + "_scale"].shape == lp4[key + "_min"].shape == (inp // 32, out), key
    assert params4["embed"].dtype == jnp.float32  # Q8_0 in the file: dequantized, as before
    for a, b in zip(ref, four):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for pa, pb, tok in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:], a.prompt_token_ids[1:]):
            assert abs(pa[tok].logprob - pb[tok].logprob) < 2e-3


def test_gguf_quantization_needs_a_gguf():
    from converters import load_model
    from jaxvllm import LLM
    config = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
              "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 1,
              "vocab_size": 128, "max_position_embeddings": 64}
    with pytest.raises(ValueError, match="quantization='gguf'"):
        load_model(config, load_format="dummy", keep_gguf_4bit=True)
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        LLM(quantization="gguf", tensor_parallel_size=2)
