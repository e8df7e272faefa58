"""GGUF's quantized tensors kept small (`quantization="gguf"`, converters/gguf_quant.py): each
4-bit block format split into 4-bit values, scales and mins, and Q8_0's bytes and scales, against
gguf's own dequantization; the default model (its projections are Q4_1) run at 4 bits, and a tiny
Q8_0 GGUF at 8, against themselves dequantized."""
from __future__ import annotations

import types

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
from gguf.quants import dequantize, quantize

from converters.gguf_quant import int4_weight, int8_weight

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


def test_q8_0_bytes_and_scales_against_gguf():
    """Q8_0's signed bytes as they are and a float32 scale per 32 inputs: their product is gguf's
    dequantized tensor."""
    t = _tensor(T.Q8_0, 6, 512, np.random.default_rng(8))
    w = int8_weight(t)
    assert w.q.shape == (6, 512) and w.q.dtype == np.int8 and w.q.min() < 0 < w.q.max()
    assert w.scale.shape == (6, 16) and w.scale.dtype == np.float32
    np.testing.assert_array_equal(w.q * w.scale[:, np.arange(512) // 32],
                                  dequantize(t.data, T.Q8_0).reshape(6, 512))


def test_other_types_are_refused():
    t = _tensor(T.Q4_0, 2, 64, np.random.default_rng(0))
    t.tensor_type = T.Q6_K
    with pytest.raises(ValueError, match="Q6_K.*int4 layout.*Q4_0, Q4_1, Q4_K"):
        int4_weight(t)
    with pytest.raises(ValueError, match="Q6_K.*int8 layout.*Q8_0"):
        int8_weight(t)
    with pytest.raises(ValueError, match="Q8_0.*int4 layout"):
        int4_weight(_tensor(T.Q8_0, 2, 64, np.random.default_rng(0)))


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
        load_model(config, load_format="dummy", keep_gguf_quantized=True)
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        LLM(quantization="gguf", tensor_parallel_size=2)


_GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
               "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
               "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
               "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def _q8_0_gguf(tmp_path, arch: str) -> str:
    """A tiny GGUF of `arch` ("qwen2": its q/k rows as HF's; "llama": permuted as llama.cpp's
    converter writes them) whose projections with inputs a multiple of 32 are Q8_0; the rest
    (down, of 80 inputs; norms, biases, embedding) float32."""
    from safetensors.numpy import load_file
    from hf_builders import save_word_tokenizer, tiny_config, tiny_model
    cfg = tiny_config(arch, vocab_size=128, hidden_size=64, intermediate_size=80,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      tie_word_embeddings=False)
    tiny_model(cfg, matrix_scale=4.0).save_pretrained(tmp_path / "hf")
    sd = load_file(tmp_path / "hf" / "model.safetensors")
    path = str(tmp_path / f"tiny-{arch}-q8_0.gguf")
    w = gguf.GGUFWriter(path, arch)
    for add, value in ((w.add_block_count, 2), (w.add_context_length, 128),
                       (w.add_embedding_length, 64), (w.add_feed_forward_length, 80),
                       (w.add_head_count, 4), (w.add_head_count_kv, 2),
                       (w.add_rope_freq_base, 10000.0), (w.add_layer_norm_rms_eps, 1e-6),
                       (w.add_vocab_size, 128)):
        add(value)
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight":
           "output_norm.weight", "lm_head.weight": "output.weight"}
    for name, t in sd.items():
        if name in top:
            g = top[name]
        else:
            _, _, i, rest = name.split(".", 3)
            module, kind = rest.rsplit(".", 1)
            g = f"blk.{i}.{_GGUF_NAMES[module]}.{kind}"
        t = t.astype(np.float32)
        heads = {"attn_q.weight": 4, "attn_k.weight": 2}.get(g.split(".", 2)[-1])
        if arch == "llama" and heads:  # llama.cpp's permute(): rows [head, 2, dim/2]
            t = t.reshape(heads, 2, t.shape[0] // heads // 2, -1).swapaxes(1, 2).reshape(t.shape)
        if t.ndim == 2 and "blk." in g and t.shape[1] % 32 == 0:
            w.add_tensor(g, quantize(t, T.Q8_0), raw_dtype=T.Q8_0)
        else:
            w.add_tensor(g, np.ascontiguousarray(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    save_word_tokenizer(tmp_path / "hf", 128)
    return path


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_q8_0_projections_in_the_int8_layout_match_them_dequantized(tmp_path, arch):
    """quantization="gguf" keeps Q8_0 projections at a byte a weight (their signed bytes, a scale
    per 32 inputs; q/k/v and gate/up fused as the 4-bit ones) and, in float32, gives the prompt
    logprobs and greedy tokens of the same GGUF dequantized on load; llama's permuted q/k rows are
    put back with their scales."""
    from jaxvllm import LLM, SamplingParams
    path = _q8_0_gguf(tmp_path, arch)
    prompts = [{"prompt_token_ids": list(range(3 + j, 3 + j + n))} for j, n in enumerate((7, 19))]
    sp = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, prompt_logprobs=0)
    runs = {}
    for kind, extra in (("plain", {}), ("gguf", {"quantization": "gguf"})):
        llm = LLM(model=path, tokenizer=str(tmp_path / "hf"), dtype="float32", max_model_len=64,
                  max_num_seqs=4, max_num_batched_tokens=32, num_gpu_blocks_override=16,
                  enforce_eager=True, token_buckets=(8, 32), **extra)
        runs[kind] = (llm.llm_engine.runner.params["layers"][0],
                      llm.generate(prompts, sp, use_tqdm=False))
    lp, outs = runs["gguf"]
    assert lp["q+k+v"].dtype == jnp.int8 and lp["q+k+v"].shape == (128, 64)  # [out, in] bytes
    assert lp["q+k+v_scale"].shape == (2, 128) and lp["q+k+v_scale"].dtype == jnp.float32
    assert not any(k.endswith(("_zero", "_min")) for k in lp)
    assert lp["gate+up"].shape == (160, 64) and lp["o"].shape == (64, 64)
    assert lp["down"].dtype == jnp.float32
    for a, b in zip(runs["plain"][1], outs):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for pa, pb, tok in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:], a.prompt_token_ids[1:]):
            assert abs(pa[tok].logprob - pb[tok].logprob) < 1e-3


@pytest.mark.parametrize("rows", [1, 16, 80])
def test_q8_0_through_int8_linear(rows):
    """A Q8_0 weight in the int8 layout through models/int8.int8_linear (on a GPU the Pallas GEMM
    up to its MAX_ROWS, else dequantized by XLA) against the weight dequantized, in float64."""
    from jaxvllm.models.int8 import int8_linear
    rng = np.random.default_rng(rows)
    t = _tensor(T.Q8_0, 256, 512, rng)
    w = int8_weight(t)
    x = jnp.asarray(rng.standard_normal((rows, 512)), jnp.bfloat16)
    y = int8_linear(x, jnp.asarray(w.q), jnp.asarray(w.scale.T))
    ref = np.asarray(x, np.float64) @ dequantize(t.data, T.Q8_0).reshape(256, 512).T.astype(np.float64)
    err = np.abs(np.asarray(y, np.float64) - ref).max() / np.abs(ref).max()
    assert y.shape == (rows, 256) and y.dtype == jnp.bfloat16 and err < 0.01, err
