"""GGUF files (llama.cpp) -> the engine's params pytree (the config and tokenizer: converters/gguf_meta.py).

Named `gguf_loader` so that `import gguf` below is the `gguf` package, not this module.

- Tensors are dequantized one at a time with `gguf.quants.dequantize` (the same routine transformers uses)
  and placed on the default device as they are converted.
- GGUF stores shapes in ggml order (fastest dimension first); the numpy view of a tensor has the reversed
  shape, which is torch's [out, in] for linear weights, so linear weights are transposed as for HF.
- llama.cpp's converter permutes the rows of q/k projection weights of `llama`-architecture models
  (interleaved rotary halves); `unpermute_qk` undoes it exactly as transformers' GGUF loader does.
  Qwen2/Qwen3 GGUFs are not permuted. Mistral GGUFs use the `llama` architecture (and are permuted:
  the llama.cpp Mistral converter derives from the Llama one).
"""
from __future__ import annotations

import dataclasses
import logging
import re
from typing import Any, Optional

import numpy as np

from converters.errors import WeightLoadError
from converters.gguf_meta import architecture, open_reader
from converters.hf import ParamsBuilder, moe_tensor_names
from jaxvllm.models.config import ModelConfig

logger = logging.getLogger(__name__)

# GGUF per-block tensor name -> HF per-layer suffix.
GGUF_LAYER_TENSORS = {
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "attn_qkv.weight": "self_attn.qkv_proj.weight",  # Phi-3: fused (split by the builder)
}
# Per llama.cpp architecture, names that mean something else there.
_GEMMA_NORMS = {"ffn_norm.weight": "pre_feedforward_layernorm.weight",
                "post_attention_norm.weight": "post_attention_layernorm.weight",
                "post_ffw_norm.weight": "post_feedforward_layernorm.weight"}
GGUF_ARCH_LAYER_TENSORS = {"phi3": {"ffn_up.weight": "mlp.gate_up_proj.weight"},
                           "gemma2": _GEMMA_NORMS, "gemma3": _GEMMA_NORMS}
# llama.cpp's Gemma converter stores each norm weight plus one (ggml scales by the weight itself).
NORMS_PLUS_ONE_ARCHS = ("gemma2", "gemma3")
# Mixture-of-experts tensors: llama.cpp stacks each layer's experts ([experts, out, in]); the
# router and Qwen2-MoE's shared expert are one tensor each. GGUF name -> the HF name's part
# ("{experts}" and "{router}": the architecture's module names, see converters/hf.py).
GGUF_MOE_TENSORS = {
    "ffn_gate_inp.weight": "{router}",
    "ffn_gate_exps.weight": "gate", "ffn_up_exps.weight": "up", "ffn_down_exps.weight": "down",
    "ffn_gate_shexp.weight": "mlp.shared_expert.gate_proj.weight",
    "ffn_up_shexp.weight": "mlp.shared_expert.up_proj.weight",
    "ffn_down_shexp.weight": "mlp.shared_expert.down_proj.weight",
    "ffn_gate_inp_shexp.weight": "mlp.shared_expert_gate.weight",
}
GGUF_TOP_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# Tensors llama.cpp adds that the engine does not use (rope_freqs: llama3 rope factors, and
# rope_factors_*: Phi-3's LongRoPE factors, which the config carries as rope_scaling).
GGUF_IGNORED = re.compile(r"^rope_freqs\.weight$|\.rope_freqs\.weight$"
                          r"|^rope_factors_(long|short)\.weight$")
# llama.cpp architectures whose q/k rows the converter permuted.
PERMUTED_ARCHS = ("llama",)
_BLK = re.compile(r"^blk\.(\d+)\.(.+)$")


def gguf_to_hf_name(name: str, arch: str = "llama") -> Optional[str]:
    if name in GGUF_TOP_TENSORS:
        return GGUF_TOP_TENSORS[name]
    m = _BLK.match(name)
    layer_tensors = {**GGUF_LAYER_TENSORS, **GGUF_ARCH_LAYER_TENSORS.get(arch, {})}
    if m and m.group(2) in layer_tensors:
        return f"model.layers.{m.group(1)}.{layer_tensors[m.group(2)]}"
    return None


def hf_to_gguf_name(name: str) -> str:
    for g, h in GGUF_TOP_TENSORS.items():
        if name == h:
            return g
    m = re.match(r"^model\.layers\.(\d+)\.(.+)$", name)
    if m:
        for g, h in GGUF_LAYER_TENSORS.items():
            if m.group(2) == h:
                return f"blk.{m.group(1)}.{g}"
    return name


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's `permute(weights, n_head)` of q (n_head heads) or k (n_kv_head heads) rows.

    Same as transformers' `LlamaTensorProcessor._reverse_permute_weights`: rows are [head, 2, dim/2]
    in GGUF, [head, dim/2, 2] -> swapped back to HF's rotate-half order.
    """
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def checkpoint_dtype(reader, path: str) -> str:
    """'auto' for a GGUF: float16/bfloat16 when every matrix is stored in that type; bfloat16 when any
    matrix is quantized (float32 would double the device memory of a model that was quantized to be
    small; the choice is logged); float32 otherwise (F32 or a mix of float types: the stored values)."""
    import gguf

    T = gguf.GGMLQuantizationType
    kinds = {t.tensor_type for t in reader.tensors if len(t.shape) >= 2}
    if kinds == {T.F16}:
        return "float16"
    if kinds == {T.BF16}:
        return "bfloat16"
    quantized = sorted(k.name for k in kinds - {T.F32, T.F16, T.BF16, T.F64})
    if quantized:
        logger.info("%s is quantized (%s): dtype 'auto' dequantizes it to bfloat16; "
                    "--dtype float32 keeps the full precision of the dequantized values",
                    path, ", ".join(quantized))
        return "bfloat16"
    return "float32"


def tensor_array(t) -> np.ndarray:
    """A GGUF tensor as a numpy array of its logical (numpy-order) shape; float16/bfloat16 stay as they are,
    quantized types are dequantized to float32."""
    import gguf
    from gguf.quants import dequantize

    T = gguf.GGMLQuantizationType
    shape = tuple(int(s) for s in reversed(list(t.shape)))
    if t.tensor_type == T.F16:
        return np.asarray(t.data).view(np.float16).reshape(shape)
    if t.tensor_type == T.BF16:
        import ml_dtypes

        return np.asarray(t.data).view(np.uint16).view(ml_dtypes.bfloat16).reshape(shape)
    # a plain view: numpy runs Python code for every slice of a memmap (a third of the time)
    return dequantize(t.data.view(np.ndarray), t.tensor_type).reshape(shape)


def load_gguf_params(path: str, cfg: ModelConfig, dtype: str, reader=None,
                     keep_quantized: bool = False) -> dict[str, Any]:
    """Dequantize and convert every tensor of the GGUF at `path` (dtype: one of DTYPES, already
    resolved); with `keep_quantized` the projections stored in one of
    converters/gguf_quant.kept_types() stay in the int4 or int8 layout."""
    from converters.gguf_quant import kept_types, kept_weight
    from converters.integer import Int8Weight
    reader = reader if reader is not None else open_reader(path)
    arch = architecture(reader, path)
    builder = ParamsBuilder(cfg, dtype, path, display_name=hf_to_gguf_name)
    keep = kept_types() if keep_quantized else ()
    for t in reader.tensors:
        m = _BLK.match(t.name)
        if m and m.group(2) in GGUF_MOE_TENSORS:
            _add_moe_tensor(builder, cfg, int(m.group(1)), GGUF_MOE_TENSORS[m.group(2)], t, path,
                            keep)
            continue
        hf_name = gguf_to_hf_name(t.name, arch)
        if hf_name is None:
            if not GGUF_IGNORED.search(t.name):
                builder.unexpected.append(t.name)
            continue
        if not builder.wants(hf_name):
            continue
        builder.check_shape(hf_name, reversed(list(t.shape)), path)
        packed = t.tensor_type in keep and builder.takes_quantized(hf_name)
        try:
            w = kept_weight(t) if packed else tensor_array(t)
        except Exception as e:
            raise WeightLoadError(f"{path}: cannot {'unpack' if packed else 'dequantize'} tensor "
                                  f"{t.name!r} ({t.tensor_type.name}: {e})") from e
        if arch in NORMS_PLUS_ONE_ARCHS and t.name.endswith("norm.weight"):
            w = w - 1
        heads = {"self_attn.q_proj.weight": cfg.num_heads,
                 "self_attn.k_proj.weight": cfg.num_kv_heads}.get(hf_name.split(".", 3)[-1])
        if arch in PERMUTED_ARCHS and heads:
            w = (dataclasses.replace(w, **{f: unpermute_qk(getattr(w, f), heads)
                                           for f in ("q", "scale", "offset")
                                           if getattr(w, f, None) is not None})
                 if packed else unpermute_qk(w, heads))
        if isinstance(w, Int8Weight):
            builder.add_int8(hf_name, w, path)
        elif packed:
            builder.add_int4(hf_name, w, path)
        else:
            builder.add(hf_name, w, path)
        del w
    return builder.finish()


def _add_moe_tensor(builder: ParamsBuilder, cfg: ModelConfig, layer: int, part: str, t: Any,
                    path: str, keep: tuple = ()) -> None:
    """One mixture-of-experts tensor of a GGUF: a stack of experts goes in expert by expert, in
    the int4 or int8 layout where its type is one of `keep`."""
    from converters.gguf_quant import kept_weight
    from converters.integer import Int8Weight
    module, router, experts = moe_tensor_names(cfg)
    prefix = f"model.layers.{layer}."
    packed = part in ("gate", "up", "down") and t.tensor_type in keep
    try:
        w = kept_weight(t) if packed else tensor_array(t)
    except Exception as e:
        raise WeightLoadError(f"{path}: cannot {'unpack' if packed else 'dequantize'} tensor "
                              f"{t.name!r} ({t.tensor_type.name}: {e})") from e
    if part in ("gate", "up", "down"):
        shape = tuple(int(s) for s in reversed(list(t.shape)))
        if len(shape) != 3 or shape[0] != cfg.num_experts:
            raise WeightLoadError(f"{path}: tensor {t.name!r} has shape {list(shape)}, but the "
                                  f"config expects {cfg.num_experts} stacked experts")
        for j in range(cfg.num_experts):
            name = f"{prefix}{module}.experts.{j}.{experts[part]}.weight"
            if not packed:
                builder.add(name, w[j], path)
                continue
            one = slice(j * shape[1], (j + 1) * shape[1])  # expert j's rows of the stack
            expert = dataclasses.replace(w, **{f: getattr(w, f)[one] for f in
                                               ("q", "scale", "offset")
                                               if getattr(w, f) is not None})
            (builder.add_int8 if isinstance(w, Int8Weight) else builder.add_int4)(
                name, expert, path)
        return
    name = prefix + (f"{module}.{router}.weight" if part == "{router}" else part)
    if name.endswith("shared_expert_gate.weight") and w.ndim == 1:
        w = w[None]  # llama.cpp keeps it as a vector
    if builder.wants(name):
        builder.check_shape(name, w.shape, path)
        builder.add(name, w, path)
