"""What each quantization scheme does to a model's outputs: mean and max |delta| of prompt logprobs
against the unquantized model in bf16, and greedy agreement, over a fixed prompt set.

    PYTHONPATH=. python3 bench/quant_quality.py [--model M] [--load-format dummy]
        [--schemes fp8 fp8-kv gguf awq]

Schemes: "fp8" (weights W8A8, quantized on load), "fp8-kv" (the KV cache in e4m3), "gguf" (a
GGUF's 4-bit projections kept at 4 bits; against the same weights dequantized), "awq" (int4,
group 128, round to nearest: only with --load-format dummy, whose seeded weights are quantized on
load, since no int4 checkpoint of a given bf16 model is at hand), "fp8-tensor-checkpoint" (the
model written as an FP8 checkpoint with one scale per tensor, HF's `quant_method: "fp8"`, and
loaded: its float8 bytes kept), "fp8-tensor-requantized" (that checkpoint's values dequantized
and requantized per output channel on load, as the loader did before it kept them),
"fp8-block-checkpoint" (a checkpoint with 128x128 block scales, as Qwen3's FP8 releases, loaded:
requantized per channel) and "fp8-block-dequantized" (its values unquantized: what a block-scaled
GEMM would multiply, but for the activations' rounding). Dummy weights are random: their
distributions are flat, so their deltas are small and their greedy tokens near ties; the real
model's rows are the ones that say what a user would see.
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
SCHEMES = {"fp8": dict(quantization="fp8"), "fp8-kv": dict(kv_cache_dtype="fp8"),
           "gguf": dict(quantization="gguf"), "awq": dict(quantization="awq"),
           "fp8-tensor-checkpoint": dict(model="tensor/fp8"),
           "fp8-tensor-requantized": dict(model="tensor/twin", quantization="fp8"),
           "fp8-block-checkpoint": dict(model="block/fp8"),
           "fp8-block-dequantized": dict(model="block/twin")}
BLOCK = 128  # the block scales' (out, in) size, as the Qwen3 and DeepSeek FP8 releases
_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def write_fp8_checkpoints(model: str | None, root: str) -> dict[str, str]:
    """The model's weights as HF FP8 checkpoints with one scale per linear ("tensor/fp8") and one
    per BLOCK x BLOCK block ("block/fp8"), and each one's values dequantized in float32
    (".../twin"); each directory with the tokenizer."""
    import ml_dtypes
    from safetensors.numpy import save_file

    from converters import load_model
    from converters.hf import hf_tensor_map
    m = load_model(model, dtype="float32")
    out = {kind: {} for kind in ("tensor/fp8", "tensor/twin", "block/fp8", "block/twin")}
    for name, (path, transpose) in hf_tensor_map(m.config).items():
        if len(path) == 4 or isinstance(path[-1], tuple):
            raise ValueError("the fp8-tensor/block schemes take a dense model without fused tensors")
        w = m.params
        for key in path:
            w = w[key]
        w = np.asarray(w, np.float32)
        w = np.ascontiguousarray(w.T if transpose else w)  # safetensors writes the buffer's order
        if name.rsplit(".", 2)[-2] not in _LINEARS:
            for tensors in out.values():
                tensors[name] = w
            continue
        rows, cols = -(-w.shape[0] // BLOCK), -(-w.shape[1] // BLOCK)
        blocks = np.pad(np.abs(w), ((0, rows * BLOCK - w.shape[0]), (0, cols * BLOCK - w.shape[1])))
        for layout, scale in (
                ("tensor", np.abs(w).max().reshape(1) / 448.0),
                ("block", blocks.reshape(rows, BLOCK, cols, BLOCK).max((1, 3)) / 448.0)):
            scale = np.maximum(scale, 1e-12).astype(np.float32)
            full = np.kron(scale, np.ones((BLOCK, BLOCK), np.float32))[:w.shape[0], :w.shape[1]] \
                if layout == "block" else scale[0]
            q = np.clip(w / full, -448, 448).astype(ml_dtypes.float8_e4m3fn)
            out[layout + "/fp8"][name] = q
            out[layout + "/fp8"][name[:-len("weight")] + "weight_scale_inv"] = scale
            out[layout + "/twin"][name] = q.astype(np.float32) * full
    dirs = {}
    for kind, tensors in out.items():
        d = os.path.join(root, kind)
        os.makedirs(d)
        save_file(tensors, os.path.join(d, "model.safetensors"))
        conf = dict(m.hf_config)
        if kind.endswith("fp8"):
            conf["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic"}
            if kind.startswith("block"):
                conf["quantization_config"]["weight_block_size"] = [BLOCK, BLOCK]
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(conf, f)
        m.tokenizer.save_pretrained(d)
        dirs[kind] = d
    return dirs


def run(args: argparse.Namespace, **engine_kw) -> list:
    from jaxvllm import LLM, SamplingParams
    engine_kw.setdefault("model", args.model)
    llm = LLM(load_format=args.load_format, dtype="bfloat16",
              max_model_len=256, max_num_seqs=8, max_num_batched_tokens=256,
              num_gpu_blocks_override=256, enforce_eager=True, disable_log_stats=True, **engine_kw)
    if args.load_format == "dummy":
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
    if "awq" in args.schemes and args.load_format != "dummy":
        p.error("--schemes awq needs --load-format dummy (weights quantized on load)")
    writes = any(s.startswith(("fp8-tensor", "fp8-block")) for s in args.schemes)
    if writes and args.load_format == "dummy":
        p.error("the fp8-tensor/block schemes write the model's own weights: not with dummy ones")
    ref = run(args)
    with tempfile.TemporaryDirectory() as tmp:
        dirs = write_fp8_checkpoints(args.model, tmp) if writes else {}
        rows = {}
        for s in args.schemes:
            kw = dict(SCHEMES[s])
            if "model" in kw:
                kw["model"] = dirs[kw["model"]]
            rows[s] = compare(ref, run(args, **kw))
    print(f"model {args.model or 'default'} ({args.load_format}), bf16 reference, {len(PROMPTS)} "
          f"prompts, {args.output_len} greedy tokens each")
    print("| scheme | mean \\|delta prompt logprob\\| | max | tokens scored | greedy output the "
          "same | greedy tokens kept (mean) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for s, r in rows.items():
        print(f"| {s} | {r['mean_abs_delta']:.4f} | {r['max_abs_delta']:.3f} | "
              f"{r['tokens_scored']} | {r['greedy_same']}/{r['prompts']} | "
              f"{r['greedy_prefix_kept']:.1f} / {args.output_len} |")
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
