"""Tensor parallelism with int4 and int8 weights (jaxvllm/worker/sharding.py) on 8 fake CPU devices:
tiny GPTQ checkpoints (4 bits in activation order, 8 bits) give the greedy tokens and logprobs of
one device when split over 2 and 4 (at 4 the 2 KV heads are replicated, packed rows and their
scales and zero points alike), and again after a weight swap; their tensors split as the rules
say, and a row-parallel weight whose groups do not divide over the devices is refused by name;
a GPTQ mixture of experts in activation order keeps its packed experts split alike. Run as a subprocess (this file as
a script), as tests/test_tensor_parallel.py runs its engines."""
from __future__ import annotations

import json
import os
import pathlib
import sys
import tempfile
from typing import Any, Optional

import numpy as np
import pytest

from test_tensor_parallel import PROMPTS, NUM_FAKE_DEVICES, _spec, run_script

GROUP = 16
CHECKPOINTS = {  # name: (activation order, bits, intermediate size, TP sizes)
    "gptq4_act_order": (True, 4, 128, (1, 2, 4)),
    "gptq8": (False, 8, 128, (1, 2)),
    "gptq4_down_groups_6": (False, 4, 96, (4,)),  # down's 6 groups of 16 inputs: not over 4
}
SWAPPED = ("gptq4_act_order", "gptq8")  # also run after a weight swap
# Run with the Pallas GEMMs forced (interpreted): groups of 32, the int4 GEMM's smallest.
PALLAS = {"gptq4_g32_act_order": (True, 4), "gptq8_g32": (False, 8)}
PALLAS_GROUP = 32


def _tiny(intermediate: int, seed: int = 0) -> Any:
    """A tiny random HF Llama: 4 heads, 2 KV heads, hidden 64."""
    from hf_builders import FAR_FROM_FLAT, tiny_config, tiny_model
    return tiny_model(tiny_config("llama", vocab_size=256, hidden_size=64,
                                  intermediate_size=intermediate, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=256), seed=seed, **FAR_FROM_FLAT)


def _save(d: str, act_order: bool, bits: int, intermediate: int, group: int = GROUP) -> None:
    """A tiny random Llama (4 heads, 2 KV heads) saved as a GPTQ checkpoint, every decoder-layer
    linear packed in groups of `group` inputs (test_int4's packers)."""
    import torch
    from test_int4 import _pack_linear, _save_int
    model = _tiny(intermediate)
    tensors = {k: v.numpy() for k, v in model.state_dict().items()}
    rng = np.random.default_rng(5)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            _pack_linear(tensors, name, module.weight.detach().numpy(), "gptq", act_order, rng,
                         bits, group)
            del tensors[name + ".weight"]
    _save_int(d, tensors, model.config, "gptq", act_order, bits, group)


def _new_weights(intermediate: int) -> dict[str, np.ndarray]:
    """Another random model's weights, HF-named, for a weight swap."""
    return {k: v.numpy() for k, v in _tiny(intermediate, seed=1).state_dict().items()}


def _run(d: str, tp: int, prompts: list = PROMPTS, swap: Optional[dict] = None,
         **engine_kw: Any) -> dict[str, Any]:
    """The engine's greedy tokens and logprobs; with `swap` (HF-named float weights), again after
    update_weights with them (rounded into the checkpoint's layout)."""
    from jaxvllm import LLM, SamplingParams
    engine_kw.setdefault("token_buckets", (8, 32))
    try:
        llm = LLM(model=d, dtype="float32", tensor_parallel_size=tp, max_model_len=128,
                  max_num_seqs=4, max_num_batched_tokens=32, num_gpu_blocks_override=32,
                  enforce_eager=True, weights_cache_dir="none",
                  compilation_cache_dir=os.environ.get("JAXVLLM_TEST_COMPILE_CACHE", "none"),
                  **engine_kw)
    except ValueError as e:
        return {"error": str(e)}
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=1)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
    res = {"tokens": [list(o.outputs[0].token_ids) for o in outs],
           "cum_logprobs": [o.outputs[0].cumulative_logprob for o in outs]}
    if swap is not None:
        from jaxvllm.engine.weights import to_engine_layout
        from jaxvllm.worker.weight_swap import weight_chunks
        new = swap
        llm.update_weights(new)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
        res["swapped"] = {"tokens": [list(o.outputs[0].token_ids) for o in outs],
                          "cum_logprobs": [o.outputs[0].cumulative_logprob for o in outs]}
        # The same weights streamed a layer at a time, over other weights.
        llm.update_weights({k: v * 0.5 for k, v in new.items()})
        llm.start_weight_update()
        for chunk in weight_chunks(to_engine_layout(new, llm.llm_engine.loaded.config)):
            llm.update_weights(chunk)
        llm.finish_weight_update()
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
        res["swapped"]["chunked_tokens"] = [list(o.outputs[0].token_ids) for o in outs]
    if tp > 1:
        lp = llm.llm_engine.runner.params["layers"][0]
        res["layer"] = {k: {"spec": _spec(a), "shape": list(a.shape), "dtype": str(a.dtype),
                            "shard_shape": list(a.addressable_shards[0].data.shape)}
                        for k, a in lp.items()}
    return res


def _run_pallas(d: str, tp: int, **run_kw: Any) -> dict[str, Any]:
    """_run with the engine's Pallas GEMM choice forced on (as on a GPU; the kernels interpreted),
    and the operand shapes each int4, int8 or FP8 GEMM call was traced with."""
    from jaxvllm.engine import setup
    from jaxvllm.models import int4, int8, llama, quant
    seen = []

    def counted(kernel):
        def call(x, w, *args, **kwargs):
            seen.append([list(x.shape), list(w.shape)])
            return kernel(x, w, *args, **kwargs)
        return call

    def gated(gate, up, *args, **kwargs):
        seen_gated.append(list(gate.shape))
        return saved[-1](gate, up, *args, **kwargs)

    seen_gated = []
    # The GEMMs and, on one device, the same GEMMs leaving their slices to an epilogue kernel
    # (FP8's one-row o and down: adding to the residual stream themselves, fp8_row_add_norm).
    saved = (setup.pallas_gemms_fit, int4.int4_matmul, int8.int8_matmul, quant.fp8_matmul,
             int4.int4_partials, quant.fp8_partials, llama.fp8_row_add_norm, quant.gated_fp8)
    setup.pallas_gemms_fit = lambda: True
    (int4.int4_matmul, int8.int8_matmul, quant.fp8_matmul, int4.int4_partials,
     quant.fp8_partials, llama.fp8_row_add_norm) = map(counted, saved[1:7])
    quant.gated_fp8 = gated
    try:
        res = _run(d, tp, **run_kw)
    finally:
        (setup.pallas_gemms_fit, int4.int4_matmul, int8.int8_matmul, quant.fp8_matmul,
         int4.int4_partials, quant.fp8_partials, llama.fp8_row_add_norm,
         quant.gated_fp8) = saved
    res["kernel_shapes"], res["gated_shapes"] = seen, seen_gated
    return res


def _worker(out_path: str) -> None:
    import jax
    assert jax.device_count() == NUM_FAKE_DEVICES, jax.devices()
    report: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (act_order, bits, intermediate, sizes) in CHECKPOINTS.items():
            d = os.path.join(tmp, name)
            _save(d, act_order, bits, intermediate)
            swap = _new_weights(intermediate) if name in SWAPPED else None
            report[name] = {tp: _run(d, tp, swap=swap) for tp in sizes}
        # int4 experts (GPTQ in activation order, Mixtral): packed per expert, split as their
        # layer's rules say.
        from test_int4 import write_int_moe_checkpoint
        d = pathlib.Path(tmp) / "moe"
        write_int_moe_checkpoint(d, "mixtral_gptq_act_order")
        report["moe"] = {tp: _run(str(d / "int4"), tp) for tp in (1, 2)}
        for name, (act_order, bits) in PALLAS.items():
            d = os.path.join(tmp, name)
            _save(d, act_order, bits, 128, PALLAS_GROUP)
            report[name] = {1: _run(d, 1), **{-tp: _run_pallas(d, tp) for tp in (1, 2)}}
        # FP8's one-row GEMM: one request, so that its decode steps have one row.
        d = os.path.join(tmp, "fp8")
        _tiny(256).save_pretrained(d)  # down [64, 256]: its shard apart from gate's [128, 64]
        kw = dict(prompts=PROMPTS[:1], quantization="fp8", token_buckets=(1, 8, 32))
        report["fp8"] = {1: _run(d, 1, **kw), **{-tp: _run_pallas(d, tp, **kw) for tp in (1, 2)}}
        # FP8's gated MLP kernel: a prompt of more rows than the decode buckets.
        kw["prompts"] = [PROMPTS[3]]
        report["fp8_prefill"] = {1: _run(d, 1, **kw),
                                 **{-tp: _run_pallas(d, tp, **kw) for tp in (1, 2)}}
    with open(out_path, "w") as f:
        json.dump(report, f)


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict[str, Any]:
    rep = run_script(__file__, str(tmp_path_factory.mktemp("tp_int") / "report.json"),
                     NUM_FAKE_DEVICES)
    return {m: {int(k): v for k, v in r.items()} for m, r in rep.items()}


@pytest.mark.parametrize("name, tp", [("gptq4_act_order", 2), ("gptq4_act_order", 4),
                                      ("gptq8", 2)])
def test_integer_weights_match_one_device(report, name, tp):
    """Before and after a weight swap (new weights rounded into the layout a layer at a time,
    then split, KV heads replicated at TP 4, as loaded ones are)."""
    ref, got = report[name][1], report[name][tp]
    for ref, got in ((ref, got), (ref["swapped"], got["swapped"])):
        assert got["tokens"] == ref["tokens"]
        assert got["cum_logprobs"] == pytest.approx(ref["cum_logprobs"], abs=1e-3)
    assert report[name][1]["swapped"]["tokens"] != report[name][1]["tokens"]
    swapped = report[name][tp]["swapped"]
    assert swapped["chunked_tokens"] == swapped["tokens"]  # streamed in chunks


def test_int4_experts_match_one_device_and_split_by_the_rules(report):
    """GPTQ Mixtral's packed experts [experts, out, in/2] in activation order over 2 devices:
    gate's and up's rows (outputs) split with their scales' and zero points' outputs, down's
    packed inputs with its groups, the input orders whole (down's is in gate's and up's outputs:
    each device's slice of the SwiGLU is its slice of down's inputs); the greedy tokens and
    logprobs of one device (weight swaps into packed experts: tests/test_requant.py, split as
    loaded weights are)."""
    ref, got = report["moe"][1], report["moe"][2]
    assert got["tokens"] == ref["tokens"]
    assert got["cum_logprobs"] == pytest.approx(ref["cum_logprobs"], abs=1e-3)
    layer = report["moe"][2]["layer"]
    e, h, i = 4, 64, 96
    want = {"experts_gate": ([None, "tp", None], [e, i // 2, h // 2]),
            "experts_gate_scale": ([None, None, "tp"], [e, h // GROUP, i // 2]),
            "experts_up_zero": ([None, None, "tp"], [e, h // GROUP, i // 2]),
            "experts_down": ([None, None, "tp"], [e, h, i // 4]),
            "experts_down_scale": ([None, "tp", None], [e, i // GROUP // 2, h]),
            "experts_down_zero": ([None, "tp", None], [e, i // GROUP // 2, h])}
    for name, (spec, shard) in want.items():
        assert layer[name]["dtype"] == ("float32" if name.endswith("scale") else "uint8")
        assert (layer[name]["spec"], layer[name]["shard_shape"]) == (spec, shard), name
    for name, shape in (("experts_gate_perm", [e, h]), ("experts_down_perm", [e, i])):
        assert (layer[name]["dtype"], layer[name]["spec"], layer[name]["shard_shape"]) == (
            "int32", [], shape), name


@pytest.mark.parametrize("name, tp", [("gptq4_act_order", 4), ("gptq8", 2)])
def test_integer_tensors_split_by_the_rules(report, name, tp):
    """Column-parallel q/k/v and gate/up unfused, their [out, in] rows over the devices with the
    scales' and zero points' outputs; row-parallel o and down over their inputs with the groups;
    an input order whole. At TP 4 the KV heads are replicated: k holds 4 heads' rows."""
    layer, bits = report[name][tp]["layer"], CHECKPOINTS[name][1]
    assert "q+k+v" not in layer and "gate+up" not in layer
    per_byte = 8 // bits
    assert layer["q"]["dtype"] == ("uint8" if bits == 4 else "int8")
    assert layer["q"]["spec"] == ["tp", None] and layer["q"]["shard_shape"] == [64 // tp, 64 // per_byte]
    assert layer["k"]["shape"][0] == 16 * max(tp, 2)  # head_dim 16: 2 KV heads, or one per device
    assert layer["down"]["spec"] == [None, "tp"]
    assert layer["down"]["shard_shape"] == [64, 128 // per_byte // tp]
    groups = 128 // GROUP
    assert layer["down_scale"]["spec"] == ["tp", None]
    assert layer["down_scale"]["shard_shape"] == [groups // tp, 64]
    assert layer["q_scale"]["spec"] == [None, "tp"]
    offset = "q_zero" if bits == 4 else "q_min"
    assert layer[offset]["spec"] == [None, "tp"]
    if CHECKPOINTS[name][0]:
        assert layer["o_perm"]["spec"] == [] and layer["o_perm"]["shard_shape"] == [64]


@pytest.mark.parametrize("name", sorted(PALLAS))
def test_pallas_gemms_run_per_device(report, name):
    """With the Pallas GEMMs on (as on GPUs), one device and two give the greedy tokens and
    logprobs of XLA's dequantize-then-multiply on one; on two each int4 or int8 GEMM call sees
    its device's shard: q's half of the outputs, down's half of the inputs (x split alike),
    never a whole down (the weight gathered)."""
    per_byte = 8 // PALLAS[name][1]
    ref = report[name][1]
    for tp in (1, 2):
        got = report[name][-tp]
        assert got["tokens"] == ref["tokens"]
        assert got["cum_logprobs"] == pytest.approx(ref["cum_logprobs"], abs=1e-3)
    whole_down = [64, 128 // per_byte]
    assert any(w == whole_down for _, w in report[name][-1]["kernel_shapes"])
    shapes = report[name][-2]["kernel_shapes"]
    assert any(w == [32, 64 // per_byte] for _, w in shapes)             # q: 32 of its 64 outputs
    assert any(x[1] == 64 and w == [64, 64 // per_byte] for x, w in shapes)  # down: 64 of 128 inputs
    assert not any(w == whole_down for _, w in shapes)


def test_fp8_one_row_gemm_runs_per_device(report):
    """FP8's one-row Pallas GEMM (forced on, interpreted) under TP 2: the tokens and logprobs of
    XLA's GEMM on one device, each call on its device's shard (q's 32 of 64 outputs; down's 128 of
    256 inputs, x split alike), never a whole down."""
    ref = report["fp8"][1]
    for tp in (1, 2):
        got = report["fp8"][-tp]
        assert got["tokens"] == ref["tokens"]
        assert got["cum_logprobs"] == pytest.approx(ref["cum_logprobs"], abs=1e-3)
    assert [[1, 256], [64, 256]] in report["fp8"][-1]["kernel_shapes"]  # down, whole
    shapes = report["fp8"][-2]["kernel_shapes"]
    assert [[1, 64], [32, 64]] in shapes and [[1, 128], [64, 128]] in shapes
    assert not any(w == [64, 256] for _, w in shapes)


def test_fp8_gated_mlp_kernel_runs_per_device(report):
    """FP8's gated MLP kernel (forced on, interpreted) on a prompt past the decode buckets: one
    device and two give the tokens of XLA's path on one (under TP 2 each device scales its own
    half of act(gate) * up: the logprobs move by ~1e-3); on one device gate and up fused at load
    (models/fused.py: the kernel reads their 2 x 256 outputs side by side), under TP 2 apart, each
    call seeing its device's 128 of gate's 256 outputs."""
    ref = report["fp8_prefill"][1]
    for tp in (1, 2):
        got = report["fp8_prefill"][-tp]
        assert got["tokens"] == ref["tokens"]
        assert got["cum_logprobs"] == pytest.approx(ref["cum_logprobs"], abs=5e-3)
    whole, halves = (report["fp8_prefill"][-tp]["gated_shapes"] for tp in (1, 2))
    assert whole and all(s[1] == 512 for s in whole)
    assert halves and all(s[1] == 128 for s in halves)


def test_groups_that_do_not_split_are_refused(report):
    err = report["gptq4_down_groups_6"][4]["error"]
    assert "'down'" in err and "6 groups" in err and "tensor_parallel_size (4)" in err


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    _worker(sys.argv[1])
