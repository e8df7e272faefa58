"""What each quantization scheme does to a model's outputs: mean and max |delta| of prompt logprobs
against the unquantized model in bf16, and greedy agreement, over a fixed prompt set.

    PYTHONPATH=. python3 bench/quant_quality.py [--model M] [--load-format dummy]
        [--schemes fp8 fp8-kv gguf awq gptq ...]

Schemes: "fp8" (weights W8A8, quantized on load), "fp8-kv" (the KV cache in e4m3), "gguf" (a
GGUF's own 4-bit projections kept at 4 bits; against the same weights dequantized); the model
written as a checkpoint and loaded: "awq" (int4, zero points), "gptq" (int4, symmetric, GPTQ's
usual release form), "gptq-act-order" (the same with `desc_act`: groups over a permutation of the
inputs), "gptq8" (8 bits, symmetric, on the int8 path), "w8a8-int8" (compressed-tensors int-quantized,
llm-compressor's W8A8 INT8: 8 bits per output channel, run weight-only), each rounded to nearest in groups of 128
inputs (64 or 32 where 128 does not divide the model's widths; no calibration data, so neither
AWQ's scale search nor GPTQ's error feedback, and activation order's permutation is a seeded random
one an input, not the input's activation magnitudes), "gguf-q8_0" / "gguf-q5_1" / "gguf-q5_0" / "gguf-q4_0"
(a GGUF model's projections requantized to that type by gguf-py, kept in it by
`quantization="gguf"`), "fp8-tensor-checkpoint" (an FP8 checkpoint with one scale per tensor,
HF's `quant_method: "fp8"`: its float8 bytes kept), "fp8-tensor-requantized" (that checkpoint's
values dequantized and requantized per output channel on load, as the loader did before it kept
them), "fp8-block-checkpoint" (a checkpoint with 128x128 block scales, as Qwen3's FP8 releases,
loaded: requantized per channel) and "fp8-block-dequantized" (its values unquantized: what a
block-scaled GEMM would multiply, but for the activations' rounding). A scheme whose weights are
stored quantized is also scored against its own values unquantized in bf16 (a checkpoint's values
dequantized and written in float32; a GGUF loaded without `quantization="gguf"`): what the
engine's quantized path loses beside the format's rounding. With dummy weights the
schemes that write a checkpoint start from the random weights written unquantized, which is then
the reference of every scheme. Dummy weights are random: their distributions are flat, so their
deltas are small and their greedy tokens near ties; the real model's rows are the ones that say
what a user would see.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile

import numpy as np

import common  # noqa: F401  (puts the repository root on sys.path)

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    if n < 2:\n        return n\n",
           "Water boils at a temperature of", "The three primary colors are",
           "In 1969, the first humans to walk on the Moon were",
           "To make a cup of tea, first boil the water, then"]
GGUF_TYPES = ("Q8_0", "Q5_1", "Q5_0", "Q4_0")
_SAME_INPUT = {"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj"}  # one input
_INT = {"awq": ("awq", 4, False, False), "gptq": ("gptq", 4, False, True),  # method, bits,
        "gptq-act-order": ("gptq", 4, True, True), "gptq8": ("gptq", 8, False, True),  # order, sym
        "w8a8-int8": ("compressed-tensors", 8, False, True)}
# Each scheme's engine arguments ("model": a directory the run writes) and "own": the arguments of
# the run holding its weights' own values unquantized, in bf16 ({}: the reference itself), the
# second column's reference.
SCHEMES = {"fp8": dict(quantization="fp8"), "fp8-kv": dict(kv_cache_dtype="fp8"),
           "gguf": dict(quantization="gguf", own={}),
           **{f"gguf-{t.lower()}": dict(model="gguf/" + t, quantization="gguf",
                                        own=dict(model="gguf/" + t)) for t in GGUF_TYPES},
           **{k: dict(model=k, own=dict(model=k + "/twin")) for k in _INT},
           "fp8-tensor-checkpoint": dict(model="tensor", own=dict(model="tensor/twin")),
           "fp8-tensor-requantized": dict(model="tensor/twin", quantization="fp8"),
           "fp8-block-checkpoint": dict(model="block", own=dict(model="block/twin")),
           "fp8-block-dequantized": dict(model="block/twin")}
BLOCK = 128  # the block scales' (out, in) size, as the Qwen3 and DeepSeek FP8 releases
GGUF_PROJECTIONS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")



def _fp8(w: np.ndarray, layout: str) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """An HF FP8 checkpoint's tensors of w [out, in] with one scale per tensor or per BLOCK x BLOCK
    block, and the values they hold."""
    import ml_dtypes
    if layout == "tensor":
        scale = np.maximum(np.abs(w).max().reshape(1) / 448.0, 1e-12).astype(np.float32)
        full = scale[0]
    else:
        rows, cols = -(-w.shape[0] // BLOCK), -(-w.shape[1] // BLOCK)
        blocks = np.pad(np.abs(w), ((0, rows * BLOCK - w.shape[0]), (0, cols * BLOCK - w.shape[1])))
        scale = np.maximum(blocks.reshape(rows, BLOCK, cols, BLOCK).max((1, 3)) / 448.0,
                           1e-12).astype(np.float32)
        full = np.kron(scale, np.ones((BLOCK, BLOCK), np.float32))[:w.shape[0], :w.shape[1]]
    q = np.clip(w / full, -448, 448).astype(ml_dtypes.float8_e4m3fn)
    return {"weight": q, "weight_scale_inv": scale}, q.astype(np.float32) * full


def int_group(widths: list[int]) -> int:
    """The integer checkpoints' group: 128 inputs, or the largest of 64 and 32 that divides every
    linear's input width where 128 does not (SmolLM2-135M's 576)."""
    for group in (128, 64, 32):
        if all(w % group == 0 for w in widths):
            return group
    raise ValueError(f"no group of 128, 64 or 32 inputs divides the linears' widths {widths}")


def write_checkpoints(model: str | None, root: str, kinds: set[str], load_format: str = "auto",
                      seed: int = 0) -> dict[str, str]:
    """The model's weights written as each of `kinds`, a directory each with the tokenizer (where
    the model has one): "base" (the weights unquantized, float32), "tensor" / "block" (HF FP8
    checkpoints with one scale per linear / per BLOCK x BLOCK block), the integer checkpoints of
    _INT, and "<kind>/twin": a checkpoint's values dequantized, float32."""
    from safetensors.numpy import save_file

    from converters import load_model
    from converters.hf import hf_tensor_map
    from converters.int_writer import linear_tensors, quantization_config
    m = load_model(model, dtype="float32", load_format=load_format, seed=seed)
    tmap = hf_tensor_map(m.config)
    group = int_group([np.shape(_leaf(m.params, path))[0 if transpose else 1]
                       for name, (path, transpose) in tmap.items()
                       if name.rsplit(".", 2)[-2] in _LINEARS])
    perm, orders = np.random.default_rng(seed), {}
    out: dict[str, dict[str, np.ndarray]] = {kind: {} for kind in kinds}
    for name, (path, transpose) in tmap.items():
        if len(path) == 4 or isinstance(path[-1], tuple):
            raise ValueError("checkpoints are written of a dense model without fused tensors")
        w = np.asarray(_leaf(m.params, path), np.float32)
        w = np.ascontiguousarray(w.T if transpose else w)  # safetensors writes the buffer's order
        prefix = name[:-len("weight")]
        if name.rsplit(".", 2)[-2] not in _LINEARS:
            for tensors in out.values():
                tensors[name] = w
            continue
        # Activation order: one order an input, as GPTQ's (q/k/v and gate/up see one input alike)
        linear = name.rsplit(".", 2)[-2]
        order = name.replace(linear, _SAME_INPUT.get(linear, linear))
        g_idx = orders.setdefault(order, perm.permutation(np.arange(w.shape[1]) // group))
        for kind in {k.split("/")[0] for k in kinds}:
            if kind == "base":
                parts, twin = {"weight": w}, w
            elif kind in _INT:
                method, bits, act_order, sym = _INT[kind]
                parts, twin = linear_tensors(w, method, group, bits, g_idx if act_order else None,
                                             sym)
            else:
                parts, twin = _fp8(w, kind)
            if kind in out:
                out[kind].update({prefix + part: t for part, t in parts.items()})
            if kind + "/twin" in out:
                out[kind + "/twin"][name] = twin
    dirs = {}
    for kind, tensors in out.items():
        d = os.path.join(root, kind.replace("/", "-"))
        os.makedirs(d)
        save_file(tensors, os.path.join(d, "model.safetensors"))
        conf = dict(m.hf_config)
        if kind in _INT:
            method, bits, act_order, sym = _INT[kind]
            conf["quantization_config"] = quantization_config(method, group, bits, act_order, sym)
        elif kind in ("tensor", "block"):
            conf["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic"}
            if kind == "block":
                conf["quantization_config"]["weight_block_size"] = [BLOCK, BLOCK]
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(conf, f)
        if m.tokenizer is not None:
            m.tokenizer.save_pretrained(d)
        dirs[kind] = d
    return dirs


def _leaf(params: dict, path: tuple) -> np.ndarray:
    for key in path:
        params = params[key]
    return params


def write_gguf(src: str, dst: str, qtype: str) -> str:
    """The GGUF file `src` with its attention and MLP projections requantized to `qtype` by
    gguf-py (from their values dequantized), every other tensor and all metadata as they are."""
    import gguf
    from gguf import GGMLQuantizationType as T
    from gguf import GGUFValueType as V
    r = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(dst, r.fields["general.architecture"].contents())
    for key, field in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue  # the writer's own
        main = V(field.types[0])
        w.add_key_value(key, field.contents(), main,
                        sub_type=V(field.types[-1]) if main == V.ARRAY else None)
    for t in r.tensors:
        if t.name.endswith(".weight") and t.name.split(".")[-2] in GGUF_PROJECTIONS:  # not biases
            values = gguf.quants.dequantize(t.data, t.tensor_type)
            w.add_tensor(t.name, gguf.quants.quantize(values, T[qtype]), raw_dtype=T[qtype])
        else:
            w.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def run(args: argparse.Namespace, **engine_kw) -> list:
    from jaxvllm import LLM, SamplingParams
    engine_kw.setdefault("model", args.model)
    llm = LLM(load_format=args.load_format, dtype="bfloat16",
              max_model_len=256, max_num_seqs=8, max_num_batched_tokens=256,
              num_gpu_blocks_override=256, enforce_eager=True, disable_log_stats=True, **engine_kw)
    if args.random_weights:  # token ids: a dummy model may have no tokenizer
        rng = np.random.default_rng(0)
        vocab = llm.llm_engine.model_config.vocab_size
        prompts = [{"prompt_token_ids": rng.integers(3, vocab, 24).tolist()} for _ in PROMPTS]
    else:
        prompts = PROMPTS
    sp = SamplingParams(temperature=0.0, max_tokens=args.output_len, prompt_logprobs=0,
                        ignore_eos=True)
    return llm.generate(prompts, sp, use_tqdm=False)


def compare(refs: list, gots: list) -> dict:
    """|delta| of every scored prompt token's logprob; how many prompts kept all their greedy
    tokens, and the mean length of the greedy prefix kept."""
    deltas, same, kept = [], 0, []
    for ref, got in zip(refs, gots, strict=True):
        for a, b, tok in zip(ref.prompt_logprobs[1:], got.prompt_logprobs[1:],
                             ref.prompt_token_ids[1:]):
            deltas.append(abs(a[tok].logprob - b[tok].logprob))
        x, y = ref.outputs[0].token_ids, got.outputs[0].token_ids
        same += x == y
        kept.append(next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), len(x)))
    return {"mean_abs_delta": float(np.mean(deltas)), "max_abs_delta": float(np.max(deltas)),
            "tokens_scored": len(deltas), "greedy_same": same, "prompts": len(refs),
            "greedy_prefix_kept": float(np.mean(kept))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--load-format", default="auto")
    p.add_argument("--schemes", nargs="+", default=["fp8", "fp8-kv"], choices=sorted(SCHEMES))
    p.add_argument("--output-len", type=int, default=16)
    p.add_argument("--output-json", default=None, metavar="PATH")
    args = p.parse_args()
    from converters import resolve_source
    args.random_weights = args.load_format == "dummy"
    source = resolve_source(args.model, args.load_format)
    if any(s.startswith("gguf") for s in args.schemes) and source.kind != "gguf":
        p.error("the gguf schemes take a GGUF model (the default one, or a .gguf file)")
    wanted = [SCHEMES[s] for s in args.schemes]
    kinds = {kw["model"] for w in wanted for kw in (w, w.get("own") or {}) if "model" in kw
             and not kw["model"].startswith("gguf/")}
    with tempfile.TemporaryDirectory() as tmp:
        if args.random_weights and kinds:  # the random weights as a checkpoint: every run's model
            kinds.add("base")
        dirs = write_checkpoints(args.model, tmp, kinds, args.load_format) if kinds else {}
        dirs.update({"gguf/" + t: write_gguf(source.path, os.path.join(tmp, t + ".gguf"), t)
                     for t in GGUF_TYPES if f"gguf-{t.lower()}" in args.schemes})
        if "base" in dirs:
            args.model, args.load_format = dirs["base"], "auto"
        placed = lambda kw: {**kw, "model": dirs[kw["model"]]} if "model" in kw else kw
        ref = run(args)
        rows = {}
        for s, kw in zip(args.schemes, wanted):
            kw = dict(kw)
            own = kw.pop("own", None)
            got = run(args, **placed(kw))
            rows[s] = compare(ref, got)
            if own is not None:
                rows[s]["own_values"] = compare(ref if not own else run(args, **placed(own)), got)
    print(f"model {source.display} ({'random weights' if args.random_weights else 'its weights'}),"
          f" bf16 reference, {len(PROMPTS)} prompts, {args.output_len} greedy tokens each")
    print("| scheme | mean \\|delta prompt logprob\\| | max | tokens scored | greedy output the "
          "same | greedy tokens kept (mean) | against its own values in bf16: mean \\|delta\\|, "
          "greedy the same |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for s, r in rows.items():
        own = r.get("own_values")
        print(f"| {s} | {r['mean_abs_delta']:.4f} | {r['max_abs_delta']:.3f} | "
              f"{r['tokens_scored']} | {r['greedy_same']}/{r['prompts']} | "
              f"{r['greedy_prefix_kept']:.1f} / {args.output_len} | "
              + (f"{own['mean_abs_delta']:.4f}, {own['greedy_same']}/{own['prompts']} |" if own
                 else "- |"))
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
