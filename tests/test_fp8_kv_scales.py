"""FP8 KV-cache scales from a checkpoint (`model.layers.N.self_attn.{k,v}_scale`, the older
`{k,v}_proj.output_scale`, or ModelOpt's `{k,v}_proj.{k,v}_scale`): loaded a float per layer or one per KV head, applied by an FP8 cache
(K / k_scale and V / v_scale stored, the query and the output scaled back), ignored by a bf16 or
float32 cache."""
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from converters import WeightLoadError, load_model
from hf_builders import save_word_tokenizer, tiny_config, tiny_model

LAYERS = 2
GAIN = 4000.0  # K and V past e4m3's 448 unless scaled (q_proj and o_proj divided back)
SHARP = 20.0   # and the queries larger: attention that a wrong K scale would move
SMALL = 1e-3   # a KV head whose K and V an FP8 cache scaled for GAIN would hold as subnormals


HEAD_DIM, GROUP = 16, 2  # 4 query heads of 16 over 2 KV heads


def _write(tmp_path, scales: dict, kv_gains=(GAIN, GAIN)) -> str:
    """A tiny float32 Llama whose KV head h has K and V values `kv_gains[h]` times its own (by
    default thousands, both), with `scales` (HF name -> value) added to its tensors; its
    directory."""
    cfg = tiny_config("llama", vocab_size=128, hidden_size=64, intermediate_size=80,
                      num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
                      tie_word_embeddings=False)
    d = tmp_path / f"m{len(list(tmp_path.iterdir()))}"
    tiny_model(cfg, matrix_scale=2.0).save_pretrained(d)
    tensors = load_file(d / "model.safetensors")
    for i in range(LAYERS):
        w = {p: tensors[f"model.layers.{i}.self_attn.{p}_proj.weight"] for p in "qkvo"}
        for h, gain in enumerate(kv_gains):
            kv_rows = slice(h * HEAD_DIM, (h + 1) * HEAD_DIM)
            q_rows = slice(h * GROUP * HEAD_DIM, (h + 1) * GROUP * HEAD_DIM)  # its query heads
            w["k"][kv_rows] *= gain
            w["v"][kv_rows] *= gain
            w["q"][q_rows] *= SHARP / gain
            w["o"][:, q_rows] /= gain
    tensors.update({k: np.asarray(v, np.float32) for k, v in scales.items()})
    save_file(tensors, d / "model.safetensors")
    save_word_tokenizer(d, 128)
    return str(d)


def _layers(path: str) -> list:
    return load_model(path, dtype="float32", cache_dir=None, load_tokenizer=False).params["layers"]


def test_kv_cache_scales_load_by_any_name(tmp_path):
    """The current names, the older `output_scale`, ModelOpt's and the deprecated `kv_scale`; as
    vLLM, a layer with one scale uses it for both, one with none takes 1."""
    layers = _layers(_write(tmp_path, {"model.layers.0.self_attn.k_scale": 0.5,
                                       "model.layers.0.self_attn.v_scale": [8.0],
                                       "model.layers.1.self_attn.v_proj.output_scale": 4.0}))
    got = [(float(lp["k_cache_scale"]), float(lp["v_cache_scale"])) for lp in layers]
    assert got == [(0.5, 8.0), (4.0, 4.0)]
    assert all(lp["k_cache_scale"].shape == () for lp in layers)
    layers = _layers(_write(tmp_path, {"model.layers.1.self_attn.kv_scale": 2.0}))
    assert [(float(lp["k_cache_scale"]), float(lp["v_cache_scale"])) for lp in layers] == [
        (1.0, 1.0), (2.0, 2.0)]
    assert "k_cache_scale" not in _layers(_write(tmp_path, {}))[0]
    layers = _layers(_write(tmp_path, {"model.layers.0.self_attn.k_proj.k_scale": 0.25,  # ModelOpt
                                       "model.layers.0.self_attn.v_proj.v_scale": 0.5}))
    assert [(float(lp["k_cache_scale"]), float(lp["v_cache_scale"])) for lp in layers] == [
        (0.25, 0.5), (1.0, 1.0)]


def test_per_head_kv_cache_scales_load_as_vectors(tmp_path, caplog):
    """compressed-tensors' "attn_head" scales ([kv_heads, 1, 1]) load as [kv_heads]; a number
    elsewhere in the model is repeated per head, a layer without scales takes ones; a scale of
    another size (per channel) is left out with a warning."""
    layers = _layers(_write(tmp_path, {"model.layers.0.self_attn.k_scale": [[[1.0]], [[2.0]]],
                                       "model.layers.0.self_attn.v_scale": 3.0}))
    got = [(lp["k_cache_scale"].tolist(), lp["v_cache_scale"].tolist()) for lp in layers]
    assert got == [([1.0, 2.0], [3.0, 3.0]), ([1.0, 1.0], [1.0, 1.0])]
    layers = _layers(_write(tmp_path, {"model.layers.1.self_attn.kv_scale": [4.0, 5.0]}))
    assert layers[1]["k_cache_scale"].tolist() == layers[1]["v_cache_scale"].tolist() == [4, 5]
    with caplog.at_level("WARNING"):
        layers = _layers(_write(tmp_path, {"model.layers.0.self_attn.k_scale": [1.0] * 32}))
    assert "k_cache_scale" not in layers[0] and "k_scale' of shape [32] left out" in caplog.text


def test_kv_cache_scales_bypass_the_weight_cache(tmp_path):
    """The converted-weights cache holds the layout's tensors only: a checkpoint with scales is
    converted each time, never cached without them nor restored as corrupt."""
    from converters import cache as wcache
    path = _write(tmp_path, {"model.layers.0.self_attn.v_scale": 8.0})
    root = tmp_path / "wcache"
    corrupt = wcache.STATS.corrupt
    for _ in range(2):
        loaded = load_model(path, dtype="float32", cache_dir=str(root), cache_min_bytes=0,
                            load_tokenizer=False)
        assert not loaded.from_cache and float(loaded.params["layers"][0]["v_cache_scale"]) == 8
    assert not root.exists() or not [p for p in root.iterdir() if not p.name.startswith(".")]
    assert wcache.STATS.corrupt == corrupt


@pytest.mark.parametrize("name, value, match", [
    ("model.layers.1.self_attn.v_scale", -1.0, r"v_scale'.*positive numbers.*got -1"),
    ("model.layers.0.self_attn.k_scale", float("inf"), r"k_scale'.*positive numbers.*got inf"),
    ("model.layers.0.self_attn.k_scale", [2.0, 0.0], r"k_scale'.*per KV head.*got 0"),
    ("model.layers.7.self_attn.k_scale", 1.0, r"layers.7.self_attn.k_scale'.* 2 layers"),
])
def test_bad_kv_cache_scales_name_the_tensor(tmp_path, name, value, match):
    with pytest.raises(WeightLoadError, match=match):
        _layers(_write(tmp_path, {name: value}))


def _prompt_logprobs(path: str, **engine_kw) -> np.ndarray:
    """Prompt logprobs of three prompts, float32 model, on a small engine."""
    from jaxvllm import LLM, SamplingParams
    kw = dict(dtype="float32", max_model_len=64, max_num_seqs=4, max_num_batched_tokens=32,
              num_gpu_blocks_override=16, enforce_eager=True, token_buckets=(8, 32))
    sp = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, prompt_logprobs=0)
    prompts = [{"prompt_token_ids": list(range(3 + j, 3 + j + n))} for j, n in enumerate((9, 17, 25))]
    outs = LLM(model=path, **kw, **engine_kw).generate(prompts, sp, use_tqdm=False)
    return np.array([next(iter(p.values())).logprob for o in outs for p in o.prompt_logprobs[1:]])


def test_fp8_cache_applies_the_scales_and_a_float_cache_ignores_them(tmp_path):
    """Prompt logprobs against the float32 cache: with K and V of thousands, an unscaled FP8 cache
    clips them at 448 and moves the logprobs far; the checkpoint's scales of 8 keep them within
    FP8's rounding. A float32 cache over the same checkpoint gives the float32 cache's results
    exactly."""
    scales = {f"model.layers.{i}.self_attn.{kv}_scale": s for i in range(LAYERS)
              for kv, s in (("k", 8.0), ("v", 8.0))}
    plain, scaled = _write(tmp_path, {}), _write(tmp_path, scales)
    ref = _prompt_logprobs(plain)
    np.testing.assert_array_equal(_prompt_logprobs(scaled), ref)
    unscaled = np.abs(_prompt_logprobs(plain, kv_cache_dtype="fp8") - ref).mean()
    with_scales = np.abs(_prompt_logprobs(scaled, kv_cache_dtype="fp8") - ref).mean()
    assert with_scales < 0.05 and unscaled > 5 * with_scales, (unscaled, with_scales)


def test_fp8_cache_applies_per_head_scales(tmp_path):
    """KV head 0's K and V in the thousands, head 1's a thousandth of their own: one scale for
    both (head 0's 8) leaves head 1 in e4m3's subnormals; a scale per head keeps both within FP8's
    rounding. Per-head scales that are all equal give the per-tensor scale's results exactly."""
    gains = (GAIN, SMALL)
    per_tensor = {f"model.layers.{i}.self_attn.{kv}_scale": 8.0 for i in range(LAYERS) for kv in "kv"}
    per_head = {k: [[[8.0]], [[8.0 * SMALL / GAIN]]] for k in per_tensor}
    ref = _prompt_logprobs(_write(tmp_path, {}, gains))
    one = np.abs(_prompt_logprobs(_write(tmp_path, per_tensor, gains), kv_cache_dtype="fp8") - ref)
    each = np.abs(_prompt_logprobs(_write(tmp_path, per_head, gains), kv_cache_dtype="fp8") - ref)
    assert each.mean() < 0.05 and one.mean() > 5 * each.mean(), (one.mean(), each.mean())
    equal = {k: [8.0, 8.0] for k in per_tensor}
    np.testing.assert_array_equal(_prompt_logprobs(_write(tmp_path, equal), kv_cache_dtype="fp8"),
                                  _prompt_logprobs(_write(tmp_path, per_tensor), kv_cache_dtype="fp8"))


def test_weight_updates_sleep_and_the_flax_module_keep_the_scales(tmp_path):
    """A trainer's weights have no KV-cache scales: update_weights keeps the checkpoint's (also
    after sleep(level=2)), and CausalLM takes such a checkpoint (its forward has no cache)."""
    from jaxvllm import LLM, SamplingParams
    from jaxvllm.models.flax_module import CausalLM
    scales = {f"model.layers.{i}.self_attn.{kv}_scale": 8.0 for i in range(LAYERS) for kv in "kv"}
    plain, scaled = _write(tmp_path, {}), _write(tmp_path, scales)
    llm = LLM(model=scaled, dtype="float32", kv_cache_dtype="fp8", max_model_len=64,
              max_num_seqs=4, max_num_batched_tokens=32, num_gpu_blocks_override=16,
              enforce_eager=True, token_buckets=(8, 32))
    sp = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, prompt_logprobs=0)
    prompt = [{"prompt_token_ids": list(range(3, 20))}]

    def logprobs():
        out = llm.generate(prompt, sp, use_tqdm=False)[0]
        return [next(iter(p.values())).logprob for p in out.prompt_logprobs[1:]]

    before = logprobs()
    trainer = load_model(plain, dtype="float32", cache_dir=None, load_tokenizer=False).params
    llm.update_weights(trainer)
    assert logprobs() == before
    llm.sleep(level=2)
    llm.wake_up()
    llm.update_weights(trainer)
    assert logprobs() == before
    CausalLM.load(scaled, dtype="float32")


def test_a_checkpoint_asking_for_an_fp8_cache_gets_one_by_default(tmp_path):
    """As vLLM: kv_cache_dtype="auto" takes an FP8 cache where the checkpoint's config asks for one
    (compressed-tensors' kv_cache_scheme, ModelOpt's kv_cache_quant_algo in its
    hf_quant_config.json; both quantizing the KV cache only, the weights as they are), with the
    results of kv_cache_dtype="fp8"; the model's dtype named keeps a float cache, another dtype
    is refused by name."""
    import json
    from jaxvllm import LLM
    scales = {f"model.layers.{i}.self_attn.{kv}_scale": 8.0 for i in range(LAYERS) for kv in "kv"}
    ct, modelopt = _write(tmp_path, scales), _write(tmp_path, scales)
    conf = json.load(open(f"{ct}/config.json"))
    conf["quantization_config"] = {"quant_method": "compressed-tensors", "kv_cache_scheme": {
        "type": "float", "num_bits": 8, "strategy": "tensor", "dynamic": False}}
    json.dump(conf, open(f"{ct}/config.json", "w"))
    json.dump({"producer": {"name": "modelopt"},
               "quantization": {"quant_algo": None, "kv_cache_quant_algo": "FP8"}},
              open(f"{modelopt}/hf_quant_config.json", "w"))
    kw = dict(dtype="float32", max_model_len=64, max_num_seqs=4, max_num_batched_tokens=32,
              num_gpu_blocks_override=16, enforce_eager=True, token_buckets=(8, 32))
    for path, kv_dtype in ((ct, "auto"), (modelopt, "auto"), (ct, "float32")):
        llm = LLM(model=path, kv_cache_dtype=kv_dtype, **kw)
        fp8 = kv_dtype == "auto"
        assert llm.llm_engine.args.kv_cache_dtype == ("fp8" if fp8 else kv_dtype)
        assert llm.llm_engine.args.quantization is None
        assert llm.llm_engine.runner.kv_cache[0][0].dtype == (jnp.float8_e4m3fn if fp8 else jnp.float32)
        del llm
    np.testing.assert_array_equal(_prompt_logprobs(ct), _prompt_logprobs(ct, kv_cache_dtype="fp8"))
    with pytest.raises(ValueError, match=r"kv_cache_dtype='bfloat16'.*model's dtype \(float32\)"):
        LLM(model=ct, kv_cache_dtype="bfloat16", **kw)
