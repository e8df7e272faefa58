"""Weight swaps on quantized models (models/requant.py): new weights rounded to nearest into the
checkpoint's int4 or int8 layout (its groups, offsets, input order and fused projections), whole
or streamed in chunks, or into FP8 per channel. Each integer swap is checked twice: the stored
weights dequantize to the new ones within half a step, and the engine then generates what an
unquantized engine holding those dequantized values generates."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hf_builders import FAR_FROM_FLAT, tiny_model
from jaxvllm.engine.weights import to_engine_layout
from jaxvllm.models.int4 import INT4, quantize_int4
from jaxvllm.models.int8 import quantize_int8
from jaxvllm.models.moe import DOWN_ORDER, ORDER
from jaxvllm.models.quant import EXPERTS
from jaxvllm.worker.weight_swap import weight_chunks
from pallas_kernels.reference import int4_dequantize, int8_dequantize
from test_gguf_quant import _K_QUANTS, _tiny_gguf
from test_int4 import CHECKPOINTS, MOE, PROMPTS, write_int_checkpoint, write_int_moe_checkpoint

_ENGINE = dict(dtype="float32", max_model_len=128, max_num_seqs=4, max_num_batched_tokens=32,
               num_gpu_blocks_override=64, enforce_eager=True, token_buckets=(8, 32))


def _grid(group: int, step) -> np.ndarray:
    """Each element's bound: half its group's step (scale [groups, out], experts' [E, groups,
    out]) as [in, out] ([E, in, out])."""
    return 0.5 * np.repeat(np.asarray(step, np.float64), group, axis=-2)


@pytest.mark.parametrize("offset", ["zero", "min"])
def test_quantize_int4_within_half_a_step(offset):
    """Both offsets: every weight within half its group's step; a min is the group's own minimum
    (no zero point widens the range), so the extremes land on levels 0 and 15 exactly."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 24)).astype(np.float32) + 2.0  # positive: the min form's range
    q, scale, off = quantize_int4(jnp.asarray(w), 16, offset)
    assert q.dtype == INT4 and scale.dtype == jnp.float32
    assert off.dtype == (jnp.uint8 if offset == "zero" else jnp.float32)
    deq = np.asarray(int4_dequantize(q, scale, off), np.float64).T
    assert (np.abs(deq - w) <= _grid(16, scale) + 1e-6).all()
    if offset == "min":
        g = w.reshape(4, 16, 24)
        np.testing.assert_allclose(np.asarray(off), g.min(1), rtol=1e-6)
        np.testing.assert_allclose(deq.reshape(4, 16, 24).max(1), g.max(1), rtol=1e-5)


@pytest.mark.parametrize("with_min", [False, True])
def test_quantize_int8_within_half_a_step(with_min):
    """Symmetric (levels -127..127 around 0) or over the group's range with a min (-128..127
    used): every weight within half its group's step."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((96, 40)).astype(np.float32) * np.linspace(0.1, 3, 40) + 0.5
    q, scale, mn = quantize_int8(jnp.asarray(w), 32, with_min=with_min)
    assert q.dtype == jnp.int8 and q.shape == (40, 96) and scale.shape == (3, 40)
    assert (mn is None) == (not with_min)
    deq = np.asarray(int8_dequantize(q, scale, mn), np.float64).T
    assert (np.abs(deq - w) <= _grid(32, scale) + 1e-6).all()
    qv = np.asarray(q)
    assert qv.min() == (-128 if with_min else -127) and qv.max() == 127


def _dequantized(params: dict, new: dict) -> dict:
    """The engine's params with every int4/int8 weight dequantized back into the unquantized
    layout of `new` ([in, out] each, fused weights split, the input order undone), each checked
    against `new`'s weight within half a step."""
    layers = []
    for lp, nl in zip(params["layers"], new["layers"]):
        out = {k: v for k, v in lp.items() if k in nl}
        for name in [k for k in lp if lp[k].dtype in (INT4, jnp.int8) and not k.endswith("_zero")]:
            scale = lp[name + "_scale"]
            companions = [lp[name + s] for s in ("_scale", "_zero", "_min") if name + s in lp]
            deq = int4_dequantize if lp[name].dtype == INT4 else int8_dequantize
            deq = (jax.vmap(deq) if lp[name].ndim == 3 else deq)(lp[name], *companions)
            deq = np.swapaxes(np.asarray(deq, np.float64), -1, -2)  # [in (stored order), out]
            bound = _grid(deq.shape[-2] // scale.shape[-2], scale)
            if name in EXPERTS:
                deq, bound = (_experts_in_order(a, lp, name) for a in (deq, bound))
            elif name + "_perm" in lp:
                perm = np.asarray(lp[name + "_perm"])
                deq, bound = deq[np.argsort(perm)], bound[np.argsort(perm)]
            parts = name.split("+")
            cuts = np.cumsum([nl[p].shape[1] for p in parts])[:-1]
            for p, d, b in zip(parts, np.split(deq, cuts, axis=-1),
                               np.split(bound, cuts, axis=-1)):
                target = np.asarray(nl[p], np.float64)
                assert (np.abs(d - target) <= b + 1e-5).all(), p
                out[p] = d.astype(np.float32)
        layers.append(out)
    return {**new, "layers": layers}


def _experts_in_order(a: np.ndarray, lp: dict, name: str) -> np.ndarray:
    """Experts [E, in, out] as stored in activation order (models/moe.py: gate's and up's inputs
    in ORDER, down's in DOWN_ORDER, as gate's and up's outputs) back in the model's order."""
    def undo(a: np.ndarray, order: str, axis: int) -> np.ndarray:
        inverse = np.argsort(np.asarray(lp[order]), axis=1)
        return np.take_along_axis(a, np.expand_dims(inverse, 3 - axis), axis=axis)

    down = name == EXPERTS[2]
    if DOWN_ORDER in lp:
        a = undo(a, DOWN_ORDER, 1 if down else 2)
    return undo(a, ORDER, 1) if ORDER in lp and not down else a


def _check_swaps(llm, hf_config, new_hf: dict, prompt_ids) -> None:
    """Swaps `new_hf` (HF-named float32 tensors) in whole, checks it (_dequantized, then the
    generations against an unquantized engine of those values), then streams it in chunks and
    checks that the same weights land."""
    from jaxvllm import LLM, SamplingParams
    engine = llm.llm_engine
    new = to_engine_layout(new_hf, engine.loaded.config, "float32")
    llm.update_weights(new)
    swapped = engine.runner.params
    plain = _dequantized(swapped, new)
    sp = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, prompt_logprobs=0)
    prompts = [{"prompt_token_ids": p} for p in prompt_ids]
    ref = LLM.from_params(plain, hf_config, **_ENGINE).generate(prompts, sp, use_tqdm=False)
    got = llm.generate(prompts, sp, use_tqdm=False)
    for a, b in zip(ref, got):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for pa, pb, tok in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:], a.prompt_token_ids[1:]):
            assert abs(pa[tok].logprob - pb[tok].logprob) < 1e-3
    whole = {k: np.asarray(v) for k, v in swapped["layers"][1].items()}
    llm.update_weights({**new, "layers": [{k: v * 0.5 for k, v in lp.items()}
                                          for lp in new["layers"]]})
    llm.llm_engine.start_weight_update()
    for chunk in weight_chunks(new):
        llm.update_weights(chunk)
    llm.llm_engine.finish_weight_update()
    for k, v in engine.runner.params["layers"][1].items():
        np.testing.assert_array_equal(np.asarray(v), whole[k], err_msg=k)
    fused = [k for k in engine.runner.params["layers"][0] if "+" in k and "_" not in k]
    if fused:  # a fused weight's parts arrive together, or the chunk is refused by name
        part = fused[0].split("+")[0]
        llm.llm_engine.start_weight_update()
        with pytest.raises(ValueError, match=f"layers.0: .* not given with {part} "):
            llm.update_weights({f"layers.0.{part}": new["layers"][0][part]})
        llm.llm_engine.finish_weight_update()


@pytest.mark.parametrize("name", ["llama_awq", "qwen2_gptq_act_order",
                                  "llama_gptq_act_order_shared", "phi3_awq",
                                  "qwen2_gptq8_act_order"])
def test_int_checkpoint_takes_new_weights(name, tmp_path):
    """AWQ (zero points, q/k/v and gate/up fused; Phi-3's fused HF names), GPTQ in activation order
    (each linear its own input order; or one per input, fused) and 8-bit GPTQ (int8 with a min, in
    activation order)."""
    from jaxvllm import LLM
    model = write_int_checkpoint(str(tmp_path), name)
    llm = LLM(model=str(tmp_path), **_ENGINE)
    new = tiny_model(CHECKPOINTS[name][0](), seed=1, **FAR_FROM_FLAT)
    _check_swaps(llm, model.config, {k: v.numpy() for k, v in new.state_dict().items()}, PROMPTS)


@pytest.mark.parametrize("name", ["mixtral_gptq_act_order", "qwen3_moe_gptq8"])
def test_integer_experts_take_new_weights(name, tmp_path):
    """GPTQ Mixtral's int4 experts in activation order and 8-bit GPTQ Qwen3-MoE's int8 experts
    (with mins; expert 0's zeros): new experts rounded to nearest expert by expert in their
    groups, and in their input orders (gate's and up's outputs in down's)."""
    from safetensors.numpy import load_file
    from jaxvllm import LLM
    write_int_moe_checkpoint(tmp_path, name)
    llm = LLM(model=str(tmp_path / "int4"), **_ENGINE)
    assert llm.llm_engine.runner.params["layers"][0]["experts_up"].dtype in (INT4, jnp.int8)
    new = tiny_model(MOE[name][0](), seed=1, **FAR_FROM_FLAT)
    new.save_pretrained(tmp_path / "new")  # saved in HF's checkpoint names, one tensor an expert
    _check_swaps(llm, new.config, load_file(tmp_path / "new" / "model.safetensors"), PROMPTS)


def test_gguf_model_takes_new_weights(tmp_path):
    """A GGUF kept compact (quantization="gguf") in llama.cpp's Q4_K_M-like mix: Q5_K q/k/v fused
    in int8 with mins, Q6_K gate/up and down symmetric in int8 by 16, Q4_K o in int4 with a min."""
    from safetensors.numpy import load_file
    from transformers import AutoConfig
    from jaxvllm import LLM
    path = _tiny_gguf(tmp_path, "llama", _K_QUANTS, 256, 512)
    llm = LLM(model=path, tokenizer=str(tmp_path / "hf"), quantization="gguf", **_ENGINE)
    lp = llm.llm_engine.runner.params["layers"][0]
    assert lp["o"].dtype == INT4 and "o_min" in lp and "gate+up_min" not in lp
    hf = load_file(tmp_path / "hf" / "model.safetensors")
    rng = np.random.default_rng(5)
    new = {k: (v + rng.standard_normal(v.shape).astype(np.float32) * v.std()) for k, v in hf.items()}
    _check_swaps(llm, AutoConfig.from_pretrained(tmp_path / "hf"), new,
                 [list(range(3, 10)), list(range(5, 24))])


def test_bad_new_weights_are_refused_by_name(tmp_path):
    """A whole tree is checked before anything is written (a wrong shape, a non-float array, a
    missing or extra layer or weight: ValueError/TypeError naming it, the weights unchanged);
    a tree in the engine's own layout swaps in as it is, its input orders with it; sleep(level=2)
    keeps the input orders new weights are rounded into."""
    import jax
    from jaxvllm import LLM
    write_int_checkpoint(str(tmp_path), "qwen2_gptq_act_order")
    llm = LLM(model=str(tmp_path), **_ENGINE)
    engine = llm.llm_engine
    new = to_engine_layout({k: v.numpy() for k, v in tiny_model(
        CHECKPOINTS["qwen2_gptq_act_order"][0](), seed=1, **FAR_FROM_FLAT).state_dict().items()},
        engine.loaded.config, "float32")
    before = {k: np.asarray(v) for k, v in engine.runner.params["layers"][0].items()}

    def layer(i, **change):
        return {**new, "layers": [{**lp, **change} if j == i else lp
                                  for j, lp in enumerate(new["layers"])]}
    bad = [(layer(1, o=new["layers"][1]["o"][:-8]), ValueError, r"layers.1.o: shape \(56, 64\)"),
           (layer(1, q=np.asarray(new["layers"][1]["q"], np.int32)), TypeError, "layers.1.q"),
           (layer(1, q=[[0.0]]), TypeError, "layers.1.q"),
           (layer(1, input_norm=new["layers"][1]["input_norm"][:-1]), ValueError,
            "layers.1.input_norm"),
           ({**new, "layers": new["layers"] + new["layers"][:1]}, ValueError, "list of the model's 2"),
           (layer(0, extra=new["layers"][0]["o"]), ValueError, "unexpected .'extra'."),
           ({k: v for k, v in new.items() if k != "lm_head"}, ValueError, "keys")]
    for params, error, match in bad:
        with pytest.raises(error, match=match):
            llm.update_weights(params)
    for k, v in engine.runner.params["layers"][0].items():
        np.testing.assert_array_equal(np.asarray(v), before[k], err_msg=k)
    # The engine's own layout, with another input order for o: taken as it is.
    own = jax.tree.map(jnp.array, engine.runner.params)
    own["layers"][0]["o_perm"] = own["layers"][0]["o_perm"][::-1]
    llm.update_weights(own)
    np.testing.assert_array_equal(np.asarray(engine.runner.params["layers"][0]["o_perm"]),
                                  before["o_perm"][::-1])
    own["layers"][0]["o_perm"] = jnp.asarray(before["o_perm"])
    llm.update_weights(own)
    llm.update_weights(new)
    swapped = {k: np.asarray(v) for k, v in engine.runner.params["layers"][0].items()}
    llm.sleep(level=2)
    llm.wake_up()
    llm.update_weights(new)
    for k, v in engine.runner.params["layers"][0].items():
        np.testing.assert_array_equal(np.asarray(v), swapped[k], err_msg=k)


def test_fp8_model_checks_a_tree_before_writing_it(tmp_path):
    """FP8 weights take the same path: a bad tree is refused by name with nothing written; new
    weights land as quantize_fp8 makes them, a layer at a time."""
    from hf_builders import tiny_config
    from jaxvllm import LLM
    from jaxvllm.models.quant import FP8, quantize_fp8
    cfg = tiny_config("llama", vocab_size=256, hidden_size=64, intermediate_size=96,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    tiny_model(cfg, **FAR_FROM_FLAT).save_pretrained(tmp_path)
    llm = LLM(model=str(tmp_path), quantization="fp8", **_ENGINE)
    engine = llm.llm_engine
    new = to_engine_layout({k: v.numpy() for k, v in tiny_model(cfg, seed=1).state_dict().items()},
                           engine.loaded.config, "float32")
    bytes_of = lambda a: np.asarray(a).view(np.uint8)  # noqa: E731 (FP8 compared bit for bit)
    before = bytes_of(engine.runner.params["layers"][0]["q+k+v"])
    bad_layer = {**new["layers"][1], "down": new["layers"][1]["up"]}
    with pytest.raises(ValueError, match=r"layers.1.down: shape \(64, 96\)"):
        llm.update_weights({**new, "layers": [new["layers"][0], bad_layer]})
    np.testing.assert_array_equal(bytes_of(engine.runner.params["layers"][0]["q+k+v"]), before)
    llm.update_weights(new)
    lp = engine.runner.params["layers"][1]
    q, scale = quantize_fp8(new["layers"][1]["down"])
    assert lp["down"].dtype == FP8
    np.testing.assert_array_equal(bytes_of(lp["down"]), bytes_of(q))
    np.testing.assert_array_equal(np.asarray(lp["down_scale"]), np.asarray(scale))
