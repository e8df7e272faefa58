"""FP8 checkpoints (converters/fp8.py): tiny random Llama models (and a Qwen3-MoE, its experts in
FP8 too) written in HF's `fp8` format (per tensor and 32x32 blocks), compressed-tensors'
`float-quantized` (per output channel), ModelOpt's (per tensor and per channel in config.json,
128x128 blocks in its hf_quant_config.json) and FBGEMM's (per channel), with the formats' tensor
names and scales. Per-tensor and per-channel ones keep their float8 bytes and scales in the
engine's FP8 layout, which dequantizes to their float32 twin; block-scaled ones are requantized
per output channel at load from the values they hold, and the engine runs them exactly as it runs
the twin with quantization="fp8". Linears a checkpoint stores unquantized stay so."""
import json
import math

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from converters import WeightLoadError, load_model
from jaxvllm.models.quant import FP8, dequantize_experts, quantize_experts_fp8, quantize_fp8
from hf_builders import save_word_tokenizer, tiny_config, tiny_model

_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_FORMATS = {  # name: (quantization_config, scale suffix, scale layout, ignore list's key)
    "hf-tensor": ({"quant_method": "fp8", "activation_scheme": "dynamic"}, "weight_scale_inv", None,
                  "modules_to_not_convert"),
    "hf-block": ({"quant_method": "fp8", "activation_scheme": "dynamic",
                  "weight_block_size": [32, 32]}, "weight_scale_inv", (32, 32),
                 "modules_to_not_convert"),
    "ct-channel": ({"quant_method": "compressed-tensors", "format": "float-quantized",
                    "config_groups": {"group_0": {
                        "targets": ["Linear"],
                        "weights": {"type": "float", "num_bits": 8, "strategy": "channel"},
                        "input_activations": {"type": "float", "num_bits": 8, "dynamic": True}}}},
                   "weight_scale", "channel", "ignore"),
    # ModelOpt in config.json: one scale a tensor, stored 0-d, with the static activation scales
    # (the engine scales activations per token instead)
    "modelopt-tensor": ({"quant_method": "modelopt", "quant_algo": "FP8"}, "weight_scale", "0-d",
                        "ignore"),
    "modelopt-channel": ({"quant_method": "modelopt", "quant_algo": "FP8_PER_CHANNEL_PER_TOKEN"},
                         "weight_scale", "channel-1d", "ignore"),
    # ModelOpt's older hf_quant_config.json beside config.json; 128x128 blocks [out, 1, in, 1]
    "modelopt-block": ({"producer": {"name": "modelopt", "version": "0.29.0"},
                        "quantization": {"quant_algo": "FP8_PB_WO"}}, "weight_scale", (128, 128),
                       "exclude_modules"),
    "fbgemm-channel": ({"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0},
                       "weight_scale", "channel", "modules_to_not_convert"),
}


def _quantize(w: np.ndarray, layout) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(float8 [out, in], its scale in the format's shape, the float32 the scale dequantizes to)."""
    out, inp = w.shape
    if layout in (None, "0-d"):
        scale = np.array(np.abs(w).max() / 448.0, np.float32).reshape(() if layout else (1,))
        full = np.full_like(w, scale)
    elif layout in ("channel", "channel-1d"):
        scale = (np.abs(w).max(1, keepdims=True) / 448.0).astype(np.float32)  # [out, 1]
        full = np.broadcast_to(scale, w.shape)
        scale = scale.reshape(-1) if layout == "channel-1d" else scale
    else:
        bo, bi = layout
        scale = np.zeros((math.ceil(out / bo), math.ceil(inp / bi)), np.float32)
        for i in range(scale.shape[0]):
            for j in range(scale.shape[1]):
                scale[i, j] = np.abs(w[i * bo:(i + 1) * bo, j * bi:(j + 1) * bi]).max() / 448.0
        full = np.kron(scale, np.ones((bo, bi), np.float32))[:out, :inp]
    q = (w / full).clip(-448, 448).astype(ml_dtypes.float8_e4m3fn)
    return q, scale, q.astype(np.float32) * full


def _write_pair(tmp_path, fmt: str, unquantized: tuple[str, ...] = (), moe: bool = False):
    """An FP8 checkpoint in `fmt` and its float32 twin holding the dequantized weights; and the
    checkpoint's tensors. `unquantized`: linears (HF module names) the checkpoint stores as they
    are, named in its config's ignore list. `moe`: a Qwen3-MoE model, its experts in FP8 too."""
    qc, suffix, layout, ignore_key = _FORMATS[fmt]
    wide = fmt == "modelopt-block"  # several of ModelOpt's fixed 128x128 blocks a weight
    experts = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
                   norm_topk_prob=True) if moe else {}
    cfg = tiny_config("qwen3_moe" if moe else "llama", vocab_size=128,
                      hidden_size=256 if wide else 64, intermediate_size=384 if wide else 80,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      tie_word_embeddings=False, **experts)
    tiny_model(cfg, matrix_scale=4.0).save_pretrained(tmp_path / "src")
    tensors = load_file(tmp_path / "src" / "model.safetensors")
    fp8, twin = {}, {}
    for name, w in tensors.items():
        if name.rsplit(".", 2)[-2] in _LINEARS and name[:-len(".weight")] not in unquantized:
            q, scale, deq = _quantize(w.astype(np.float32), layout)
            if fmt == "modelopt-block":
                scale = scale[:, None, :, None]
            fp8[name], fp8[name[:-len("weight")] + suffix] = q, scale
            if fmt.startswith("modelopt"):
                fp8[name[:-len("weight")] + "input_scale"] = np.array(0.05, np.float32)
            twin[name] = deq
        else:
            fp8[name] = twin[name] = w
    dirs = {}
    for kind, ts in (("fp8", fp8), ("twin", twin)):
        d = tmp_path / kind
        d.mkdir()
        save_file(ts, d / "model.safetensors")
        conf = json.loads((tmp_path / "src" / "config.json").read_text())
        if kind == "fp8":
            ignored = ["lm_head", *unquantized]
            if "quantization" in qc:
                (d / "hf_quant_config.json").write_text(json.dumps(
                    {**qc, "quantization": {**qc["quantization"], ignore_key: ignored}}))
            else:
                conf["quantization_config"] = {**qc, ignore_key: ignored}
        (d / "config.json").write_text(json.dumps(conf))
        save_word_tokenizer(d, 128)
        dirs[kind] = str(d)
    return dirs, fp8


# the engine's key of each linear -> its HF module and name
_HF = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
       "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}


@pytest.mark.parametrize("fmt", sorted(_FORMATS))
def test_fp8_checkpoint_loads_as_its_dequantized_twin(tmp_path, fmt):
    dirs, tensors = _write_pair(tmp_path, fmt)
    got = load_model(dirs["fp8"], dtype="float32", cache_dir=None, load_tokenizer=False).params
    want = load_model(dirs["twin"], dtype="float32", cache_dir=None, load_tokenizer=False).params
    kept = not isinstance(_FORMATS[fmt][2], tuple)
    for i, (lg, lw) in enumerate(zip(got["layers"], want["layers"])):
        for k in lw:
            if not kept and k in _HF:  # requantized per output channel from the values it holds
                q, scale = quantize_fp8(lw[k])
                np.testing.assert_array_equal(np.asarray(lg[k]).view(np.uint8),
                                              np.asarray(q).view(np.uint8), err_msg=k)
                np.testing.assert_array_equal(np.asarray(lg[k + "_scale"]), np.asarray(scale))
            elif k in _HF:
                # the checkpoint's bytes [out, in] and its scale per output channel, exactly
                name = f"model.layers.{i}.{_HF[k]}."
                q, scale = tensors[name + "weight"], tensors[name + _FORMATS[fmt][1]]
                assert lg[k].dtype == jnp.float8_e4m3fn and lg[k + "_scale"].dtype == jnp.float32
                np.testing.assert_array_equal(np.asarray(lg[k]).view(np.uint8), q.view(np.uint8))
                np.testing.assert_array_equal(np.asarray(lg[k + "_scale"]),
                                              np.broadcast_to(scale.reshape(-1), q.shape[:1]))
                deq = np.asarray(lg[k]).astype(np.float32) * np.asarray(lg[k + "_scale"])[:, None]
                np.testing.assert_array_equal(deq.T, np.asarray(lw[k]), err_msg=k)
            else:
                np.testing.assert_array_equal(np.asarray(lg[k]), np.asarray(lw[k]), err_msg=k)
        assert set(lg) == set(lw) | {k + "_scale" for k in _HF}
    np.testing.assert_array_equal(np.asarray(got["lm_head"]), np.asarray(want["lm_head"]))


def test_fp8_checkpoint_runs_in_fp8(tmp_path):
    """An FP8 checkpoint turns quantization="fp8" on, and generates exactly as its dequantized twin
    with quantization="fp8" (the same weights, requantized the same way)."""
    from jaxvllm import LLM, SamplingParams
    dirs, _ = _write_pair(tmp_path, "hf-block")
    kw = dict(dtype="float32", max_model_len=64, max_num_seqs=4, max_num_batched_tokens=32,
              num_gpu_blocks_override=16, enforce_eager=True, token_buckets=(8, 32))
    sp = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=1)
    prompts = [{"prompt_token_ids": list(range(3, 3 + n))} for n in (4, 13)]
    runs = {}
    for kind, extra in (("fp8", {}), ("twin", {"quantization": "fp8"})):
        llm = LLM(model=dirs[kind], **kw, **extra)
        assert llm.llm_engine.args.quantization == "fp8"
        assert llm.llm_engine.runner.params["layers"][0]["q+k+v"].dtype == jnp.float8_e4m3fn
        runs[kind] = [(o.outputs[0].token_ids, o.outputs[0].cumulative_logprob)
                      for o in llm.generate(prompts, sp, use_tqdm=False)]
        del llm
    assert runs["fp8"] == runs["twin"]


@pytest.mark.parametrize("fmt", ["ct-channel", "hf-block"])
def test_linears_a_checkpoint_stores_unquantized_stay_so(tmp_path, fmt):
    """An FP8 checkpoint's unquantized linears (its ignore list) run unquantized, as vLLM runs
    them, the others in FP8; new weights for the model (update_weights) are quantized alike: the
    checkpoint's own values put back reproduce its outputs."""
    from jaxvllm import LLM, SamplingParams
    plain = ("model.layers.1.self_attn.o_proj", "model.layers.0.mlp.down_proj")
    dirs, _ = _write_pair(tmp_path, fmt, plain)
    kw = dict(dtype="float32", max_model_len=64, max_num_seqs=4, max_num_batched_tokens=32,
              num_gpu_blocks_override=16, enforce_eager=True, token_buckets=(8, 32))
    sp = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=1)
    prompts = [{"prompt_token_ids": list(range(3, 3 + n))} for n in (4, 13)]
    outputs = lambda llm: [(o.outputs[0].token_ids, o.outputs[0].cumulative_logprob)
                           for o in llm.generate(prompts, sp, use_tqdm=False)]
    llm = LLM(model=dirs["fp8"], **kw)
    layers = llm.llm_engine.runner.params["layers"]
    for i, k in ((1, "o"), (0, "down")):
        assert layers[i][k].dtype == jnp.float32 and k + "_scale" not in layers[i]
    assert layers[0]["o"].dtype == layers[1]["down"].dtype == FP8
    mixed = outputs(llm)
    llm.update_weights(load_model(dirs["twin"], dtype="float32", cache_dir=None,
                                  load_tokenizer=False).params)
    assert llm.llm_engine.runner.params["layers"][1]["o"].dtype == jnp.float32
    again = outputs(llm)  # (a scale recomputed from its dequantized row may move by a rounding)
    assert [t for t, _ in again] == [t for t, _ in mixed]
    assert max(abs(a - b) for (_, a), (_, b) in zip(again, mixed)) < 1e-4
    del llm
    every = outputs(LLM(model=dirs["twin"], quantization="fp8", **kw))  # all in FP8: not these
    assert [lp for _, lp in every] != [lp for _, lp in mixed]


@pytest.mark.parametrize("fmt,name", [("ct-channel", "compressed-tensors"),
                                      ("modelopt-block", "modelopt"), ("fbgemm-channel", "fbgemm_fp8")])
def test_a_checkpoint_method_name_takes_its_fp8_checkpoint_as_fp8(tmp_path, fmt, name):
    """vLLM's name of a checkpoint's method (compressed-tensors: llm-compressor's, which
    converters/integer.py loads when they are int; modelopt, also from an hf_quant_config.json;
    fbgemm_fp8) runs an FP8 one as "fp8", and is refused for a checkpoint that is not one."""
    from jaxvllm import LLM
    dirs, _ = _write_pair(tmp_path, fmt)
    kw = dict(dtype="float32", max_model_len=64, max_num_seqs=4, max_num_batched_tokens=32,
              num_gpu_blocks_override=16, enforce_eager=True, token_buckets=(8, 32),
              quantization=name)
    llm = LLM(model=dirs["fp8"], **kw)
    assert llm.llm_engine.args.quantization == "fp8"
    assert llm.llm_engine.runner.params["layers"][0]["q+k+v"].dtype == jnp.float8_e4m3fn
    del llm
    with pytest.raises(ValueError, match=f"quantization={name!r} loads"):
        LLM(model=dirs["twin"], **kw)


def test_per_tensor_fp8_checkpoint_runs_on_its_own_bytes(tmp_path):
    """A per-tensor FP8 checkpoint in the engine: its linears are the checkpoint's float8 bytes
    with its scale (not requantized per channel, which would round them again), and its greedy
    logprobs stay near the float32 twin's unquantized (only the activations are rounded)."""
    from jaxvllm import LLM, SamplingParams
    dirs, tensors = _write_pair(tmp_path, "hf-tensor")
    kw = dict(dtype="float32", max_model_len=64, max_num_seqs=4, max_num_batched_tokens=32,
              num_gpu_blocks_override=16, enforce_eager=True, token_buckets=(8, 32))
    sp = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=1)
    prompts = [{"prompt_token_ids": list(range(3, 3 + n))} for n in (4, 13)]
    llm = LLM(model=dirs["fp8"], **kw)
    lp = llm.llm_engine.runner.params["layers"][1]
    q = tensors["model.layers.1.mlp.down_proj.weight"]
    np.testing.assert_array_equal(np.asarray(lp["down"]).view(np.uint8), q.view(np.uint8))
    np.testing.assert_array_equal(np.asarray(lp["down_scale"]), np.repeat(
        tensors["model.layers.1.mlp.down_proj.weight_scale_inv"], q.shape[0]))
    got = llm.generate(prompts, sp, use_tqdm=False)
    del llm
    want = LLM(model=dirs["twin"], **kw).generate(prompts, sp, use_tqdm=False)
    for g, w in zip(got, want):
        tokens = w.outputs[0].token_ids
        assert g.outputs[0].token_ids[:2] == tokens[:2]
        lps = [d[t].logprob for d, t in zip(g.outputs[0].logprobs, g.outputs[0].token_ids)]
        ref = [d[t].logprob for d, t in zip(w.outputs[0].logprobs, tokens)]
        n = next((i for i, (a, b) in enumerate(zip(g.outputs[0].token_ids, tokens)) if a != b), 6)
        assert np.abs(np.subtract(lps[:n], ref[:n])).max() < 0.1


def test_fp8_checkpoint_errors_name_the_problem(tmp_path):
    dirs, _ = _write_pair(tmp_path, "hf-block")
    conf_path = tmp_path / "fp8" / "config.json"
    conf = json.loads(conf_path.read_text())
    # Another quantization method: refused by name before any tensor is read.
    conf_path.write_text(json.dumps({**conf, "quantization_config": {"quant_method": "bitsandbytes"}}))
    with pytest.raises(ValueError, match="quant_method 'bitsandbytes'"):
        load_model(dirs["fp8"], dtype="float32", cache_dir=None, load_tokenizer=False)
    # ModelOpt's other algorithms (FP4): refused by name.
    conf_path.write_text(json.dumps({**conf, "quantization_config": {
        "quant_method": "modelopt", "quant_algo": "NVFP4"}}))
    with pytest.raises(ValueError, match="quant_algo 'NVFP4'"):
        load_model(dirs["fp8"], dtype="float32", cache_dir=None, load_tokenizer=False)
    # A block size the scales do not fit: the tensor is named.
    conf_path.write_text(json.dumps({**conf, "quantization_config": {
        "quant_method": "fp8", "weight_block_size": [16, 16]}}))
    with pytest.raises(WeightLoadError, match=r"proj.weight'.*scale shape"):
        load_model(dirs["fp8"], dtype="float32", cache_dir=None, load_tokenizer=False)
    # float8 tensors with no quantization_config at all.
    conf_path.write_text(json.dumps({k: v for k, v in conf.items() if k != "quantization_config"}))
    with pytest.raises(WeightLoadError, match="float8 but config.json has no quantization_config"):
        load_model(dirs["fp8"], dtype="float32", cache_dir=None, load_tokenizer=False)
    # ModelOpt's hf_quant_config.json beside it, unreadable: the file is named.
    (tmp_path / "fp8" / "hf_quant_config.json").write_text("{not json")
    with pytest.raises(WeightLoadError, match="hf_quant_config.json: cannot read"):
        load_model(dirs["fp8"], dtype="float32", cache_dir=None, load_tokenizer=False)


@pytest.mark.parametrize("fmt", ["hf-tensor", "hf-block"])
def test_fp8_moe_checkpoint_keeps_its_experts_in_fp8(tmp_path, fmt):
    """A mixture-of-experts FP8 checkpoint's experts load in the FP8 experts layout ([experts, in,
    out], a scale per expert and output channel): per-tensor ones as the checkpoint's bytes,
    dequantizing to their float32 twin; block-scaled ones requantized per channel from the values
    they hold, as quantization="fp8" quantizes the twin."""
    dirs, tensors = _write_pair(tmp_path, fmt, moe=True)
    got = load_model(dirs["fp8"], dtype="float32", cache_dir=None, load_tokenizer=False).params
    want = load_model(dirs["twin"], dtype="float32", cache_dir=None, load_tokenizer=False).params
    for i, (lg, lw) in enumerate(zip(got["layers"], want["layers"])):
        for key, proj in (("experts_gate", "gate_proj"), ("experts_up", "up_proj"),
                          ("experts_down", "down_proj")):
            assert lg[key].dtype == FP8 and lg[key].shape == lw[key].shape  # [E, in, out]
            assert lg[key + "_scale"].shape == (lw[key].shape[0], lw[key].shape[2])
            if fmt == "hf-block":
                q, scale = quantize_experts_fp8(lw[key])
                np.testing.assert_array_equal(np.asarray(lg[key]).view(np.uint8),
                                              np.asarray(q).view(np.uint8), err_msg=key)
                np.testing.assert_array_equal(np.asarray(lg[key + "_scale"]), np.asarray(scale))
                continue
            for e in range(lw[key].shape[0]):
                name = f"model.layers.{i}.mlp.experts.{e}.{proj}."
                np.testing.assert_array_equal(np.asarray(lg[key][e]).view(np.uint8),
                                              tensors[name + "weight"].T.view(np.uint8))
            deq = np.asarray(dequantize_experts(lg[key], lg[key + "_scale"], jnp.float32))
            np.testing.assert_array_equal(deq, np.asarray(lw[key]), err_msg=key)


def test_moe_in_fp8_runs_its_experts_in_fp8(tmp_path):
    """An FP8 MoE checkpoint generates exactly as its dequantized twin quantized on load (the
    experts too), and its prompt logprobs stay near the twin's unquantized (FP8's rounding of
    weights and activations: 0.05 on average here)."""
    from jaxvllm import LLM, SamplingParams
    dirs, _ = _write_pair(tmp_path, "hf-block", moe=True)
    kw = dict(dtype="float32", max_model_len=64, max_num_seqs=4, max_num_batched_tokens=32,
              num_gpu_blocks_override=16, enforce_eager=True, token_buckets=(8, 32))
    sp = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=1,
                        prompt_logprobs=0)
    prompts = [{"prompt_token_ids": list(range(3 + 7 * n, 23 + 7 * n))} for n in range(3)]
    runs, prompt_lps = {}, {}
    for kind, model, extra in (("fp8", "fp8", {}), ("quantized", "twin", {"quantization": "fp8"}),
                               ("float", "twin", {})):
        llm = LLM(model=dirs[model], **kw, **extra)
        lp = llm.llm_engine.runner.params["layers"][0]
        assert (lp["experts_up"].dtype == FP8) == (kind != "float")
        outs = llm.generate(prompts, sp, use_tqdm=False)
        runs[kind] = [(o.outputs[0].token_ids, o.outputs[0].cumulative_logprob) for o in outs]
        prompt_lps[kind] = np.array([[next(iter(d.values())).logprob for d in o.prompt_logprobs[1:]]
                                     for o in outs])
        del llm
    assert runs["fp8"] == runs["quantized"]
    delta = np.abs(prompt_lps["fp8"] - prompt_lps["float"])
    assert 0 < delta.mean() < 0.1 and delta.max() < 0.5, (delta.mean(), delta.max())
