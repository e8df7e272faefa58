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


# Where each K-quant block keeps its float16 d (and dmin): gguf cannot quantize to these, so the
# tests write random blocks with these set to small finite scales.
_K_SCALES = {T.Q4_K: (slice(0, 4), [0.013, 0.021]), T.Q5_K: (slice(0, 4), [0.013, 0.021]),
             T.Q6_K: (slice(-2, None), [0.0007])}


def _data(qtype, w: np.ndarray, rng) -> np.ndarray:
    """w [out, in] float32 in `qtype`'s raw blocks: gguf's quantization, or for a K-quant random
    blocks (w's shape only) with small scales."""
    if qtype not in _K_SCALES:
        return quantize(w, qtype)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (w.shape[0], w.shape[1] // block, size), dtype=np.uint8)
    where, scales = _K_SCALES[qtype]
    raw[..., where] = np.frombuffer(np.array(scales, np.float16).tobytes(), np.uint8)
    return raw.reshape(w.shape[0], -1)


def _tensor(qtype, out: int, inp: int, rng) -> types.SimpleNamespace:
    """A GGUF tensor of shape [out, in] (numpy order) in `qtype`, as GGUFReader gives it."""
    data = _data(qtype, rng.standard_normal((out, inp)).astype(np.float32), rng)
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


@pytest.mark.parametrize("qtype, group, lo, hi, with_min", [
    (T.Q8_0, 32, -127, 127, False), (T.Q5_0, 32, -16, 15, False), (T.Q5_1, 32, 0, 31, True),
    (T.Q5_K, 32, 0, 31, True), (T.Q6_K, 16, -32, 31, False)],
    ids=["Q8_0", "Q5_0", "Q5_1", "Q5_K", "Q6_K"])
def test_int8_blocks_against_gguf(qtype, group, lo, hi, with_min):
    """Each 5- to 8-bit format's integer values a byte each with a float32 scale (and min) per
    group: q * scale (+ min) is exactly gguf's dequantized tensor, the values span the format's
    range (Q8_0's signed bytes, Q5_0's and Q6_K's offset ones, Q5_1's and Q5_K's with a min)."""
    t = _tensor(qtype, 6, 512, np.random.default_rng(int(qtype)))
    w = int8_weight(t)
    assert w.q.shape == (6, 512) and w.q.dtype == np.int8
    assert w.scale.shape == (6, 512 // group) and w.scale.dtype == np.float32
    assert (w.offset is not None) == with_min
    g = np.arange(512) // group
    deq = w.q * w.scale[:, g] + (w.offset[:, g] if with_min else 0)
    np.testing.assert_array_equal(deq, dequantize(t.data, qtype).reshape(6, 512))
    q_lo, q_hi = int(w.q.min()), int(w.q.max())
    assert lo <= q_lo < q_hi <= hi and q_hi - q_lo > (hi - lo) // 2


def test_other_types_are_refused():
    t = _tensor(T.Q4_0, 2, 64, np.random.default_rng(0))
    t.tensor_type = T.Q2_K
    with pytest.raises(ValueError, match="Q2_K.*int4 layout.*Q4_0, Q4_1, Q4_K"):
        int4_weight(t)
    with pytest.raises(ValueError, match="Q2_K.*int8 layout.*Q5_0, Q5_1, Q5_K, Q6_K, Q8_0"):
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
    config = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
              "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 1,
              "vocab_size": 128, "max_position_embeddings": 64}
    with pytest.raises(ValueError, match="quantization='gguf'"):
        load_model(config, load_format="dummy", keep_gguf_quantized=True)


_GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
               "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
               "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
               "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def _tiny_gguf(tmp_path, arch: str, kinds: dict, hidden: int = 64, inter: int = 80) -> str:
    """A tiny GGUF of `arch` ("qwen2": its q/k rows as HF's; "llama": permuted as llama.cpp's
    converter writes them) whose projections named in `kinds` (GGUF's names: "attn_q", ...) are
    stored in that type (_data: a K-quant's blocks random); the rest (norms, biases, embedding,
    other projections) float32."""
    from safetensors.numpy import load_file
    from hf_builders import save_word_tokenizer, tiny_config, tiny_model
    cfg = tiny_config(arch, vocab_size=128, hidden_size=hidden, intermediate_size=inter,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      tie_word_embeddings=False)
    tiny_model(cfg, matrix_scale=4.0).save_pretrained(tmp_path / "hf")
    sd = load_file(tmp_path / "hf" / "model.safetensors")
    path = str(tmp_path / f"tiny-{arch}.gguf")
    w = gguf.GGUFWriter(path, arch)
    for add, value in ((w.add_block_count, 2), (w.add_context_length, 128),
                       (w.add_embedding_length, hidden), (w.add_feed_forward_length, inter),
                       (w.add_head_count, 4), (w.add_head_count_kv, 2),
                       (w.add_rope_freq_base, 10000.0), (w.add_layer_norm_rms_eps, 1e-6),
                       (w.add_vocab_size, 128)):
        add(value)
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight":
           "output_norm.weight", "lm_head.weight": "output.weight"}
    rng = np.random.default_rng(0)
    for name, t in sd.items():
        if name in top:
            g = top[name]
        else:
            _, _, i, rest = name.split(".", 3)
            module, kind = rest.rsplit(".", 1)
            g = f"blk.{i}.{_GGUF_NAMES[module]}.{kind}"
        t = t.astype(np.float32)
        short = g.split(".")[2] if g.startswith("blk.") and g.endswith(".weight") else None
        heads = {"attn_q": 4, "attn_k": 2}.get(short)
        if arch == "llama" and heads:  # llama.cpp's permute(): rows [head, 2, dim/2]
            t = t.reshape(heads, 2, t.shape[0] // heads // 2, -1).swapaxes(1, 2).reshape(t.shape)
        if short in kinds:
            w.add_tensor(g, _data(kinds[short], t, rng), raw_dtype=kinds[short])
        else:
            w.add_tensor(g, np.ascontiguousarray(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    save_word_tokenizer(tmp_path / "hf", 128)
    return path


_ALL_Q8_0 = {k: T.Q8_0 for k in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate",
                                 "ffn_up")}
_FIVE_BITS = {"attn_q": T.Q8_0, "attn_k": T.Q5_0, "attn_v": T.Q5_1, "attn_output": T.Q5_0,
              "ffn_gate": T.Q5_1, "ffn_up": T.Q5_1}
_K_QUANTS = {"attn_q": T.Q5_K, "attn_k": T.Q5_K, "attn_v": T.Q5_K, "attn_output": T.Q4_K,
             "ffn_gate": T.Q6_K, "ffn_up": T.Q6_K, "ffn_down": T.Q6_K}


@pytest.mark.parametrize("arch, kinds, hidden, inter", [
    ("qwen2", _ALL_Q8_0, 64, 80), ("llama", _FIVE_BITS, 64, 80), ("llama", _K_QUANTS, 256, 512)],
    ids=["qwen2-q8_0", "llama-q5_0-q5_1-q8_0", "llama-q4_k_m-like"])
def test_int8_projections_match_them_dequantized(tmp_path, arch, kinds, hidden, inter):
    """quantization="gguf" keeps 5- to 8-bit projections at a byte a weight (their integer values,
    a scale, and a min where the format has one, per group: 32 inputs, Q6_K's 16), q/k/v and
    gate/up fused where their layouts agree, beside 4-bit ones (Q4_K), and, in float32, gives
    the prompt logprobs and greedy tokens of the same GGUF dequantized on load; llama's permuted
    q/k rows are put back with their scales and mins."""
    from jaxvllm import LLM, SamplingParams
    path = _tiny_gguf(tmp_path, arch, kinds, hidden, inter)
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
    qkv, o = hidden + 2 * hidden // 2, hidden  # 4 query heads, 2 KV heads
    if kinds is _FIVE_BITS:  # q, k without a min, v with one: apart; gate/up, both with mins: fused
        assert [lp[n].dtype for n in "qkv"] == [jnp.int8] * 3 and "q+k+v" not in lp
        assert "v_min" in lp and "k_min" not in lp and lp["k_scale"].shape == (2, hidden // 2)
        assert lp["gate+up_min"].shape == lp["gate+up_scale"].shape == (2, 2 * inter)
    elif kinds is _K_QUANTS:  # Q5_K q/k/v fused with mins, Q6_K by 16, Q4_K o at 4 bits
        assert lp["q+k+v"].dtype == jnp.int8 and lp["q+k+v_min"].shape == (hidden // 32, qkv)
        assert lp["gate+up"].shape == (2 * inter, hidden)
        assert lp["gate+up_scale"].shape == (hidden // 16, 2 * inter) and "gate+up_min" not in lp
        assert lp["down"].dtype == jnp.int8 and lp["down_scale"].shape == (inter // 16, hidden)
        assert lp["o"].dtype == jnp.uint8 and lp["o"].shape == (o, hidden // 2)
    else:
        assert lp["q+k+v"].dtype == jnp.int8 and lp["q+k+v"].shape == (qkv, hidden)
        assert lp["q+k+v_scale"].shape == (2, qkv) and lp["q+k+v_scale"].dtype == jnp.float32
        assert not any(k.endswith(("_zero", "_min")) for k in lp)
        assert lp["gate+up"].shape == (2 * inter, hidden) and lp["o"].shape == (o, hidden)
        assert lp["down"].dtype == jnp.float32  # 80 inputs: not a whole number of blocks
    for a, b in zip(runs["plain"][1], outs):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for pa, pb, tok in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:], a.prompt_token_ids[1:]):
            assert abs(pa[tok].logprob - pb[tok].logprob) < 1e-3


@pytest.mark.parametrize("up, down", [(T.Q4_K, T.Q6_K), (T.Q8_0, T.Q4_0)],
                         ids=["q4_k-q6_k", "q8_0-up-q4_0"])
def test_moe_experts_kept_quantized_match_them_dequantized(tmp_path, up, down):
    """quantization="gguf" on a Qwen3-MoE GGUF: expert stacks stay quantized expert by expert,
    Q4_K (a scale and a min per 32 inputs) and Q4_0 (zero points) in the int4 layout, Q6_K (groups
    of 16) and Q8_0 in the int8 layout; a Q4_K gate beside a Q8_0 up (two formats the kernel would
    run in one launch) is dequantized with it. In float32 it gives the prompt logprobs and greedy
    tokens of the same GGUF dequantized on load."""
    from safetensors.numpy import load_file
    from hf_builders import save_word_tokenizer, tiny_config, tiny_model
    from jaxvllm import LLM, SamplingParams
    from test_converters import _write_moe_gguf
    cfg = tiny_config("qwen3_moe", vocab_size=128, hidden_size=256, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=64, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=256,
                      norm_topk_prob=True, tie_word_embeddings=False)
    tiny_model(cfg, matrix_scale=4.0).save_pretrained(tmp_path / "hf")
    save_word_tokenizer(tmp_path / "hf", 128)
    path = tmp_path / "moe.gguf"
    _write_moe_gguf(path, "qwen3moe", cfg, load_file(tmp_path / "hf" / "model.safetensors"),
                    {"ffn_gate_exps": T.Q4_K, "ffn_up_exps": up, "ffn_down_exps": down})
    prompts = [{"prompt_token_ids": list(range(3 + j, 3 + j + n))} for j, n in enumerate((7, 19))]
    sp = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, prompt_logprobs=0)
    runs = {}
    for kind, extra in (("plain", {}), ("gguf", {"quantization": "gguf"})):
        llm = LLM(model=str(path), tokenizer=str(tmp_path / "hf"), dtype="float32",
                  max_model_len=64, max_num_seqs=4, max_num_batched_tokens=32,
                  num_gpu_blocks_override=16, enforce_eager=True, token_buckets=(8, 32), **extra)
        runs[kind] = (llm.llm_engine.runner.params["layers"][0],
                      llm.generate(prompts, sp, use_tqdm=False))
    lp, outs = runs["gguf"]
    if up == T.Q4_K:
        assert lp["experts_gate"].dtype == jnp.uint8 and lp["experts_gate"].shape == (4, 256, 128)
        assert lp["experts_up_min"].shape == lp["experts_up_scale"].shape == (4, 256 // 32, 256)
    else:
        assert lp["experts_gate"].dtype == lp["experts_up"].dtype == jnp.float32
        assert "experts_gate_scale" not in lp and "experts_up_scale" not in lp
    if down == T.Q4_0:
        assert lp["experts_down"].shape == (4, 256, 128) and lp["experts_down_zero"].shape == (
            4, 256 // 32, 256)
    else:  # Q6_K's groups of 16, Q8_0's of 32, no min
        assert lp["experts_down"].dtype == jnp.int8 and lp["experts_down"].shape == (4, 256, 256)
        group = 16 if down == T.Q6_K else 32
        assert lp["experts_down_scale"].shape == (4, 256 // group, 256)
        assert "experts_down_min" not in lp
    for a, b in zip(runs["plain"][1], outs):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for pa, pb, tok in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:], a.prompt_token_ids[1:]):
            assert abs(pa[tok].logprob - pb[tok].logprob) < 1e-3


@pytest.mark.parametrize("rows", [1, 16, 80])
@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q5_1, T.Q6_K], ids=lambda t: t.name)
def test_int8_blocks_through_int8_linear(rows, qtype):
    """A GGUF weight in the int8 layout through models/int8.int8_linear (on a GPU the Pallas GEMM
    up to its MAX_ROWS, else dequantized by XLA) against the weight dequantized, in float64."""
    from jaxvllm.models.int8 import int8_linear
    rng = np.random.default_rng(rows)
    t = _tensor(qtype, 256, 512, rng)
    w = int8_weight(t)
    x = jnp.asarray(rng.standard_normal((rows, 512)), jnp.bfloat16)
    mn = None if w.offset is None else jnp.asarray(w.offset.T)
    y = int8_linear(x, jnp.asarray(w.q), jnp.asarray(w.scale.T), mn)
    ref = np.asarray(x, np.float64) @ dequantize(t.data, qtype).reshape(256, 512).T.astype(np.float64)
    err = np.abs(np.asarray(y, np.float64) - ref).max() / np.abs(ref).max()
    assert y.shape == (rows, 256) and y.dtype == jnp.bfloat16 and err < 0.01, err
