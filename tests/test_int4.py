"""int4 weights (AWQ and GPTQ checkpoints, models/int4.py, converters/integer.py; 8-bit GPTQ in the
int8 layout, models/int8.py): the int4 linear
against float64; the packed formats, written by converters/int_writer.py (each format's
description followed), unpacked; and tiny random checkpoints in each format (GPTQ in activation order, Phi-3's
fused projections) against HF transformers running the same dequantized weights."""
from __future__ import annotations

import json
import os
import re
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from converters.errors import WeightLoadError
from converters.int_writer import (linear_tensors, pack_awq, pack_cols, pack_rows,
                                   quantization_config)
from converters.integer import IntCheckpoint, int_checkpoint, unpack
from hf_builders import (FAR_FROM_FLAT, assert_generates_as_hf, save_word_tokenizer,
                         tiny_config, tiny_model)
from jaxvllm.models.fused import fuse_projections
from jaxvllm.models.int4 import int4_linear, pack, quantize_int4
from pallas_kernels import int4_gemm, int4_matmul, int4_matmul_reference
from pallas_kernels.int4_gemm import Tiles
from pallas_kernels.triton_rows import input_splits

GROUP = 16


def _unpack(w: np.ndarray, groups: int) -> np.ndarray:
    """The layout's packed uint8 [out, in/2] -> 4-bit values [out, in] (models/int4.py)."""
    g = np.asarray(w).reshape(w.shape[0], groups, -1)
    return np.concatenate([g & 15, g >> 4], axis=-1).reshape(w.shape[0], -1)


OFFSETS = ["zero", "min"]


def _random_int4(rng, out: int, inp: int, groups: int, offset: str = "min"):
    """Random 4-bit values [out, in], the layout's (packed, scale [groups, out], offset: uint8 zero
    points or a float32 min), and the dequantized weight [out, in] in float64."""
    q = rng.integers(0, 16, (out, inp)).astype(np.uint8)
    scale = rng.uniform(0.01, 0.1, (groups, out)).astype(np.float32)
    g = np.arange(inp) // (inp // groups)
    s64 = scale.T.astype(np.float64)[:, g]
    if offset == "zero":
        off = rng.integers(0, 16, (groups, out)).astype(np.uint8)
        w = (q.astype(np.float64) - off.T.astype(np.float64)[:, g]) * s64
    else:
        off = (-scale * rng.uniform(0, 15, (groups, out))).astype(np.float32)
        w = q.astype(np.float64) * s64 + off.T.astype(np.float64)[:, g]
    return pack(q, inp // groups), scale, off, w


def test_pack_layout():
    """Within each group byte j holds input j (low bits) and input j + group/2 (high bits)."""
    q = np.arange(16, dtype=np.uint8)[None].repeat(2, 0)
    p = pack(q, 8)
    np.testing.assert_array_equal(p[0], [0 | 4 << 4, 1 | 5 << 4, 2 | 6 << 4, 3 | 7 << 4,
                                         8 | 12 << 4, 9 | 13 << 4, 10 | 14 << 4, 11 | 15 << 4])
    np.testing.assert_array_equal(_unpack(p, 2), q)
    np.testing.assert_array_equal(np.asarray(pack(jnp.asarray(q), 8)), p)


@pytest.mark.parametrize("offset", OFFSETS)
def test_int4_linear_against_float64(offset):
    rng = np.random.default_rng(0)
    out, inp, groups = 24, 64, 4
    w_packed, scale, off, w = _random_int4(rng, out, inp, groups, offset)
    perm = rng.permutation(inp).astype(np.int32)
    x = rng.standard_normal((5, 3, inp)).astype(np.float32)
    for p in (None, perm):
        y = int4_linear(jnp.asarray(x), jnp.asarray(w_packed), jnp.asarray(scale),
                        jnp.asarray(off), None if p is None else jnp.asarray(p))
        xs = x.astype(np.float64) if p is None else x.astype(np.float64)[..., p]
        np.testing.assert_allclose(np.asarray(y), xs @ w.T, rtol=1e-5, atol=1e-5)
    # bf16 activations: one rounding of each dequantized weight and of the output.
    y = int4_linear(jnp.asarray(x, jnp.bfloat16), jnp.asarray(w_packed),
                    jnp.asarray(scale), jnp.asarray(off))
    assert y.dtype == jnp.bfloat16
    ref = x.astype(np.float64) @ w.T
    assert np.abs(np.asarray(y, np.float64) - ref).max() < 0.02 * np.abs(ref).max()


@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("rows, group, tiles", [
    (1, 128, None),                               # the engine's tiling (default_tiles)
    (5, 32, Tiles(block_n=32, splits=4)),         # four slices' partial sums, summed after
    (16, 256, Tiles(block_n=128, splits=1)),      # one slice: several steps a half group
    (50, 64, Tiles(block_m=16, splits=2)),        # four row tiles, the last one part padding
    (3, 128, Tiles(f16=True))])                   # float16 pairs (emulated here)
def test_int4_gemm_kernel_against_reference(rows, group, tiles, offset):
    """The Pallas GEMM (interpret mode) against its jnp reference and float64, per group size,
    tiling (one reduction step per half group of 16 inputs, several per half group of 128),
    offset (zero points, a min) and dequantization (bf16 pairs for zero points, emulated here;
    float16 pairs)."""
    rng = np.random.default_rng(rows)
    n, k = 256, 512
    w_packed, scale, off, w = _random_int4(rng, n, k, k // group, offset)
    args = (jnp.asarray(w_packed), jnp.asarray(scale), jnp.asarray(off))
    xb = jnp.asarray(rng.standard_normal((rows, k)), jnp.bfloat16)
    got = int4_matmul(xb, *args, tiles=tiles, interpret=True)
    want = int4_matmul_reference(xb, *args)
    assert got.shape == (rows, n) and got.dtype == jnp.bfloat16
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    exact = np.asarray(xb, np.float64) @ w.T
    assert np.abs(want - exact).max() < 0.01 * np.abs(exact).max()
    assert np.abs(got - exact).max() < 0.01 * np.abs(exact).max()


@pytest.mark.gpu
@pytest.mark.parametrize("f16", [False, True], ids=["engine", "f16-pairs"])
@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("rows, n, k", [(1, 1024, 4096), (16, 4096, 14336), (7, 14336, 4096)])
def test_gpu_int4_gemm_against_reference(rows, n, k, offset, f16):
    """Compiled for the GPU at the 8B shapes (k/v, down, gate/up), group 128, bf16 x, each offset
    (zero points: the bf16-pair dequantization in PTX) and the float16 pairs for either: the
    Pallas GEMM against float64, and each weight read back through unit rows."""
    import dataclasses

    import jax
    rng = np.random.default_rng(n + rows)
    w_packed, scale, off, w = _random_int4(rng, n, k, k // 128, offset)
    args = (jnp.asarray(w_packed), jnp.asarray(scale), jnp.asarray(off))
    x = jnp.asarray(rng.standard_normal((rows, k)), jnp.bfloat16)
    mm = jax.jit(lambda x, *a: int4_matmul(x, *a, tiles=dataclasses.replace(
        int4_gemm.default_tiles(x.shape[0]), f16=f16)))
    got = np.asarray(mm(x, *args), np.float64)
    exact = np.asarray(x, np.float64) @ w.T
    assert np.abs(got - exact).max() < 0.01 * np.abs(exact).max()
    # 64 weights of every output read back through unit rows (inputs from every group, low and high
    # nibbles): each within its rounding to bf16 (2^-8 relative) plus, for zero points, the scale's
    # (another 2^-8 of it) and, in float16 pairs, a min's rounding to float16 (2^-11 of it); a
    # swapped or shifted nibble is off by a whole step or more.
    cols = np.sort(rng.choice(k, 64, replace=False))
    w_got = np.asarray(mm(jnp.eye(k, dtype=jnp.bfloat16)[cols], *args), np.float64).T
    w64 = w[:, cols]
    s64 = scale.T.astype(np.float64)[:, cols // 128]
    min64 = 0 if offset == "zero" else np.abs(off.T.astype(np.float64)[:, cols // 128])
    assert (np.abs(w_got - w64) <= 2.0**-7 * np.abs(w64) + 1e-3 * s64 + 2.0**-10 * min64).all()


def test_int4_gemm_splits_shrink_as_rows_grow():
    """Slices of >= 512 inputs, at most 16, and partial sums of at most an eighth of the weight's
    bytes: 8 slices of 4096 inputs for one row, 4 for 16 rows, 1 for 64; 16 of 14336 for one."""
    share = int4_gemm.PARTIAL_SHARE
    assert [input_splits(m, 4096, 32, share) for m in (1, 8, 16, 64)] == [8, 8, 4, 1]
    assert input_splits(1, 14336, 112, share) == 16 and input_splits(1, 576, 18, share) == 1


def test_int4_gemm_kernel_refuses_what_it_cannot_tile():
    assert int4_gemm.fits(256, 512, 128) and int4_gemm.fits(256, 512, 32)
    assert not int4_gemm.fits(200, 512, 128)   # N not a multiple of the column tile
    assert not int4_gemm.fits(256, 512, 16)    # half a group below the tensor cores' 16
    assert not int4_gemm.fits(256, 192, 96)    # a step of 48 inputs: not a power of two
    w_packed, scale, off, _ = _random_int4(np.random.default_rng(0), 256, 512, 4)
    args = (jnp.asarray(w_packed), jnp.asarray(scale), jnp.asarray(off))
    with pytest.raises(ValueError, match="rows"):
        int4_matmul(jnp.ones((65, 512), jnp.bfloat16), *args, interpret=True)
    with pytest.raises(ValueError, match="3 splits"):
        int4_matmul(jnp.ones((1, 512), jnp.bfloat16), *args, tiles=Tiles(splits=3), interpret=True)


def test_quantize_int4_round_trip():
    """Round to nearest with integer zero points: every weight within half a step of its group's
    scale (the zero point's own rounding included: a range of 15 steps holds the group and 0), the
    levels used from 0 to 15; scale float32 and zero points uint8 whatever the weight's dtype."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((64, 40)).astype(np.float32) * np.linspace(0.01, 3, 40)
    w[:16, 0] = np.abs(w[:16, 0]) + 0.5  # a group of positive weights: zero point 0
    for dtype in (jnp.float32, jnp.bfloat16):
        q, scale, zero = quantize_int4(jnp.asarray(w, dtype), 16)
        assert q.dtype == jnp.uint8 and q.shape == (40, 32)
        assert scale.shape == zero.shape == (4, 40)
        assert scale.dtype == jnp.float32 and zero.dtype == jnp.uint8
        g = np.arange(64) // 16
        qf = _unpack(q, 4).astype(np.float64)
        s, z = (np.asarray(a).astype(np.float64).T for a in (scale, zero))
        deq = (qf - z[:, g]) * s[:, g]
        target = np.asarray(jnp.asarray(w, dtype), np.float64).T
        assert (np.abs(deq - target) <= s[:, g] * 0.5 + 1e-6).all()
        assert qf.min() == 0 and qf.max() == 15 and z[0, 0] == 0


def test_fused_projections_keep_their_offsets():
    """gate and up with zero points fuse into one weight whose scales and zero points are theirs
    side by side; q/k/v whose offsets differ in kind (zero points, a min) stay apart."""
    rng = np.random.default_rng(4)

    def weight(out, offset):
        w, scale, off, _ = _random_int4(rng, out, 64, 2, offset)
        return {"": jnp.asarray(w), "_scale": jnp.asarray(scale), "_" + offset: jnp.asarray(off)}

    parts = {"gate": weight(32, "zero"), "up": weight(48, "zero"), "q": weight(32, "zero"),
             "k": weight(16, "zero"), "v": weight(16, "min")}
    lp = {n + suffix: a for n, p in parts.items() for suffix, a in p.items()}
    fused = fuse_projections({"layers": [lp]})["layers"][0]
    assert "gate" not in fused and "gate+up_min" not in fused
    np.testing.assert_array_equal(fused["gate+up"], np.concatenate([lp["gate"], lp["up"]]))
    for part in ("_scale", "_zero"):
        np.testing.assert_array_equal(fused["gate+up" + part],
                                      np.concatenate([lp["gate" + part], lp["up" + part]], axis=1))
    assert fused["gate+up_zero"].dtype == jnp.uint8
    assert "q+k+v" not in fused and all(n in fused for n in ("q", "k_zero", "v_min"))


def test_unpack_golden_words():
    """One int32 word whose nibbles are 0..7 from the low bits up: AWQ puts output j at nibble
    [0, 4, 1, 5, 2, 6, 3, 7][j] (its packer's order 0 2 4 6 1 3 5 7); GPTQ puts input 8k+i of a
    column at nibble i, and stores each zero point minus 1 ('gptq'; 'gptq_v2' stores it as is)."""
    word = np.array([[0x76543210]], np.uint32).view(np.int32)
    ones = np.ones((1, 8), np.float16)
    awq = unpack(IntCheckpoint("awq", -1, 0), "x.qweight",
                 {"qweight": word, "qzeros": word, "scales": ones}, "test")
    np.testing.assert_array_equal(awq.q[:, 0], [0, 4, 1, 5, 2, 6, 3, 7])
    np.testing.assert_array_equal(awq.offset[:, 0], [0, 4, 1, 5, 2, 6, 3, 7])
    assert awq.offset.dtype == np.uint8
    for fmt, offset in (("gptq", 1), ("gptq_v2", 0)):
        cfg = int_checkpoint({"quantization_config": {"quant_method": "gptq", "bits": 4,
                                                       "group_size": -1, "checkpoint_format": fmt}})
        zeros = np.array([[0x65432100]], np.uint32).view(np.int32)  # outputs 0..7: 0 0 1 2 .. 6
        w = unpack(cfg, "x.qweight", {"qweight": word.repeat(8, 1), "qzeros": zeros,
                                      "scales": ones}, "test")
        np.testing.assert_array_equal(w.q, np.tile(np.arange(8), (8, 1)))  # [out, in]
        np.testing.assert_array_equal(w.offset[:, 0], np.array([0, 0, 1, 2, 3, 4, 5, 6]) + offset)


@pytest.mark.parametrize("method", ["awq", "gptq", "gptq_act_order"])
def test_unpack_inverts_the_packers(method):
    rng = np.random.default_rng(1)
    out, inp, groups = 32, 48, 3
    q = rng.integers(0, 16, (out, inp)).astype(np.uint8)
    zero = rng.integers(1, 16, (out, groups)).astype(np.uint8)
    scale = rng.uniform(0.01, 0.1, (groups, out)).astype(np.float16)
    g_idx = np.arange(inp) // (inp // groups)
    if method == "awq":
        fmt = IntCheckpoint("awq", inp // groups, 0)
        tensors = {"qweight": pack_awq(q.T), "qzeros": pack_awq(zero.T), "scales": scale}
    else:
        fmt = IntCheckpoint("gptq", inp // groups, 1)
        if method == "gptq_act_order":
            g_idx = rng.permutation(g_idx)
        tensors = {"qweight": pack_rows(q.T), "qzeros": pack_cols(zero.T - 1), "scales": scale,
                   "g_idx": g_idx.astype(np.int32)}
    w = unpack(fmt, "x.qweight", tensors, "test")
    assert w.q.shape == (out, inp) and w.offset.shape == w.scale.shape == (out, groups)
    np.testing.assert_array_equal(w.scale, scale.T.astype(np.float32))
    np.testing.assert_array_equal(w.offset, zero)
    if method == "gptq_act_order":
        np.testing.assert_array_equal(np.sort(w.perm), np.arange(inp))
        np.testing.assert_array_equal(w.q, q[:, w.perm])
        np.testing.assert_array_equal(g_idx[w.perm], np.arange(inp) // (inp // groups))
    else:
        assert w.perm is None
        np.testing.assert_array_equal(w.q, q)


_SMALL = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
CHECKPOINTS = {  # name: (HF config, quant_method, activation order (per input if "shared"), bits)
    "llama_awq": (lambda: tiny_config("llama", **_SMALL), "awq", False, 4),
    "qwen2_gptq_act_order": (lambda: tiny_config("qwen2", **_SMALL), "gptq", True, 4),
    # GPTQ's own case: the projections of one input (q/k/v, gate/up) in one order, fused
    "llama_gptq_act_order_shared": (lambda: tiny_config("llama", **_SMALL), "gptq", "shared", 4),
    "qwen2_gptq": (lambda: tiny_config("qwen2", **_SMALL), "gptq", False, 4),  # q/k/v biases, fused
    "phi3_awq": (lambda: tiny_config("phi3", **_SMALL, pad_token_id=0), "awq", False, 4),
    # 8 bits, in the int8 layout (Qwen's GPTQ-Int8 releases' form)
    "qwen2_gptq8_act_order": (lambda: tiny_config("qwen2", **_SMALL), "gptq", True, 8),
    "llama_gptq8": (lambda: tiny_config("llama", **_SMALL), "gptq", False, 8),
}
PROMPTS = [list(np.random.RandomState(n).randint(2, 256, size=n)) for n in (6, 29)]


def _pack_linear(tensors: dict, prefix: str, w: np.ndarray, method: str, act_order: bool,
                 rng, bits: int = 4, group: int = GROUP, symmetric: bool = False) -> np.ndarray:
    """Linear `prefix`'s weight w [out, in] quantized and packed into `tensors` in the method's
    format (GPTQ's groups permuted with activation order); returns the weight it dequantizes to."""
    g_idx = np.arange(w.shape[1]) // group
    if act_order:
        g_idx = rng.permutation(g_idx)
    parts, deq = linear_tensors(w, method, group, bits, g_idx, symmetric)
    tensors.update({f"{prefix}.{part}": t for part, t in parts.items()})
    return deq


def _save_int(d: str, tensors: dict, config, method: str, act_order: bool, bits: int,
              group: int = GROUP) -> None:
    from safetensors.numpy import save_file
    config.save_pretrained(d)
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()},
              os.path.join(d, "model.safetensors"))
    with open(os.path.join(d, "config.json")) as f:
        cfg = json.load(f)
    cfg["quantization_config"] = quantization_config(method, group, bits, act_order)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f)
    save_word_tokenizer(d, 256)


def write_int_checkpoint(d: str, name: str, group: int = GROUP):
    """A tiny random model saved as an AWQ or GPTQ checkpoint (every decoder-layer linear
    packed, `group` inputs a group); returns the HF model holding the dequantized weights."""
    make_config, method, act_order, bits = CHECKPOINTS[name]
    model = tiny_model(make_config(), **FAR_FROM_FLAT)
    rng = np.random.default_rng(2)
    tensors = {k: v.numpy() for k, v in model.state_dict().items()}
    for module_name, module in model.named_modules():
        if not (isinstance(module, torch.nn.Linear) and ".layers." in module_name):
            continue
        if act_order == "shared":  # one seed, so one order, per input
            short = module_name.rsplit(".", 1)[-1]
            key = module_name.rsplit(".", 1)[0] + {"k_proj": "q_proj", "v_proj": "q_proj",
                                                   "up_proj": "gate_proj"}.get(short, short)
            rng = np.random.default_rng(zlib.crc32(key.encode()))
        deq = _pack_linear(tensors, module_name, module.weight.detach().numpy(), method,
                           bool(act_order), rng, bits, group)
        with torch.no_grad():
            module.weight.copy_(torch.from_numpy(deq))
        del tensors[module_name + ".weight"]
    _save_int(d, tensors, model.config, method, bool(act_order), bits, group)
    return model


@pytest.mark.parametrize("name", sorted(CHECKPOINTS))
def test_int_checkpoint_matches_hf_on_its_dequantized_weights(name, tmp_path):
    from jaxvllm import LLM
    model = write_int_checkpoint(str(tmp_path), name)
    llm = LLM(model=str(tmp_path), dtype="float32", max_model_len=128, max_num_seqs=4,
              max_num_batched_tokens=32, num_gpu_blocks_override=64, enforce_eager=True,
              token_buckets=(8, 32))
    engine = llm.llm_engine
    assert engine.args.quantization == CHECKPOINTS[name][1]  # taken from config.json
    lp = engine.runner.params["layers"][0]
    act_order, bits = CHECKPOINTS[name][2:]  # q/k/v and gate/up fused into one GEMM each unless
    apart = act_order is True  # their inputs are reordered each its own way
    qkv = "q" if apart else "q+k+v"
    if bits == 4:
        assert lp[qkv].dtype == lp[qkv + "_zero"].dtype == jnp.uint8 and qkv + "_min" not in lp
    else:  # int8 values minus 128, the zero points' (128 - zero) * scale as a min
        assert lp[qkv].dtype == jnp.int8 and lp[qkv + "_min"].dtype == jnp.float32
    assert ("q+k+v" in lp) == ("gate+up" in lp) == ("q" not in lp) == (not apart)
    assert lp["down"].shape == (64, 96 * bits // 8) and lp["down_scale"].shape == (96 // GROUP, 64)
    assert ("q_perm" in lp) == apart and ("q+k+v_perm" in lp) == ("gate+up_perm" in lp) == (
        act_order == "shared")
    assert_generates_as_hf(llm, model, PROMPTS)
    # Params already in the engine's layout swap in as they are (new weights in the model's dtype
    # are rounded into it: tests/test_requant.py).
    before = {k: np.asarray(v) for k, v in lp.items()}
    llm.update_weights(jax.tree.map(jnp.array, engine.runner.params))  # copies
    for k, v in engine.runner.params["layers"][0].items():
        np.testing.assert_array_equal(np.asarray(v), before[k], err_msg=k)


@pytest.mark.parametrize("name", ["qwen2_gptq_act_order", "qwen2_gptq8_act_order", "llama_awq"])
def test_int_checkpoint_runs_in_bfloat16(name, tmp_path):
    """The model's usual dtype on a CPU: the same greedy tokens as in float32 and logprobs within
    bfloat16's rounding (activation order gathers each linear's inputs before its GEMM)."""
    from jaxvllm import LLM, SamplingParams
    write_int_checkpoint(str(tmp_path), name)
    sp = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=0)
    runs = []
    for dtype in ("float32", "bfloat16"):
        llm = LLM(model=str(tmp_path), dtype=dtype, max_model_len=128, max_num_seqs=4,
                  max_num_batched_tokens=32, num_gpu_blocks_override=64, enforce_eager=True,
                  token_buckets=(8, 32))
        runs.append([o.outputs[0] for o in llm.generate(
            [{"prompt_token_ids": p} for p in PROMPTS], sp, use_tqdm=False)])
    for f32, b16 in zip(*runs):
        assert b16.token_ids[:3] == f32.token_ids[:3]
        assert abs(b16.cumulative_logprob - f32.cumulative_logprob) < 0.1 * len(f32.token_ids)


_QWEN3_MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                  decoder_sparse_step=1, mlp_only_layers=[])
_MIXTRAL = dict(num_local_experts=4, num_experts_per_tok=2)
MOE = {  # name: (HF config, quant_method, activation order, bits)
    "mixtral_awq": (lambda: tiny_config("mixtral", **_SMALL, **_MIXTRAL), "awq", False, 4),
    # expert 0's linears each in an order of its own, the other experts' in their inputs' order
    "qwen3_moe_gptq_act_order": (lambda: tiny_config("qwen3_moe", **_SMALL, **_QWEN3_MOE), "gptq",
                                 "expert 0", 4),
    # every linear in activation order, as GPTQ orders them: one order per input (an expert's
    # gate and up share theirs, q/k/v theirs)
    "mixtral_gptq_act_order": (lambda: tiny_config("mixtral", **_SMALL, **_MIXTRAL), "gptq",
                               "shared", 4),
    "qwen3_moe_gptq8": (lambda: tiny_config("qwen3_moe", **_SMALL, **_QWEN3_MOE), "gptq", False, 8),
}


def write_int_moe_checkpoint(d, name: str):
    """A tiny random mixture-of-experts model of MOE saved as an AWQ or GPTQ checkpoint in d/int4
    (experts and attention packed, routers not; at 8 bits expert 0 symmetric, its zero points
    all the middle, the others not); returns its HF float twin, the weights it dequantizes to (in
    the checkpoint's input order under activation order), saved in d/twin."""
    from safetensors.numpy import load_file, save_file
    from transformers import AutoModelForCausalLM
    make_config, method, act_order, bits = MOE[name]
    tiny_model(make_config(), **FAR_FROM_FLAT).save_pretrained(d / "src")
    rng = np.random.default_rng(3)
    packed, twin = {}, {}
    for key, w in load_file(d / "src" / "model.safetensors").items():
        if ".layers." in key and w.ndim == 2 and not key.endswith(".gate.weight"):  # not routers
            ordered = act_order == "expert 0" and ".experts.0." not in key
            if act_order == "shared":  # one seed, so one order, per input
                seed = re.sub(r"\.(w3|up_proj|k_proj|v_proj)\.", lambda m: ".w1." if m[1] == "w3"
                              else ".gate_proj." if m[1] == "up_proj" else ".q_proj.", key)
                rng = np.random.default_rng(zlib.crc32(seed.encode()))
            twin[key] = _pack_linear(packed, key[:-len(".weight")], w, method,
                                     bool(act_order) and not ordered, rng, bits,
                                     symmetric=bits == 8 and ".experts.0." in key)
        else:
            packed[key] = twin[key] = w
    config = AutoModelForCausalLM.from_pretrained(d / "src").config
    _save_int(str(d / "int4"), packed, config, method, bool(act_order), bits)
    config.save_pretrained(d / "twin")
    save_file(twin, d / "twin" / "model.safetensors")
    return AutoModelForCausalLM.from_pretrained(d / "twin").float().eval()


@pytest.mark.parametrize("name", sorted(MOE))
def test_int_moe_checkpoint_keeps_its_experts_at_their_bits(name, tmp_path):
    """An AWQ/GPTQ mixture-of-experts checkpoint: the attention stays at its bits, and so do the
    experts (each expert an int4 or int8 linear, stacked). Under activation order, gate's and
    up's one order per expert is kept (arange for an expert in its inputs' order) and down's
    put into their outputs, or, where gate's and up's orders differ, the two load dequantized in
    the model's dtype (down's order in their outputs alike). The model matches HF on its float
    twin."""
    from jaxvllm.models.moe import DOWN_ORDER, ORDER
    from jaxvllm import LLM
    _, _, act_order, bits = MOE[name]
    reference = write_int_moe_checkpoint(tmp_path, name)
    config = reference.config
    llm = LLM(model=str(tmp_path / "int4"), dtype="float32", max_model_len=128, max_num_seqs=4,
              max_num_batched_tokens=32, num_gpu_blocks_override=64, enforce_eager=True,
              token_buckets=(8, 32))
    lp = llm.llm_engine.runner.params["layers"][0]
    assert lp["o"].dtype == (jnp.uint8 if bits == 4 else jnp.int8)
    e, h = 4, 64
    i = getattr(config, "moe_intermediate_size", None) or config.intermediate_size
    if act_order == "expert 0":
        assert lp["experts_gate"].dtype == lp["experts_up"].dtype == jnp.float32
        assert ORDER not in lp and "experts_gate_scale" not in lp
        assert lp["experts_down"].dtype == jnp.uint8 and lp[DOWN_ORDER].shape == (e, i)
        np.testing.assert_array_equal(lp[DOWN_ORDER][1], np.arange(i))
    elif act_order:
        assert lp["experts_gate"].dtype == lp["experts_up"].dtype == jnp.uint8
        assert lp[ORDER].shape == (e, h) and lp[DOWN_ORDER].shape == (e, i)
        assert "experts_up_perm" not in lp and lp["q+k+v_perm"].shape == (h,)
    elif bits == 4:
        assert lp["experts_gate"].dtype == lp["experts_down_zero"].dtype == jnp.uint8
        assert lp["experts_gate"].shape == (e, i, h // 2)
        assert lp["experts_down"].shape == (e, h, i // 2)
        assert lp["experts_down_scale"].shape == (e, i // GROUP, h)
    else:  # int8 values minus 128, (128 - zero) * scale as a min (expert 0's: zeros)
        assert lp["experts_up"].dtype == jnp.int8 and lp["experts_up"].shape == (e, i, h)
        assert lp["experts_down_min"].shape == (e, i // GROUP, h)
        assert not np.asarray(lp["experts_down_min"][0]).any()
        assert np.asarray(lp["experts_down_min"][1]).any()
    assert_generates_as_hf(llm, reference, PROMPTS)


def test_malformed_int4_tensors_are_named():
    fmt = IntCheckpoint("awq", -1, 0)
    with pytest.raises(WeightLoadError, match="'x.qweight'.*2-D"):
        unpack(fmt, "x.qweight", {"qweight": np.zeros(8, np.int32), "qzeros": np.zeros((1, 1), np.int32),
                                  "scales": np.ones((1, 8), np.float16)}, "test")
    with pytest.raises(WeightLoadError, match="no 'qzeros'"):
        unpack(fmt, "x.qweight", {"qweight": np.zeros((8, 1), np.int32),
                                  "scales": np.ones((1, 8), np.float16)}, "test")
    with pytest.raises(WeightLoadError, match="do not fit"):
        unpack(fmt, "x.qweight", {"qweight": np.zeros((8, 1), np.int32),
                                  "qzeros": np.zeros((1, 1), np.int32),
                                  "scales": np.ones((2, 8), np.float16)}, "test")
    # GPTQ's original format stores zero - 1: a zero of 0 wraps to 15 and reads back as 16.
    wrapped = np.array([[-1]], np.int32)  # every nibble 15
    with pytest.raises(WeightLoadError, match="gptq_v2"):
        unpack(IntCheckpoint("gptq", -1, 1), "x.qweight",
               {"qweight": np.zeros((1, 8), np.int32), "qzeros": wrapped,
                "scales": np.ones((1, 8), np.float16)}, "test")


def test_quantization_must_fit_the_checkpoint(tmp_path):
    from jaxvllm import LLM
    write_int_checkpoint(str(tmp_path), "llama_awq")
    with pytest.raises(ValueError, match="int4 checkpoint of quantization='awq'"):
        LLM(model=str(tmp_path), quantization="gptq", dtype="float32", max_model_len=64)
    with pytest.raises(ValueError, match="is not one"):
        LLM(quantization="awq", max_model_len=64)  # the default model, a GGUF
    cfg = json.load(open(tmp_path / "config.json"))
    for field, value in (("bits", 8), ("group_size", 0), ("version", "gemv")):
        bad = {**cfg["quantization_config"], field: value}
        with pytest.raises(ValueError, match=f"quantization_config.{field}"):
            int_checkpoint({"quantization_config": bad})


@pytest.mark.parametrize("family", ["llama", "qwen3_moe"])
def test_dummy_weights_at_four_bits(family, tmp_path):
    """load_format="dummy" with quantization="awq": random weights quantized to the int4 layout,
    a mixture of experts' experts too (how the bench measures an int4 model without a
    checkpoint); it generates."""
    from jaxvllm import LLM, SamplingParams
    tiny_config(family, **_SMALL, **(_QWEN3_MOE if family == "qwen3_moe" else {})
                ).save_pretrained(tmp_path)
    save_word_tokenizer(tmp_path, 256)
    llm = LLM(model=str(tmp_path), load_format="dummy", quantization="awq", dtype="bfloat16",
              max_model_len=64, max_num_seqs=2, num_gpu_blocks_override=16, enforce_eager=True,
              token_buckets=(8, 32), max_num_batched_tokens=32)
    lp = llm.llm_engine.runner.params["layers"][0]
    assert lp["q+k+v"].dtype == jnp.uint8 and lp["o_scale"].shape == (1, 64)  # 64 inputs
    if family == "llama":
        assert lp["gate+up"].dtype == jnp.uint8 and lp["gate+up_scale"].shape == (1, 192)
        assert lp["down_scale"].shape == (1, 64) and lp["down_scale"].dtype == jnp.float32
    else:  # 4 experts of intermediate size 32
        assert lp["experts_gate"].dtype == jnp.uint8 and lp["experts_gate"].shape == (4, 32, 32)
        assert lp["experts_down_scale"].shape == (4, 1, 64)
    out = llm.generate([{"prompt_token_ids": PROMPTS[0]}],
                       SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4

