"""Tensor parallelism (jaxvllm/worker/sharding.py) on 8 fake CPU devices.

The fake devices need XLA_FLAGS set before JAX starts, and this test process already started JAX with
one device, so the engine runs happen in one subprocess (this file run as a script), which writes a
JSON report that the tests below check. Tiny random HF models: Llama (8 heads, 4 KV heads: TP 8
replicates each KV head twice) and Qwen2 (qkv bias, tied embeddings, 2 KV heads: TP 4 replicates).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from typing import Any, Optional

import pytest

NUM_FAKE_DEVICES = 8
TP_SIZES = (1, 2, 8)  # on GPUs: Llama's 4 KV heads split at 2, replicated at 8
# On the fake CPU devices Llama runs at 1 and 8 (replicated KV heads); Gemma 2 splits its KV heads at
# 2, Qwen2 and the MoE take 4.
CPU_TP_SIZES = (1, 8)
LAYERS = 2
PROMPTS = [list(range(3, 3 + n)) for n in (5, 11, 20, 40, 7)]   # 40 > the 32-token budget: chunked
ALLOWED = [5, 17, 33, 70, 101, 180, 222]


# ---- the subprocess ------------------------------------------------------------------------------
def _save_model(d: str, kind: str, hidden: int, kv_heads: int, **extra: Any) -> None:
    """`kind` "llama" (untied embeddings), "qwen2", "qwen2_moe" or "gemma2" (tied), with a
    256-word tokenizer."""
    from hf_builders import save_word_tokenizer, tiny_config, tiny_model
    cfg = tiny_config(kind, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=LAYERS,
                      num_attention_heads=8, num_key_value_heads=kv_heads,
                      tie_word_embeddings=kind != "llama", **extra)
    tiny_model(cfg, bias_std=0.5).save_pretrained(d)  # HF zero-inits biases: make them matter
    save_word_tokenizer(d, 256, eos_token="t1")


def _with_per_head_kv_scales(src: str, dst: str) -> None:
    """A copy of the 2-KV-head model at `src` with FP8 KV-cache scales per KV head (compressed-
    tensors' [kv_heads, 1, 1]): at TP 4 the vector of 2 is repeated with the replicated KV heads
    and split over the devices."""
    import shutil
    import numpy as np
    from safetensors.numpy import load_file, save_file
    shutil.copytree(src, dst)
    tensors = load_file(os.path.join(dst, "model.safetensors"))
    for i in range(LAYERS):
        tensors[f"model.layers.{i}.self_attn.k_scale"] = np.array([[[0.5]], [[2.0]]], np.float32)
        tensors[f"model.layers.{i}.self_attn.v_scale"] = np.array([[[1.5]], [[0.25]]], np.float32)
    save_file(tensors, os.path.join(dst, "model.safetensors"))


def _count(pattern: str, text: str) -> int:
    return len(re.findall(pattern, text))


def _spec(a: Any) -> list:
    return [e if e is None or isinstance(e, str) else list(e) for e in a.sharding.spec]


def _run_engine(d: str, tp: int, dtype: str, inspect: bool, **engine: Any) -> dict[str, Any]:
    import numpy as np
    from jaxvllm import LLM, SamplingParams
    llm = LLM(model=d, dtype=dtype, tensor_parallel_size=tp, max_model_len=128, max_num_seqs=4,
              max_num_batched_tokens=32, num_gpu_blocks_override=32, enforce_eager=True,
              token_buckets=(8, 32), weights_cache_dir="none",
              compilation_cache_dir=os.environ.get("JAXVLLM_TEST_COMPILE_CACHE", "none"), **engine)
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=1)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], sp, use_tqdm=False)
    res: dict[str, Any] = {"tokens": [list(o.outputs[0].token_ids) for o in outs],
                           "cum_logprobs": [o.outputs[0].cumulative_logprob for o in outs]}
    # A token mask (the structured-outputs path: the host's mask, applied to sharded logits).
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                        SamplingParams(temperature=0, max_tokens=8, ignore_eos=True,
                                       allowed_token_ids=ALLOWED), use_tqdm=False)
    res["masked_tokens"] = [list(o.outputs[0].token_ids) for o in outs]
    # A weight swap with unsharded params of the original config lands in the sharded layout.
    import jax
    from converters import load_model
    from jaxvllm.worker.weight_swap import weight_chunks
    base = load_model(d, dtype=dtype, cache_dir=None, load_tokenizer=False).params
    llm.update_weights(jax.tree.map(lambda x: x * 1.25, base))
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], sp, use_tqdm=False)
    res["tokens_after_update"] = [list(o.outputs[0].token_ids) for o in outs]
    res["cum_logprobs_after_update"] = [o.outputs[0].cumulative_logprob for o in outs]
    if tp > 1:  # the same update streamed a layer at a time (KV heads replicated per chunk)
        llm.update_weights(base)
        scaled = jax.tree.map(lambda x: x * 1.25, base)
        llm.start_weight_update()
        for chunk in weight_chunks(scaled):
            llm.update_weights(chunk)
        llm.finish_weight_update()
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], sp, use_tqdm=False)
        res["tokens_after_chunked_update"] = [list(o.outputs[0].token_ids) for o in outs]
    runner = llm.llm_engine.runner
    if tp == NUM_FAKE_DEVICES:
        res.update(_cross_mesh_update(llm, base, sp))
    if inspect:
        b = runner._dummy_batch(32)
        hlo = runner._step_for(32).lower(runner.params, runner.kv_cache,
                                 *runner._device_inputs(b)).compile().as_text()
        res["all_reduce"] = _count(r"= [^ ]+ all-reduce(-start)?\(", hlo)
        res["all_gather"] = _count(r"= [^ ]+ all-gather(-start)?\(", hlo)
        res["all_to_all"] = _count(r"= [^ ]+ all-to-all\(", hlo)
        res["reduce_scatter"] = _count(r"= [^ ]+ reduce-scatter\(", hlo)
        res["all_gather_shapes"] = re.findall(r"= ([^ ]+) all-gather(?:-start)?\(", hlo)
        res["all_reduce_shapes"] = re.findall(r"= ([^ ]+) all-reduce(?:-start)?\(", hlo)
        params = {}
        flat = {"embed": runner.params["embed"], "final_norm": runner.params["final_norm"]}
        if "lm_head" in runner.params:
            flat["lm_head"] = runner.params["lm_head"]
        for i, lp in enumerate(runner.params["layers"]):
            flat.update({f"layers.{i}.{k}": v for k, v in lp.items()})
        for name, a in flat.items():
            shards = a.addressable_shards
            params[name] = {"shape": list(a.shape), "spec": _spec(a),
                            "num_devices": len(a.sharding.device_set),
                            "shard_shapes": sorted({tuple(s.data.shape) for s in shards}),
                            "shard_elems": int(np.prod(shards[0].data.shape))}
        res["params"] = params
        kc = runner.kv_cache[0][0]
        res["kv_cache"] = {"shape": list(kc.shape), "spec": _spec(kc),
                           "shard_shape": list(kc.addressable_shards[0].data.shape)}
        res["kv_split"] = runner.shardings.kv_split
    return res


def _cross_mesh_update(llm: Any, base: Any, sp: Any) -> dict[str, Any]:
    """The scaled weights of the update above, placed as a trainer on a 4 x 2 (fsdp, tp) mesh of the
    same devices would hold them, go in with host transfers forbidden: the engine reshards them
    device to device into its own layout. The engine is put back on `base` first, so the update
    has something to change."""
    import jax
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("fsdp", "tp"))

    def place(x: Any) -> Any:
        spec = [None] * x.ndim
        if x.ndim and x.shape[0] % 4 == 0:
            spec[0] = "fsdp"
        if x.ndim > 1 and x.shape[1] % 2 == 0:
            spec[1] = "tp"
        return jax.device_put(x * 1.25, NamedSharding(mesh, PartitionSpec(*spec)))

    trainer = jax.tree.map(place, base)
    llm.update_weights(base)
    with jax.transfer_guard_host_to_device("disallow_explicit"), \
            jax.transfer_guard_device_to_host("disallow_explicit"):
        llm.update_weights(trainer)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], sp, use_tqdm=False)
    return {"tokens_after_cross_mesh_update": [list(o.outputs[0].token_ids) for o in outs],
            "trainer_spec": _spec(trainer["layers"][0]["q"]),
            "engine_spec": _spec(llm.llm_engine.runner.params["layers"][0]["q"])}


def _speculative(d: str, tp: int) -> dict[str, Any]:
    """Greedy tokens of prompts that repeat a phrase, with prompt-lookup guesses verified on the
    sharded engine, and without guesses on one device."""
    from jaxvllm import LLM, SamplingParams
    prompts = [{"prompt_token_ids": p * 4} for p in ([3, 4, 5, 6, 7], [9, 8, 7], [20, 30, 40, 50])]
    sp = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    res: dict[str, Any] = {}
    for size, spec in ((1, None), (tp, {"method": "ngram", "num_speculative_tokens": 3,
                                        "prompt_lookup_max": 2, "prompt_lookup_min": 1})):
        llm = LLM(model=d, dtype="float32", tensor_parallel_size=size, max_model_len=128,
                  max_num_seqs=4, max_num_batched_tokens=32, num_gpu_blocks_override=32,
                  enforce_eager=True, token_buckets=(8, 32), weights_cache_dir="none",
                  compilation_cache_dir=os.environ.get("JAXVLLM_TEST_COMPILE_CACHE", "none"),
                  speculative_config=spec)
        outs = llm.generate(prompts, sp, use_tqdm=False)
        res["guessed" if spec else "plain"] = [list(o.outputs[0].token_ids) for o in outs]
    res["guesses"] = llm.llm_engine.get_stats().spec_decode.num_draft_tokens
    return res


def _save_adapter(d: str, out: str) -> None:
    """A random rank-4 PEFT adapter on all seven projections of the model in `d`."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    torch.manual_seed(3)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    # init_lora_weights=False: B random too (PEFT's default zeros would make it a no-op)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(d), LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0, init_lora_weights=False))
    model.save_pretrained(out)


def _lora(d: str, adapter: str, tp: int, **engine: Any) -> dict[str, Any]:
    """Greedy tokens and logprobs of the prompts, alternately with the adapter and without, in
    one batch."""
    from jaxvllm import LLM, LoRARequest, SamplingParams
    llm = LLM(model=d, dtype="float32", tensor_parallel_size=tp, max_model_len=128,
              max_num_seqs=4, max_num_batched_tokens=32, num_gpu_blocks_override=32,
              enforce_eager=True, token_buckets=(8, 32), weights_cache_dir="none",
              compilation_cache_dir=os.environ.get("JAXVLLM_TEST_COMPILE_CACHE", "none"),
              enable_lora=True, max_loras=1, max_lora_rank=8, **engine)
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=1)
    lora = LoRARequest("adapter", 1, adapter)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], sp, use_tqdm=False,
                        lora_request=[lora if i % 2 == 0 else None for i in range(len(PROMPTS))])
    res = {"tokens": [list(o.outputs[0].token_ids) for o in outs],
           "cum_logprobs": [o.outputs[0].cumulative_logprob for o in outs]}
    if tp > 1:
        slots = llm.llm_engine.runner.lora.weights[0]
        res["specs"] = {k: _spec(a) for k, a in slots.items()}
        res["shard_shapes"] = {k: list(a.addressable_shards[0].data.shape) for k, a in slots.items()}
    return res


def _stuck_step(d: str, held: str) -> dict[str, Any]:
    """A TP 2 step that takes 5 s against a 1 s step_timeout, held where a collective waiting for a
    stuck device would hold it: in the copy of its samples to the host (`held="fetch"`) or while
    its programs are enqueued (`held="launch"`: XLA acquires the devices' NCCL clique then). The
    engine must raise, not wait."""
    import time

    import numpy as np
    from jaxvllm import LLM, SamplingParams
    llm = LLM(model=d, dtype="float32", tensor_parallel_size=2, max_model_len=128, max_num_seqs=4,
              max_num_batched_tokens=32, num_gpu_blocks_override=32, enforce_eager=True,
              token_buckets=(8, 32), weights_cache_dir="none", step_timeout=1.0,
              compilation_cache_dir=os.environ.get("JAXVLLM_TEST_COMPILE_CACHE", "none"))

    class Held:
        def __init__(self, a: Any) -> None:
            self.a = a

        def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
            time.sleep(5)
            return np.asarray(self.a, dtype)

    runner = llm.llm_engine.runner
    real_sample = runner._sample

    def sample(*args: Any, **kw: Any) -> Any:
        if held == "launch":
            time.sleep(5)
            return real_sample(*args, **kw)
        out = real_sample(*args, **kw)
        return out._replace(token_ids=Held(out.token_ids))

    runner._sample = sample
    t0 = time.perf_counter()
    try:
        llm.generate([{"prompt_token_ids": PROMPTS[0]}], SamplingParams(max_tokens=4), use_tqdm=False)
        return {"error": None}
    except Exception as e:  # noqa: BLE001 (the report says which)
        return {"error": f"{type(e).__name__}: {e}", "seconds": time.perf_counter() - t0}


def _worker(out_path: str) -> None:
    import jax
    if jax.default_backend() == "gpu":
        return _gpu_worker(out_path)
    assert jax.device_count() == NUM_FAKE_DEVICES, jax.devices()
    report: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        llama, qwen = os.path.join(tmp, "llama"), os.path.join(tmp, "qwen2")
        _save_model(llama, "llama", hidden=64, kv_heads=4)
        _save_model(qwen, "qwen2", hidden=64, kv_heads=2)
        report["llama"] = {tp: _run_engine(llama, tp, "float32", inspect=tp == 8)
                           for tp in CPU_TP_SIZES}
        report["speculative"] = _speculative(llama, 8)
        # LoRA: slot arrays placed beside their weights' shards, B's KV heads replicated at TP 8.
        adapter = os.path.join(tmp, "adapter")
        _save_adapter(llama, adapter)
        report["lora"] = {tp: _lora(llama, adapter, tp) for tp in CPU_TP_SIZES}
        # LoRA over FP8 weights: the adapter's update beside the quantized GEMM, sharded alike.
        report["lora_fp8"] = {tp: _lora(llama, adapter, tp, quantization="fp8") for tp in (1, 4)}
        report["qwen2"] = {tp: _run_engine(qwen, tp, "float32", inspect=tp == 4) for tp in (1, 4)}
        # Mixture of experts with a shared expert: every expert's intermediate dimension split.
        moe = os.path.join(tmp, "qwen2_moe")
        _save_model(moe, "qwen2_moe", hidden=64, kv_heads=4, num_experts=4, num_experts_per_tok=2,
                    moe_intermediate_size=32, shared_expert_intermediate_size=64)
        report["qwen2_moe"] = {tp: _run_engine(moe, tp, "float32", inspect=False) for tp in (1, 4)}
        # FP8 experts: their scales split with gate's and up's outputs, down's whole.
        report["qwen2_moe_fp8"] = {tp: _run_engine(moe, tp, "float32", inspect=False,
                                                   quantization="fp8") for tp in (1, 4)}
        # Gemma 2: soft-capped attention per device, local and global layers.
        gemma = os.path.join(tmp, "gemma2")
        _save_model(gemma, "gemma2", hidden=64, kv_heads=4, head_dim=16, query_pre_attn_scalar=16,
                    sliding_window=9, attn_logit_softcapping=20.0, final_logit_softcapping=10.0)
        report["gemma2"] = {tp: _run_engine(gemma, tp, "float32", inspect=False) for tp in (1, 2)}
        # FP8 weights and KV cache: scales split with their weights' outputs (and repeated with
        # replicated KV heads at TP 4), the float8 cache and its per-head scales split over KV
        # heads; a weight swap quantizes the new weights.
        qwen_fp8 = os.path.join(tmp, "qwen2_fp8")
        _with_per_head_kv_scales(qwen, qwen_fp8)
        report["qwen2_fp8"] = {tp: _run_engine(qwen_fp8, tp, "float32", inspect=False,
                                               quantization="fp8", kv_cache_dtype="fp8")
                               for tp in (1, 4)}
        errors = {}
        for name, d, tp in (("heads", llama, 3), ("devices", llama, 16), ("kv_heads", qwen, 3)):
            try:
                _run_engine(d, tp, "float32", inspect=False)
                errors[name] = None
            except ValueError as e:
                errors[name] = str(e)
        report["errors"] = errors
        report["stuck_step"] = {held: _stuck_step(llama, held) for held in ("fetch", "launch")}
    with open(out_path, "w") as f:
        json.dump(report, f)


def _gpu_worker(out_path: str) -> None:
    """Real GPUs: head_dim 16 so the Pallas kernel runs per device under shard_map."""
    import jax
    report: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        d = os.path.join(tmp, "llama")
        _save_model(d, "llama", hidden=128, kv_heads=4)
        sizes = [tp for tp in TP_SIZES if tp <= jax.device_count()]
        report["llama"] = {tp: _run_engine(d, tp, "float32", inspect=False) for tp in sizes}
    with open(out_path, "w") as f:
        json.dump(report, f)


def run_script(script: str, out: str, fake_cpu_devices: Optional[int]) -> dict[str, Any]:
    """Runs a test file as a script in a subprocess (with that many fake CPU devices, set before JAX
    starts) and returns the JSON report it writes to `out`."""
    env = dict(os.environ)
    if fake_cpu_devices:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                            f" --xla_force_host_platform_device_count={fake_cpu_devices}").strip()
        env["JAX_PLATFORMS"] = "cpu"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, os.path.abspath(script), out], env=env, cwd=root,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    with open(out) as f:
        return json.load(f)


def _run_worker(out: str, fake_cpu_devices: bool) -> dict[str, Any]:
    rep = run_script(__file__, out, NUM_FAKE_DEVICES if fake_cpu_devices else None)
    return {m: ({int(k): v for k, v in r.items()}
                if m not in ("errors", "stuck_step", "speculative") else r)
            for m, r in rep.items()}


# ---- the tests -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict[str, Any]:
    return _run_worker(str(tmp_path_factory.mktemp("tp") / "report.json"), fake_cpu_devices=True)


@pytest.mark.parametrize("tp", CPU_TP_SIZES[1:])
def test_greedy_tokens_match_tp1(report, tp):
    ref, got = report["llama"][1], report["llama"][tp]
    assert got["tokens"] == ref["tokens"]
    assert got["cum_logprobs"] == pytest.approx(ref["cum_logprobs"], abs=1e-3)
    assert got["masked_tokens"] == ref["masked_tokens"]


@pytest.mark.parametrize("tp", CPU_TP_SIZES[1:])
def test_lora_adapters_match_tp1(report, tp):
    """Requests with an adapter beside requests without, sharded: as on one device (whose LoRA
    matches PEFT, tests/test_lora.py); the adapter changed what its requests generated."""
    ref, got = report["lora"][1], report["lora"][tp]
    assert got["tokens"] == ref["tokens"]
    assert got["cum_logprobs"] == pytest.approx(ref["cum_logprobs"], abs=1e-3)
    base = report["llama"][1]["tokens"]
    assert [t for i, t in enumerate(ref["tokens"]) if i % 2] == base[1::2]
    assert [t for i, t in enumerate(ref["tokens"]) if i % 2 == 0] != base[0::2]
    # Each slot array split as its weight: B of column-parallel projections over outputs (k/v's
    # 4 KV heads of 8 dims replicated to 8: 64 columns), A of row-parallel ones over inputs.
    specs, shapes = got["specs"], got["shard_shapes"]
    for n in ("q", "k", "v", "gate", "up"):
        assert specs[f"{n}_lora_a"] == [] and specs[f"{n}_lora_b"] == [None, "tp"]
    for n in ("o", "down"):
        assert specs[f"{n}_lora_a"] == ["tp", None] and specs[f"{n}_lora_b"] == []
    assert shapes["k_lora_b"] == [8, 64 // tp] and shapes["o_lora_a"] == [64 // tp, 8]


def test_lora_over_fp8_weights_matches_tp1(report):
    """Adapters over FP8 weights at TP 4 as on one device (tests/test_lora.py checks one device's
    against the adapter's shift over unquantized weights)."""
    ref, got = report["lora_fp8"][1], report["lora_fp8"][4]
    assert got["tokens"] == ref["tokens"]
    assert got["cum_logprobs"] == pytest.approx(ref["cum_logprobs"], abs=1e-3)
    assert got["specs"]["q_lora_b"] == [None, "tp"] and got["specs"]["o_lora_a"] == ["tp", None]


def test_speculative_decoding_under_tp(report):
    """Guesses verified on 8 devices: the greedy tokens of plain decoding on one."""
    got = report["speculative"]
    assert got["guesses"] > 0
    assert got["guessed"] == got["plain"]


def test_token_masks_hold_under_tp(report):
    for tp in CPU_TP_SIZES:
        masked = report["llama"][tp]["masked_tokens"]
        assert all(t in ALLOWED for toks in masked for t in toks), tp
        assert masked != report["llama"][tp]["tokens"]  # the mask mattered


@pytest.mark.parametrize("model, tp", [("qwen2_moe", 4), ("gemma2", 2), ("qwen2_fp8", 4),
                                       ("qwen2_moe_fp8", 4)])
def test_other_families_greedy_tokens_match_tp1(report, model, tp):
    ref, got = report[model][1], report[model][tp]
    assert got["tokens"] == ref["tokens"]
    assert got["cum_logprobs"] == pytest.approx(ref["cum_logprobs"], abs=1e-3)
    assert got["masked_tokens"] == ref["masked_tokens"]


@pytest.mark.parametrize("model, tp", [("llama", 8), ("qwen2", 4), ("qwen2_fp8", 4),
                                       ("qwen2_moe", 4), ("qwen2_moe_fp8", 4), ("gemma2", 2)])
def test_chunked_update_under_tp_equals_a_whole_one(report, model, tp):
    """start_weight_update / update_weights(chunk) / finish_weight_update on a sharded engine
    (replicated KV heads at Llama 8 and Qwen2 4, FP8 weights quantized on arrival)."""
    got = report[model][tp]
    assert got["tokens_after_chunked_update"] == got["tokens_after_update"]


def test_update_weights_from_another_mesh_reshards_on_device(report):
    """Weights sharded for a trainer's (fsdp, tp) mesh land in the engine's TP 8 layout with no
    host transfer (the guard raised otherwise) and give the tokens of the same weights from the
    host."""
    got = report["llama"][8]
    assert got["trainer_spec"] != got["engine_spec"], got["trainer_spec"]
    assert got["tokens_after_cross_mesh_update"] == got["tokens_after_update"]


@pytest.mark.parametrize("model, tp", [("gemma2", 2), ("llama", 8), ("qwen2", 4), ("qwen2_moe", 4),
                                       ("qwen2_fp8", 4), ("qwen2_moe_fp8", 4)])
def test_update_weights_under_tp(report, model, tp):
    ref, got = report[model][1], report[model][tp]
    assert got["tokens_after_update"] == ref["tokens_after_update"]
    assert got["cum_logprobs_after_update"] == pytest.approx(ref["cum_logprobs_after_update"], abs=1e-3)
    # the swap changed the model
    assert ref["cum_logprobs_after_update"] != pytest.approx(ref["cum_logprobs"], abs=1e-3)


def test_kv_head_replication_qwen2_tp4(report):
    """2 KV heads over 4 devices (each replicated twice), with qkv biases and tied embeddings."""
    ref, got = report["qwen2"][1], report["qwen2"][4]
    assert got["tokens"] == ref["tokens"]
    assert got["cum_logprobs"] == pytest.approx(ref["cum_logprobs"], abs=1e-3)
    p = got["params"]
    head_dim = 64 // 8
    assert p["layers.0.k"]["shape"] == [64, 4 * head_dim]             # 2 heads -> 4 copies
    assert p["layers.0.k"]["shard_shapes"] == [[64, head_dim]]        # one KV head per device
    assert p["layers.0.k_bias"]["shard_shapes"] == [[head_dim]]
    assert p["layers.0.q_bias"]["shard_shapes"] == [[2 * head_dim]]
    assert got["kv_cache"]["shape"][2] == 4 and got["kv_cache"]["shard_shape"][2] == 1
    assert "lm_head" not in p and p["embed"]["shard_shapes"] == [[64, 64]]  # tied, vocab split


def test_llama_tp8_replicates_kv_heads(report):
    got = report["llama"][8]
    assert got["kv_cache"]["shape"][2] == 8 and got["kv_cache"]["shard_shape"][2] == 1
    assert got["params"]["layers.1.v"]["shard_shapes"] == [[64, 8]]


@pytest.mark.parametrize("model,tp", [("llama", 8), ("qwen2", 4)])
def test_collectives(report, model, tp):
    """One all-reduce per attention block and per MLP, one for the vocab-split embedding lookup, and
    one all-gather (the logits for the sampler); nothing gathers weights or the KV cache."""
    r = report[model][tp]
    assert r["all_reduce"] == 2 * LAYERS + 1, r["all_reduce_shapes"]
    assert r["all_gather"] == 1, r["all_gather_shapes"]
    assert r["all_to_all"] == 0 and r["reduce_scatter"] == 0
    assert all(re.search(r"\[\d+,64\]", s) for s in r["all_reduce_shapes"]), r["all_reduce_shapes"]
    assert "256]" in r["all_gather_shapes"][0]                       # [R, vocab] logits


@pytest.mark.parametrize("model,tp", [("llama", 8), ("qwen2", 4)])
def test_params_are_sharded_not_replicated(report, model, tp):
    r = report[model][tp]
    for name, p in r["params"].items():
        assert p["num_devices"] == tp, name
        full = 1
        for s in p["shape"]:
            full *= s
        leaf = name.rsplit(".", 1)[-1]
        if leaf.endswith("norm"):
            assert all(e is None for e in p["spec"]), name
            assert p["shard_elems"] == full, name
        else:
            assert "tp" in p["spec"], (name, p["spec"])
            assert p["shard_elems"] * tp == full, (name, p)
            assert len(p["shard_shapes"]) == 1, (name, p)
    assert r["kv_cache"]["spec"] == [None, None, "tp", None]
    assert r["kv_split"] == tp


def test_invalid_sizes_raise_at_startup(report):
    e = report["errors"]
    assert e["heads"] and "num_attention_heads (8)" in e["heads"] and "(3)" in e["heads"]
    assert e["devices"] and "(16)" in e["devices"] and "(8)" in e["devices"]
    assert e["kv_heads"] and "num_attention_heads (8)" in e["kv_heads"]  # heads checked first


@pytest.mark.parametrize("held", ["fetch", "launch"])
def test_stuck_step_raises_within_step_timeout(report, held):
    got = report["stuck_step"][held]
    assert got["error"] is not None and got["error"].startswith("StepTimeoutError: ")
    assert "token bucket" in got["error"] and "did not finish within 1 s on 2 devices" in got["error"]
    assert got["seconds"] < 4  # the 1 s deadline, not the 5 s the device was held


def test_validate_rules():
    from jaxvllm.models.config import ModelConfig
    from jaxvllm.worker.sharding import validate
    base = dict(architecture="LlamaForCausalLM", vocab_size=256, hidden_size=96,
                intermediate_size=192, num_layers=1, num_heads=12, head_dim=8, rms_norm_eps=1e-6,
                rope_theta=1e4, max_position_embeddings=128)
    cfg = lambda **kw: ModelConfig(**{**base, **kw})
    assert validate(cfg(num_kv_heads=12), 4) == 1
    assert validate(cfg(num_kv_heads=2), 4) == 2
    assert validate(cfg(num_kv_heads=1), 4) == 4
    assert validate(cfg(num_kv_heads=4), 2) == 1
    with pytest.raises(ValueError, match=r"num_key_value_heads \(6\).*tensor_parallel_size \(4\)"):
        validate(cfg(num_kv_heads=6), 4)
    with pytest.raises(ValueError, match=r"num_attention_heads \(12\).*\(8\)"):
        validate(cfg(num_kv_heads=4), 8)
    with pytest.raises(ValueError, match=r"intermediate_size \(190\)"):
        validate(cfg(num_kv_heads=4, intermediate_size=190), 4)
    with pytest.raises(ValueError, match=r"exceeds the number of available devices \(2\)"):
        validate(cfg(num_kv_heads=4), 4, num_devices=2)
    with pytest.raises(ValueError, match="positive integer"):
        validate(cfg(num_kv_heads=4), 0)


@pytest.mark.gpu
def test_gpu_tp_matches_tp1(tmp_path):
    import jax
    if jax.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    rep = _run_worker(str(tmp_path / "report.json"), fake_cpu_devices=False)["llama"]
    for tp, r in rep.items():
        assert r["tokens"] == rep[1]["tokens"], tp
        assert r["cum_logprobs"] == pytest.approx(rep[1]["cum_logprobs"], abs=1e-2), tp


if __name__ == "__main__":
    _worker(sys.argv[1])


@pytest.mark.parametrize("tp", [1, 2])
def test_weights_load_into_host_memory_under_tp(monkeypatch, tp):
    """Under TP the whole model is loaded on the host and only shards reach the devices (loaded on
    the first GPU it fragmented that device's memory: an OOM there and a hang on 2x H200)."""
    import jax

    import converters
    from jaxvllm.config import EngineArgs
    from jaxvllm.engine import setup
    seen = []
    import types
    monkeypatch.setattr(converters, "load_model", lambda *a, **k: (
        seen.append(jax.config.jax_default_device), types.SimpleNamespace(load_format="dummy"))[1])
    setup.load(EngineArgs(model={"model_type": "llama"}, load_format="dummy", tensor_parallel_size=tp,
                          compilation_cache_dir="none"))
    assert len(seen) == 1
    if tp == 1:
        assert seen[0] is None
    else:
        assert seen[0].platform == "cpu"
