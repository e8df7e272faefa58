"""compressed-tensors integer checkpoints (llm-compressor's W4A16 and W8A16: `pack-quantized`;
W8A8 INT8: `int-quantized`, run weight-only; converters/integer.py) in the int4 and int8 layouts: tiny random models quantized and saved by the
compressed-tensors library itself (symmetric and asymmetric groups, per channel, bfloat16 scales),
against HF transformers running the weights the library decompresses; activation order's
`weight_g_idx`, which the library no longer writes, from its packer; and the config's and tensors'
errors by name."""
from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from compressed_tensors.compressors import ModelCompressor
from compressed_tensors.compressors.naive_quantized.base import IntQuantizationCompressor
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig,
                                             QuantizationScheme, apply_quantization_config)
from compressed_tensors.quantization.utils.helpers import calculate_qparams

from converters.errors import WeightLoadError
from converters.integer import IntCheckpoint, int_checkpoint, unpack
from hf_builders import (FAR_FROM_FLAT, assert_generates_as_hf, save_word_tokenizer,
                         tiny_config, tiny_model)

GROUP = 16
_SMALL = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
PACKED, INT = "pack-quantized", "int-quantized"
CHECKPOINTS = {  # name: (model type, strategy, symmetric, the saved model's dtype, bits, format)
    "llama_group_asym": ("llama", "group", False, torch.float32, 4, PACKED),
    "qwen2_group_sym_bf16": ("qwen2", "group", True, torch.bfloat16, 4, PACKED),  # q/k/v biases
    "llama_channel_sym": ("llama", "channel", True, torch.float32, 4, PACKED),
    "llama_w8_channel_sym_bf16": ("llama", "channel", True, torch.bfloat16, 8, PACKED),  # w8a16
    "qwen2_w8_group_asym": ("qwen2", "group", False, torch.float32, 8, PACKED),
    # W8A8 INT8 (RedHat's quantized.w8a8: int8 weights per channel, int8 activations per token)
    "llama_w8a8_channel_sym_bf16": ("llama", "channel", True, torch.bfloat16, 8, INT),
    "qwen2_w8a8_group_asym": ("qwen2", "group", False, torch.float32, 8, INT),
}
PROMPTS = [list(np.random.RandomState(n).randint(2, 256, size=n)) for n in (6, 29)]


def _args(strategy: str, symmetric: bool, bits: int) -> QuantizationArgs:
    return QuantizationArgs(num_bits=bits, type="int", strategy=strategy, symmetric=symmetric,
                            group_size=GROUP if strategy == "group" else None)


def write_checkpoint(d: str, name: str) -> torch.nn.Module:
    """A tiny random model quantized by compressed-tensors (min/max scales per group or output
    channel) and saved in the checkpoint's format (int-quantized ones with int8 activations per
    token, as W8A8 releases); returns a float32 HF model holding the weights the library
    decompresses from the saved tensors."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    model_type, strategy, symmetric, dtype, bits, fmt = CHECKPOINTS[name]
    model = tiny_model(tiny_config(model_type, **_SMALL), **FAR_FROM_FLAT).to(dtype)
    args = _args(strategy, symmetric, bits)
    acts = (QuantizationArgs(num_bits=8, type="int", strategy="token", symmetric=True,
                             dynamic=True) if fmt == INT else None)
    scheme = QuantizationScheme(targets=["Linear"], weights=args, input_activations=acts)
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": scheme},
                                                        ignore=["lm_head"]))
    for module in model.modules():
        if not hasattr(module, "weight_scale"):
            continue
        w = module.weight.detach().float()
        w = w.reshape(w.shape[0], -1, GROUP) if strategy == "group" else w[:, None, :]
        scale, zero = calculate_qparams(w.amin(-1), w.amax(-1), args)
        module.weight_scale.data.copy_(scale.reshape(module.weight_scale.shape))
        if hasattr(module, "weight_zero_point"):
            module.weight_zero_point.data.copy_(zero.reshape(module.weight_zero_point.shape))
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format=fmt)
    compressor.compress_model(model)
    model.save_pretrained(d)
    compressor.update_config(d)
    save_word_tokenizer(d, 256)

    saved = load_file(os.path.join(d, "model.safetensors"))
    reference = AutoModelForCausalLM.from_config(tiny_config(model_type, **_SMALL)).float().eval()
    state = {}
    decompressor = PackedQuantizationCompressor if fmt == PACKED else IntQuantizationCompressor
    for key, value in saved.items():
        prefix, part = key.rsplit(".", 1)
        quantized = f"{prefix}.weight_scale" in saved
        if quantized and part in ("weight_packed", "weight"):
            parts = {p: saved[f"{prefix}.{p}"] for p in (part, "weight_shape", "weight_zero_point")
                     if f"{prefix}.{p}" in saved}
            parts["weight_scale"] = saved[f"{prefix}.weight_scale"].float()
            state[prefix + ".weight"] = decompressor.decompress(parts, scheme)["weight"].float()
        elif not (quantized and part.startswith("weight_")):
            state[key] = value.float()
    reference.load_state_dict(state)
    return reference


@pytest.mark.parametrize("name", sorted(CHECKPOINTS))
def test_checkpoint_matches_hf_on_the_weights_the_library_decompresses(name, tmp_path):
    from jaxvllm import LLM
    reference = write_checkpoint(str(tmp_path), name)
    llm = LLM(model=str(tmp_path), dtype="float32", max_model_len=128, max_num_seqs=4,
              max_num_batched_tokens=32, num_gpu_blocks_override=64, enforce_eager=True,
              token_buckets=(8, 32))
    engine = llm.llm_engine
    assert engine.args.quantization == "compressed-tensors"  # taken from config.json
    lp = engine.runner.params["layers"][0]
    _, strategy, symmetric, _, bits, _ = CHECKPOINTS[name]
    groups = 1 if strategy == "channel" else 96 // GROUP
    assert lp["down"].shape == (64, 96 * bits // 8) and lp["down_scale"].shape == (groups, 64)
    if bits == 4:
        assert lp["q+k+v"].dtype == lp["gate+up"].dtype == lp["down_zero"].dtype == jnp.uint8
        if symmetric:  # every zero point 8
            assert (np.asarray(lp["q+k+v_zero"]) == 8).all()
    else:  # the signed values as they are; an asymmetric scheme's zero points as a min
        assert lp["q+k+v"].dtype == lp["gate+up"].dtype == jnp.int8
        assert ("down_min" in lp) == (not symmetric)
    assert_generates_as_hf(llm, reference, PROMPTS)


@pytest.mark.parametrize("bits", [4, 8])
def test_activation_order_g_idx(bits):
    """Older releases' "group" activation order: weight_g_idx gives each input its group, the
    values stay in input order. The engine's unpacked weight, its inputs put back in order,
    dequantizes to the same weight as the format's definition, w = (q - zero) * scale per input's
    group."""
    rng = np.random.default_rng(0)
    out, inp, groups, half = 16, 64, 4, 1 << (bits - 1)
    q = rng.integers(-half, half, (out, inp)).astype(np.int8)
    zp = rng.integers(-half, half, (out, groups)).astype(np.int8)
    scale = rng.uniform(0.01, 0.1, (out, groups)).astype(np.float16).astype(np.float32)
    g_idx = rng.permutation(np.arange(inp) // (inp // groups)).astype(np.int32)
    tensors = {"weight_packed": pack_to_int32(torch.from_numpy(q), bits).numpy(),
               "weight_zero_point": pack_to_int32(torch.from_numpy(zp), bits, packed_dim=0).numpy(),
               "weight_scale": scale, "weight_shape": np.array([out, inp]), "weight_g_idx": g_idx}
    w = unpack(IntCheckpoint("compressed-tensors", inp // groups, 0, bits=bits), "x.weight_packed",
               tensors, "test")
    assert w.perm is not None
    gi = np.arange(inp) // (inp // groups)  # the engine's groups: contiguous after the order
    if bits == 4:
        ours = (w.q.astype(np.float64) - w.offset[:, gi]) * w.scale[:, gi]
    else:
        ours = w.q.astype(np.float64) * w.scale[:, gi] + w.offset[:, gi]
    back = np.empty_like(ours)
    back[:, w.perm] = ours
    want = (q.astype(np.float64) - zp[:, g_idx]) * scale[:, g_idx]
    np.testing.assert_array_equal(back, want)


def _qc(**weights) -> dict:
    args = {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 128,
            "symmetric": True, **weights}
    return {"quantization_config": {
        "quant_method": "compressed-tensors", "format": "pack-quantized",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": args}}}}


def test_config_errors_name_the_field():
    assert int_checkpoint(_qc()) == IntCheckpoint("compressed-tensors", 128, 0, True)
    assert int_checkpoint(_qc(strategy="channel", group_size=None, symmetric=False)) \
        == IntCheckpoint("compressed-tensors", -1, 0, False)
    assert int_checkpoint(_qc(num_bits=8)).bits == 8
    for weights, field in (({"num_bits": 3}, r"group_0\.weights"),
                           ({"type": "float"}, r"group_0\.weights"),
                           ({"strategy": "tensor"}, r"weights\.strategy"),
                           ({"group_size": 0}, r"weights\.group_size")):
        with pytest.raises(ValueError, match=field):
            int_checkpoint(_qc(**weights))
    w8a8 = _qc(num_bits=8, strategy="channel", group_size=None)  # run weight-only
    w8a8["quantization_config"]["format"] = "int-quantized"
    w8a8["quantization_config"]["config_groups"]["group_0"]["input_activations"] = {"num_bits": 8}
    assert int_checkpoint(w8a8) == IntCheckpoint("compressed-tensors", -1, 0, True, 8,
                                                 packed=False, activations=True)
    mixed = _qc()
    mixed["quantization_config"]["config_groups"]["group_1"] = {
        "format": "float-quantized", "weights": {"num_bits": 8, "type": "float"}}
    with pytest.raises(ValueError, match="formats"):
        int_checkpoint(mixed)
    two = _qc()
    two["quantization_config"]["config_groups"]["group_1"] = {
        "weights": {**two["quantization_config"]["config_groups"]["group_0"]["weights"],
                    "group_size": 32}}
    with pytest.raises(ValueError, match="one group size"):
        int_checkpoint(two)


def test_malformed_tensors_are_named():
    fmt = IntCheckpoint("compressed-tensors", 16, 0, False)
    good = {"weight_packed": np.zeros((8, 4), np.int32), "weight_scale": np.ones((8, 2), np.float32),
            "weight_shape": np.array([8, 32]), "weight_zero_point": np.zeros((1, 2), np.int32)}
    assert unpack(fmt, "x.weight_packed", good, "test").q.shape == (8, 32)
    for change, match in (({"weight_zero_point": None}, "no 'weight_zero_point'"),
                          ({"weight_shape": np.array([8, 30])}, "weight_shape"),
                          ({"weight_scale": np.ones((8, 3), np.float32),
                            "weight_zero_point": np.zeros((1, 3), np.int32)}, "do not fit"),
                          ({"weight_zero_point": np.zeros((8, 2), np.int32)}, "weight_zero_point"),
                          ({"weight_packed": np.zeros((8, 4), np.int64)}, "int32")):
        tensors = {k: v for k, v in {**good, **change}.items() if v is not None}
        with pytest.raises(WeightLoadError, match=match):
            unpack(fmt, "x.weight_packed", tensors, "test")


def test_malformed_int_quantized_tensors_are_named():
    fmt = IntCheckpoint("compressed-tensors", 16, 0, False, 8, packed=False)
    good = {"weight": np.zeros((8, 32), np.int8), "weight_scale": np.ones((8, 2), np.float32),
            "weight_zero_point": np.zeros((8, 2), np.int8)}
    assert unpack(fmt, "x.weight", good, "test").q.shape == (8, 32)
    for change, match in (({"weight_zero_point": None}, "no 'weight_zero_point'"),
                          ({"weight_zero_point": np.zeros((2, 8), np.int8)}, "weight_zero_point"),
                          ({"weight": np.zeros((8, 32), np.int32)}, "int8"),
                          ({"weight_scale": None}, "no 'weight_scale'")):
        tensors = {k: v for k, v in {**good, **change}.items() if v is not None}
        with pytest.raises(WeightLoadError, match=match):
            unpack(fmt, "x.weight", tensors, "test")
    four = IntCheckpoint("compressed-tensors", 16, 0, True, 4, packed=False)
    with pytest.raises(WeightLoadError, match="4-bit range"):
        unpack(four, "x.weight", {"weight": np.full((8, 32), 8, np.int8),
                                  "weight_scale": np.ones((8, 2), np.float32)}, "test")
    # An asymmetric 4-bit zero point below the values' range (it would wrap in uint8).
    four = IntCheckpoint("compressed-tensors", 16, 0, False, 4, packed=False)
    with pytest.raises(WeightLoadError, match="zero point of -1"):
        unpack(four, "x.weight", {"weight": np.zeros((8, 32), np.int8),
                                  "weight_scale": np.ones((8, 2), np.float32),
                                  "weight_zero_point": np.full((8, 2), -9, np.int8)}, "test")


def test_quantization_must_fit_the_checkpoint(tmp_path):
    from jaxvllm import LLM
    write_checkpoint(str(tmp_path), "llama_channel_sym")
    with pytest.raises(ValueError, match="int4 checkpoint of quantization='compressed-tensors'"):
        LLM(model=str(tmp_path), quantization="awq", dtype="float32", max_model_len=64)
    with pytest.raises(ValueError, match="loads a compressed-tensors checkpoint"):
        LLM(quantization="compressed-tensors", max_model_len=64)  # the default model, a GGUF
    cfg = json.load(open(tmp_path / "config.json"))
    del cfg["quantization_config"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    from converters import load_model
    with pytest.raises(WeightLoadError, match="weight_packed'.*no compressed-tensors pack-quantized"):
        load_model(str(tmp_path), dtype="float32", cache_dir=None, load_tokenizer=False)
