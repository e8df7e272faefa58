"""HF checkpoints (config.json + *.safetensors) -> the engine's params pytree (see jaxvllm/models/params.py).

Tensors are streamed one at a time (`safetensors.safe_open`): each is read, checked against the layout's
shape, placed on the default device, transposed to [in, out] and cast there, and the host copy is dropped,
so peak memory is about one tensor beyond the params.
"""
from __future__ import annotations

import functools
import glob
import json
import logging
import os
import re
from typing import Any, Callable, Iterable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from converters.errors import WeightLoadError
from converters.fp8 import channel_scales as fp8_channel_scales
from converters.fp8 import dequantize as dequantize_fp8
from converters.fp8 import fp8_checkpoint
from converters.fp8 import scale_name as fp8_scale_name
from converters.integer import PACKED, Int4Weight, Int8Weight, int_checkpoint
from converters.integer import dequantize as dequantize_integer
from converters.integer import unpack as unpack_integer
from converters.quant_config import quantization_config
from converters.safetensors_raw import read_array
from jaxvllm.models.config import ModelConfig
from jaxvllm.models.fused import one_order
from jaxvllm.models.int4 import pack as pack_int4
from jaxvllm.models.int8 import kernel_groups as int8_groups
from jaxvllm.models.params import KV_CACHE_SCALES, param_shapes
from jaxvllm.models.quant import EXPERTS, QUANTIZED, quantize_fp8
from pallas_kernels.reference import int4_dequantize, int8_dequantize

logger = logging.getLogger(__name__)

INTEGERS = (jnp.uint8, jnp.int8)  # the int4 and int8 layouts' weights

DTYPES = ("float32", "bfloat16", "float16")
_DTYPE_ALIASES = {
    "float32": "float32", "fp32": "float32", "float": "float32", "f32": "float32",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16", "half": "float16", "f16": "float16",
}

# HF per-layer tensor suffix -> (layout key, transpose to [in, out]).
HF_LAYER_TENSORS: dict[str, tuple[str, bool]] = {
    "self_attn.q_proj.weight": ("q", True),
    "self_attn.k_proj.weight": ("k", True),
    "self_attn.v_proj.weight": ("v", True),
    "self_attn.o_proj.weight": ("o", True),
    "self_attn.q_proj.bias": ("q_bias", False),
    "self_attn.k_proj.bias": ("k_bias", False),
    "self_attn.v_proj.bias": ("v_bias", False),
    "self_attn.q_norm.weight": ("q_norm", False),
    "self_attn.k_norm.weight": ("k_norm", False),
    "mlp.gate_proj.weight": ("gate", True),
    "mlp.up_proj.weight": ("up", True),
    "mlp.down_proj.weight": ("down", True),
    "mlp.shared_expert.gate_proj.weight": ("shared_gate", True),
    "mlp.shared_expert.up_proj.weight": ("shared_up", True),
    "mlp.shared_expert.down_proj.weight": ("shared_down", True),
    "mlp.shared_expert_gate.weight": ("shared_router", True),
    "input_layernorm.weight": ("input_norm", False),
    "post_attention_layernorm.weight": ("post_attn_norm", False),
    "pre_feedforward_layernorm.weight": ("pre_ffn_norm", False),
    "post_feedforward_layernorm.weight": ("post_ffn_norm", False),
}
HF_TOP_TENSORS: dict[str, tuple[str, bool]] = {
    "model.embed_tokens.weight": ("embed", False),
    "model.norm.weight": ("final_norm", False),
    "lm_head.weight": ("lm_head", True),
}
# FP8 KV-cache scales (a float per layer for K and one for V, or one per KV head, as vLLM reads
# them: the current `self_attn.{k,v}_scale`, the `{k,v}_proj.output_scale` of earlier FP8
# checkpoints, ModelOpt's `{k,v}_proj.{k,v}_scale`, and the deprecated `self_attn.kv_scale`, one
# for both).
_KV_SCALE = re.compile(r"^model\.layers\.(\d+)\.self_attn\."
                       r"(?:(k|v|kv)_scale|(k|v)_proj\.(?:output_scale|\3_scale))$")
# Tensors some checkpoints carry that the engine recomputes or does not use (a multimodal
# checkpoint's vision tower and projector too).
# FP8 checkpoints' scales (converters/fp8.py) and integer ones' zeros, scales and group indices
# (converters/integer.py) are read with their weights.
_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$|\.attention\.masked_bias$|\.attn\.bias$"
                      r"|\.(weight_scale|weight_scale_inv|input_scale|qzeros|scales|g_idx"
                      r"|weight_shape|weight_zero_point|weight_g_idx)$"
                      r"|^(model\.)?(vision_tower|multi_modal_projector)\.")
# A multimodal checkpoint's text-model tensors, under the names of the text model alone.
_TEXT_MODEL_PREFIXES = (("language_model.model.", "model."), ("model.language_model.", "model."),
                        ("language_model.lm_head.", "lm_head."))


def text_model_name(name: str) -> str:
    for prefix, replacement in _TEXT_MODEL_PREFIXES:
        if name.startswith(prefix):
            return replacement + name[len(prefix):]
    return name

# Mixture-of-experts layers' HF names: (module, router, {projection: expert tensor}); each
# projection's experts are stacked on a leading expert axis (`experts_<projection>`).
_MOE_TENSORS: dict[str, tuple[str, str, dict[str, str]]] = {
    "MixtralForCausalLM": ("block_sparse_moe", "gate", {"gate": "w1", "up": "w3", "down": "w2"}),
}
_MOE_DEFAULT = ("mlp", "gate", {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"})


def moe_tensor_names(cfg: ModelConfig) -> tuple[str, str, dict[str, str]]:
    return _MOE_TENSORS.get(cfg.architecture, _MOE_DEFAULT)

# Fused tensors (Phi-3): HF suffix -> the layout keys its output rows hold, in order.
_FUSED_TENSORS: dict[str, tuple[str, ...]] = {
    "self_attn.qkv_proj.weight": ("q", "k", "v"),
    "mlp.gate_up_proj.weight": ("gate", "up"),
}
_FUSED_ARCHITECTURES = ("Phi3ForCausalLM",)

Path = tuple  # ("embed",), ("layers", i, "q"), ("layers", i, "experts_up", expert) or
#               ("layers", i, ("q", "k", "v")) for a fused tensor


def canonical_dtype(dtype: Optional[str]) -> str:
    """'auto' or one of DTYPES (accepts torch/jax spellings such as 'bf16', 'torch.float16')."""
    if dtype is None:
        return "auto"
    name = str(getattr(dtype, "name", dtype)).replace("torch.", "").replace("jnp.", "").lower()
    if name == "auto":
        return "auto"
    if name not in _DTYPE_ALIASES:
        raise ValueError(f"dtype must be 'auto' or one of {', '.join(DTYPES)}; got {dtype!r}")
    return _DTYPE_ALIASES[name]


def hf_tensor_map(cfg: ModelConfig) -> dict[str, tuple[Path, bool]]:
    """Every HF tensor name the layout needs for `cfg` -> (params path, transpose)."""
    shapes = param_shapes(cfg)
    out: dict[str, tuple[Path, bool]] = {}
    for name, (key, t) in HF_TOP_TENSORS.items():
        if key in shapes:
            out[name] = ((key,), t)
    module, router, experts = moe_tensor_names(cfg)
    fused = _FUSED_TENSORS if cfg.architecture in _FUSED_ARCHITECTURES else {}
    in_fused = {key for keys in fused.values() for key in keys}
    for i, layer in enumerate(shapes["layers"]):
        for suffix, (key, t) in HF_LAYER_TENSORS.items():
            if key in layer and key not in in_fused:
                out[f"model.layers.{i}.{suffix}"] = (("layers", i, key), t)
        for suffix, keys in fused.items():
            out[f"model.layers.{i}.{suffix}"] = (("layers", i, keys), True)
        if "router" in layer:
            out[f"model.layers.{i}.{module}.{router}.weight"] = (("layers", i, "router"), True)
            for j in range(cfg.num_experts):
                for projection, name in experts.items():
                    out[f"model.layers.{i}.{module}.experts.{j}.{name}.weight"] = (
                        ("layers", i, f"experts_{projection}", j), True)
    return out


def is_ignored_tensor(cfg: ModelConfig, name: str) -> bool:
    if _IGNORED.search(name):
        return True
    # A tied model's checkpoint may still carry lm_head.weight: the embedding is used instead.
    return cfg.tie_word_embeddings and name == "lm_head.weight"


@functools.partial(jax.jit, static_argnames=("transpose", "dtype"))
def _transpose_cast(x: jax.Array, transpose: bool, dtype: str) -> jax.Array:
    if transpose:
        x = x.T
    return x.astype(jnp.dtype(dtype))


def to_numpy(x: Any) -> Any:
    """numpy or jax arrays pass through; torch tensors become numpy (bfloat16 via ml_dtypes, exactly)."""
    if isinstance(x, (np.ndarray, jax.Array)):
        return x
    if type(x).__module__.split(".")[0] == "torch":
        import torch  # only reached when the caller already holds torch tensors

        t = x.detach().cpu()
        if t.dtype == torch.bfloat16:
            import ml_dtypes

            return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()
    return np.asarray(x)


def place(x: Any, *, transpose: bool, dtype: str) -> jax.Array:
    """Put one tensor on the default device as [in, out] (if `transpose`) in `dtype`."""
    x = to_numpy(x)
    if not isinstance(x, jax.Array):
        if not (np.issubdtype(x.dtype, np.floating) or x.dtype.name == "bfloat16"):
            raise TypeError(f"expected a floating-point tensor, got dtype {x.dtype}")
        x = jax.device_put(x)
    if not transpose and x.dtype == jnp.dtype(dtype):
        return x
    return _transpose_cast(x, transpose=transpose, dtype=dtype)


class ParamsBuilder:
    """Collects converted tensors into the layout, checking names and shapes, naming the offender on error."""

    def __init__(self, cfg: ModelConfig, dtype: str, source: str,
                 display_name: Optional[Callable[[str], str]] = None):
        self.cfg = cfg
        self.dtype = dtype
        self.source = source
        self.expected = hf_tensor_map(cfg)
        self.shapes = param_shapes(cfg)
        self.display = display_name or (lambda n: n)
        self.params: dict[str, Any] = {k: None for k in self.shapes if k != "layers"}
        self.params["layers"] = [{} for _ in range(cfg.num_layers)]
        self.done: set[str] = set()
        self.unexpected: list[str] = []
        self._kv_scales: dict[int, dict[str, Any]] = {}  # layer -> take_kv_scale's

    def wants(self, name: str) -> bool:
        name = text_model_name(name)
        if name in self.expected:
            return True
        if not is_ignored_tensor(self.cfg, name):
            self.unexpected.append(name)
        return False

    def target_shape(self, path: Path) -> tuple[int, ...]:
        if isinstance(path[-1], tuple):  # a fused tensor: its parts side by side
            parts = [self.shapes["layers"][path[1]][key] for key in path[-1]]
            return (parts[0][0], sum(p[1] for p in parts))
        node: Any = self.shapes
        for p in path[:3]:
            node = node[p]
        return tuple(node[1:] if len(path) == 4 else node)  # one expert of a stack

    def check_shape(self, name: str, shape: Iterable[int], file: Optional[str] = None) -> None:
        name = text_model_name(name)
        path, transpose = self.expected[name]
        target = self.target_shape(path)
        want = tuple(reversed(target)) if transpose else target
        shape = tuple(int(s) for s in shape)
        if shape != want:
            where = file or self.source
            raise WeightLoadError(
                f"{where}: tensor {self.display(name)!r} has shape {list(shape)}, but the "
                f"{self.cfg.architecture} config expects {list(want)}")

    def _claim(self, name: str, file: Optional[str]) -> tuple[str, Path, bool]:
        """(text-model name, params path, transpose) of HF tensor `name`, which has not been
        added yet (a WeightLoadError naming it otherwise)."""
        name = text_model_name(name)
        if name in self.done:
            raise WeightLoadError(f"{file or self.source}: tensor {self.display(name)!r} appears twice")
        return (name, *self.expected[name])

    def add(self, name: str, tensor: Any, file: Optional[str] = None) -> None:
        name, path, transpose = self._claim(name, file)
        self.check_shape(name, getattr(tensor, "shape", ()), file)
        try:
            value = place(tensor, transpose=transpose, dtype=self.dtype)
        except (TypeError, ValueError) as e:
            raise WeightLoadError(f"{file or self.source}: tensor {self.display(name)!r}: {e}") from e
        if isinstance(path[-1], tuple):  # a fused tensor: its parts side by side, [in, out]
            start = 0
            for key in path[-1]:
                width = self.shapes["layers"][path[1]][key][1]
                self.params["layers"][path[1]][key] = value[:, start:start + width]
                start += width
        elif len(path) == 4:  # one expert: stacked once the layer has them all (finish)
            stack = self.params["layers"][path[1]].setdefault(path[2], [None] * self.cfg.num_experts)
            stack[path[3]] = value
        elif path[0] == "layers":
            self.params["layers"][path[1]][path[2]] = value
        else:
            self.params[path[0]] = value
        self.done.add(name)

    def take_kv_scale(self, name: str, tensor: Any, file: Optional[str] = None) -> bool:
        """Keep `name` if it is a layer's FP8 KV-cache scale (models/llama.attend applies it to an
        FP8 cache only); False for any other tensor. A scale is one number, or one per KV head
        (compressed-tensors' "attn_head" strategy, stored [kv_heads, 1, 1]); one of another size
        (per channel) is left out with a warning. A value that is not positive and finite, or a
        layer the model does not have, is a WeightLoadError naming the tensor."""
        m = _KV_SCALE.match(text_model_name(name))
        if m is None:
            return False
        where = file or self.source
        layer = int(m.group(1))
        value = np.asarray(to_numpy(tensor), np.float32).reshape(-1)
        if value.size not in (1, self.cfg.num_kv_heads):
            logger.warning("%s: tensor %r of shape %s left out: FP8 KV-cache scales are one "
                           "number per layer or one per KV head (%d) here", where,
                           self.display(name), list(value.shape), self.cfg.num_kv_heads)
            return True
        bad = value[~(np.isfinite(value) & (value > 0))]
        if layer >= self.cfg.num_layers or bad.size:
            raise WeightLoadError(f"{where}: tensor {self.display(name)!r} must hold positive "
                                  f"numbers (one, or one per KV head) for one of the model's "
                                  f"{self.cfg.num_layers} layers, got "
                                  f"{float((bad if bad.size else value)[0])}")
        which = m.group(2) or m.group(3)
        for kv, key in zip("kv", KV_CACHE_SCALES):
            if which in (kv, "kv"):
                self._kv_scales.setdefault(layer, {})[key] = value
        return True

    def takes_quantized(self, name: str) -> bool:
        """Whether weight `name` (HF) is one of the linears the int4, int8 and FP8 layouts hold: the
        attention and dense MLP projections (models/quant.QUANTIZED)."""
        path, _ = self.expected[text_model_name(name)]
        fused = isinstance(path[-1], tuple)
        return path[0] == "layers" and len(path) != 4 and (fused or path[2] in QUANTIZED)

    def takes_integer(self, name: str, w: Int4Weight | Int8Weight) -> bool:
        """Whether the integer weight `w` of `name` (HF) keeps its bits: a linear that
        takes_quantized, or one expert of a mixture-of-experts layer (in activation order too:
        _settle_integer_experts)."""
        return self.takes_quantized(name) or self._expert(name)

    def _expert(self, name: str) -> bool:
        path, _ = self.expected[text_model_name(name)]
        return path[0] == "layers" and len(path) == 4

    def _add_integer(self, name: str, w: Int4Weight | Int8Weight, file: Optional[str],
                     tensors: Callable[[slice], dict[str, Any]]) -> None:
        """Integer weight `w` of HF tensor `name` (takes_integer) in its layout: `tensors(rows)`
        gives the layout's tensors by suffix for those rows of it; one expert's go into its
        layer's stacks ([experts, ...] once finish has them all)."""
        name, path, _ = self._claim(name, file)
        if not self.takes_integer(name, w):
            bits = 4 if isinstance(w, Int4Weight) else 8
            raise WeightLoadError(f"{file or self.source}: int{bits} tensor "
                                  f"{self.display(name)!r}: only the attention and MLP "
                                  f"projections and experts load at {bits} bits")
        self.check_shape(name, w.q.shape, file)  # [out, in], as HF
        if len(path) == 4:
            layer = self.params["layers"][path[1]]
            for suffix, value in tensors(slice(None)).items():
                layer.setdefault(path[2] + suffix, [None] * self.cfg.num_experts)[path[3]] = value
        else:
            for layer, key, rows in self._output_rows(path):
                layer.update({key + suffix: v for suffix, v in tensors(rows).items()})
        self.done.add(name)

    def add_int4(self, name: str, w: Int4Weight, file: Optional[str] = None) -> None:
        """A 4-bit weight that takes_integer (`name` is its unpacked weight's HF name,
        "<prefix>.weight") in the int4 layout (models/int4.py): the weight packed, its scale,
        offset and input order."""
        group = w.q.shape[1] // w.scale.shape[1]

        def tensors(rows: slice) -> dict[str, Any]:
            out = {"": jnp.asarray(pack_int4(w.q[rows], group)),
                   "_scale": place(w.scale[rows].T, transpose=False, dtype="float32")}
            if w.offset.dtype == np.uint8:
                out["_zero"] = jnp.asarray(np.ascontiguousarray(w.offset[rows].T))
            else:
                out["_min"] = place(w.offset[rows].T, transpose=False, dtype="float32")
            return out if w.perm is None else {**out, "_perm": jnp.asarray(w.perm)}
        self._add_integer(name, w, file, tensors)

    def add_int8(self, name: str, w: Int8Weight, file: Optional[str] = None) -> None:
        """An 8-bit weight that takes_integer (converters/integer.Int8Weight; `name` its HF name)
        in the int8 layout (models/int8.py): the values as they are, the scales (and mins)
        group-major, the input order."""
        scale, offset = int8_groups(w.scale, w.offset, w.q.shape[1])

        def tensors(rows: slice) -> dict[str, Any]:
            out = {"": jnp.asarray(np.ascontiguousarray(w.q[rows])),
                   "_scale": place(scale[rows].T, transpose=False, dtype="float32")}
            if offset is not None:
                out["_min"] = place(offset[rows].T, transpose=False, dtype="float32")
            return out if w.perm is None else {**out, "_perm": jnp.asarray(w.perm)}
        self._add_integer(name, w, file, tensors)

    def takes_fp8(self, name: str) -> bool:
        """Whether weight `name` (HF) has an FP8 layout (models/quant.py): a linear that
        takes_quantized, or one expert of a mixture-of-experts layer."""
        return self.takes_quantized(name) or self._expert(name)

    def add_fp8(self, name: str, q: np.ndarray, scale: np.ndarray,
                file: Optional[str] = None) -> None:
        """A weight that takes_fp8, kept in its FP8 layout (models/quant.py): float8 `q` [out, in]
        as it is (one expert's transposed into its stack, [experts, in, out]), `scale` float32
        [out]."""
        name, path, _ = self._claim(name, file)
        if len(path) == 4:  # one expert: stacked with its scales once the layer has them all
            layer = self.params["layers"][path[1]]
            for key, value in ((path[2], np.ascontiguousarray(q.T)), (path[2] + "_scale", scale)):
                layer.setdefault(key, [None] * self.cfg.num_experts)[path[3]] = jnp.asarray(value)
            self.done.add(name)
            return
        for layer, key, rows in self._output_rows(path):
            layer[key] = jnp.asarray(np.ascontiguousarray(q[rows]))
            layer[key + "_scale"] = jnp.asarray(scale[rows])
        self.done.add(name)

    def _output_rows(self, path: tuple) -> list[tuple[dict, str, slice]]:
        """(layer params, key, its rows of the HF tensor [out, in]) of each part of the layer
        weight at `path`: a fused tensor's parts are consecutive output rows."""
        layer = self.params["layers"][path[1]]
        parts, start = [], 0
        for key in (path[-1] if isinstance(path[-1], tuple) else (path[2],)):
            rows = slice(start, start + self.shapes["layers"][path[1]][key][1])
            parts.append((layer, key, rows))
            start = rows.stop
        return parts

    def missing(self) -> list[str]:
        return [n for n in self.expected if n not in self.done]

    def finish(self, where: Optional[Callable[[str], str]] = None) -> dict[str, Any]:
        missing = self.missing()
        if missing:
            first = missing[0]
            loc = where(first) if where else self.source
            more = f" (and {len(missing) - 1} more: {', '.join(map(self.display, missing[1:4]))}" \
                   f"{', ...' if len(missing) > 4 else ''})" if len(missing) > 1 else ""
            raise WeightLoadError(f"{loc}: missing tensor {self.display(first)!r}{more}")
        if self.unexpected:
            logger.info("%s: ignored %d tensors the layout does not use (e.g. %s)", self.source,
                        len(self.unexpected), self.unexpected[0])
        if self._kv_scales:  # one tree for every layer
            # Per KV head in every layer if one scale anywhere is (a number repeated is exact).
            per_head = any(v.size > 1 for have in self._kv_scales.values() for v in have.values())
            size = self.cfg.num_kv_heads if per_head else 1
            for i, layer in enumerate(self.params["layers"]):
                have = self._kv_scales.get(i, {})
                # As vLLM: a layer with one of the two uses it for both; one with neither, 1.
                one = next(iter(have.values()), np.ones(1, np.float32))
                layer.update({key: jnp.asarray(np.broadcast_to(have.get(key, one), (size,))
                                               .reshape((size,) if per_head else ()))
                              for key in KV_CACHE_SCALES})
        for i, layer in enumerate(self.params["layers"]):
            self._settle_integer_experts(layer)
            for key, value in layer.items():
                if isinstance(value, list):
                    if any(v is None for v in value) or len({v.dtype for v in value}) > 1:
                        raise WeightLoadError(f"{self.source}: layer {i}'s {key}: the checkpoint "
                                              "holds its experts in more than one format")
                    layer[key] = jnp.stack(value)
                    value.clear()  # each expert's own copy goes now, not with the whole model
        return self.params

    def _settle_integer_experts(self, layer: dict[str, Any]) -> None:
        """Integer experts stacked in one format each: an 8-bit expert without a min (its zero
        point the middle) beside others with one takes a min of zeros; the stacks the layouts
        cannot hold as they came are dequantized whole, into their inputs' own order: one some of
        whose experts kept their bits (takes_integer) where others were dequantized, and gate's
        and up's stacks in two formats or groups (a GGUF's types) or input orders (the
        routed-experts kernel runs the two in one launch, on one input). GPTQ's activation order
        is settled as models/moe.py runs it: gate's and up's one order per expert,
        `experts_gate_perm` [E, H]; down's, `experts_down_perm` [E, I], applied here to gate's and
        up's outputs, so that the SwiGLU comes out in the order down takes its inputs (no gather
        between them, none across devices under tensor parallelism), and kept for new weights
        (models/requant.py). An expert in its inputs' own order takes arange."""
        def kept(key: str) -> list[int]:
            stack = layer.get(key)
            return ([j for j, v in enumerate(stack) if v is not None and v.dtype in INTEGERS]
                    if isinstance(stack, list) else [])

        for key in EXPERTS:
            which, mins = kept(key), layer.get(key + "_min")
            if which and isinstance(mins, list) and layer[key][which[0]].dtype == jnp.int8:
                for j in which:
                    if mins[j] is None:
                        mins[j] = jnp.zeros_like(layer[key + "_scale"][j])

        def form(key: str) -> Any:
            which = kept(key)
            return (layer[key][which[0]].dtype, layer[key + "_scale"][which[0]].shape) if which \
                else None
        orders = {key: layer.pop(key + "_perm", None) for key in EXPERTS}  # per expert, or None
        gate, up, down = EXPERTS
        pair_apart = form(gate) != form(up) or not _same_orders(orders[gate], orders[up])
        for key in EXPERTS:
            stack, which = layer.get(key), kept(key)
            if not which or (len(which) == len(stack) and not (pair_apart and key != down)):
                continue
            companions = [key + s for s in ("_scale", "_zero", "_min") if key + s in layer]
            for j in which:
                deq = int4_dequantize if stack[j].dtype == jnp.uint8 else int8_dequantize
                w = deq(stack[j], *(layer[c][j] for c in companions))  # [out, in], inputs as stored
                if orders[key] is not None and orders[key][j] is not None:
                    w = w[:, np.argsort(np.asarray(orders[key][j]))]
                stack[j] = place(w, transpose=True, dtype=self.dtype)
            for c in companions:
                del layer[c]
            orders[key] = None
        if _any_order(orders[down]):
            for j, perm in enumerate(orders[down]):
                if perm is not None:
                    self._order_outputs(layer, (gate, up), j, np.asarray(perm))
            layer[down + "_perm"] = _filled(orders[down])
        if _any_order(orders[gate]):
            layer[gate + "_perm"] = _filled(orders[gate])

    @staticmethod
    def _order_outputs(layer: dict[str, Any], keys: tuple[str, ...], j: int,
                       perm: np.ndarray) -> None:
        """Expert j of the stacks `keys` with its output channels in the order `perm`: an
        integer expert's rows [out, in'] and its companions' columns [groups, out], a float
        one's columns [in, out]."""
        for key in keys:
            w = layer[key][j]
            if w.dtype in INTEGERS:
                layer[key][j] = w[perm]
                for suffix in ("_scale", "_zero", "_min"):
                    if key + suffix in layer:
                        layer[key + suffix][j] = layer[key + suffix][j][:, perm]
            else:
                layer[key][j] = w[:, perm]


def _any_order(perms: Optional[list]) -> bool:
    return perms is not None and any(p is not None for p in perms)


def _same_orders(a: Optional[list], b: Optional[list]) -> bool:
    """Whether two stacks' experts take their inputs in one order each (None: the inputs' own)."""
    n = len(a if a is not None else b or [])
    return all(one_order([p, q]) for p, q in zip(a or [None] * n, b or [None] * n))


def _filled(perms: list) -> list:
    """A stack's input orders with arange for the experts in their inputs' own order."""
    size = next(p for p in perms if p is not None).shape[0]
    return [jnp.arange(size, dtype=jnp.int32) if p is None else jnp.asarray(p, jnp.int32)
            for p in perms]


def convert_hf_state_dict(cfg: ModelConfig, named_tensors: Any, dtype: str = "auto", *,
                          source: str = "<state dict>") -> dict[str, Any]:
    """Convert an in-memory HF-layout state dict (a mapping or an iterable of (name, tensor) pairs of numpy
    arrays, jax arrays or torch tensors) to the engine's params, on the default device.

    dtype="auto" keeps `cfg.dtype`. Raises WeightLoadError naming the tensor on a missing tensor or a
    shape mismatch; names the layout does not use are ignored.
    """
    dtype = canonical_dtype(dtype)
    if dtype == "auto":
        dtype = cfg.dtype if cfg.dtype in DTYPES else "float32"
    items = named_tensors.items() if hasattr(named_tensors, "items") else named_tensors
    builder = ParamsBuilder(cfg, dtype, source)
    for name, tensor in items:
        if not builder.take_kv_scale(name, tensor) and builder.wants(name):
            builder.add(name, tensor)
    return builder.finish()


# ---------------------------------------------------------------------------------------------------------
# Directories on disk


def weight_files(model_dir: str) -> tuple[list[str], Optional[dict[str, str]]]:
    """The safetensors files of an HF directory and, for a sharded checkpoint, its tensor -> file map."""
    index_path = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(index_path):
        try:
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise WeightLoadError(f"{index_path}: not a valid safetensors index ({e})") from e
        files = []
        for shard in sorted(set(weight_map.values())):
            path = os.path.join(model_dir, shard)
            if not os.path.isfile(path):
                raise WeightLoadError(f"{path}: shard listed in {index_path} does not exist")
            files.append(path)
        return files, {k: os.path.join(model_dir, v) for k, v in weight_map.items()}
    files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    if not files:
        other = [n for n in ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt")
                 if os.path.exists(os.path.join(model_dir, n))]
        hint = (f" (found {other[0]}: convert it to safetensors, e.g. load it with transformers and "
                f"save_pretrained(..., safe_serialization=True))") if other else ""
        raise WeightLoadError(f"{model_dir}: no *.safetensors weight files{hint}")
    return files, None


def read_config_dict(model_dir: str) -> dict[str, Any]:
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise WeightLoadError(f"{path}: missing config.json (an HF model directory needs one)")
    try:
        with open(path) as f:
            d = json.load(f)
    except (OSError, ValueError) as e:
        raise WeightLoadError(f"{path}: cannot read config ({e})") from e
    if not isinstance(d, dict):
        raise WeightLoadError(f"{path}: config is not a JSON object")
    modelopt = os.path.join(model_dir, "hf_quant_config.json")
    if not quantization_config(d) and os.path.isfile(modelopt):
        # ModelOpt's own file, where its exports before config.json's quantization_config put it.
        try:
            with open(modelopt) as f:
                qc = json.load(f)
            d["quantization_config"] = {**qc, "quant_method": "modelopt"}
        except (OSError, ValueError, TypeError) as e:
            raise WeightLoadError(f"{modelopt}: cannot read ModelOpt's quantization config "
                                  f"({e})") from e
    return d


def checkpoint_dtype(config_dict: dict[str, Any], files: list[str]) -> str:
    """The checkpoint's dtype: config.json's (torch_)dtype, else the first floating tensor's."""
    for key in ("torch_dtype", "dtype"):
        v = config_dict.get(key)
        if v:
            try:
                c = canonical_dtype(v)
                if c != "auto":
                    return c
            except ValueError:
                logger.warning("config.json's %s %r is not one of %s: reading the weight files' "
                               "dtype instead", key, v, ", ".join(DTYPES))
    for path in files:
        try:
            with open(path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(min(n, 100_000_000)))
        except (OSError, ValueError) as e:
            logger.warning("%s: could not read the safetensors header for its dtype (%s: %s)",
                           path, type(e).__name__, e)
            continue
        for k, v in header.items():
            if k != "__metadata__" and isinstance(v, dict):
                st = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}.get(v.get("dtype"))
                if st:
                    return st
    logger.warning("no float32/bfloat16/float16 tensor found in %s: loading in float32",
                   ", ".join(files) or "the checkpoint")
    return "float32"


def load_hf_params(model_dir: str, cfg: ModelConfig, dtype: str) -> dict[str, Any]:
    """Stream the safetensors of `model_dir` into the layout (dtype: one of DTYPES, already resolved)."""
    from safetensors import safe_open

    files, weight_map = weight_files(model_dir)
    builder = ParamsBuilder(cfg, dtype, model_dir)
    hf_config = read_config_dict(model_dir)
    fp8, integer = fp8_checkpoint(hf_config), int_checkpoint(hf_config)
    dequantized: list[str] = []  # integer tensors loaded in the model's dtype
    if integer is not None and integer.activations:
        logger.info("%s quantizes activations too: its int%d weights load as they are and the "
                    "activations stay in %s (weight-only)", model_dir, integer.bits, dtype)

    def located(name: str, path: str, names: list[str]) -> Optional[str]:
        """The file holding tensor `name`: this one (`path`, its tensors `names`) or the one the
        index names; None where neither has it."""
        return path if name in names else (weight_map or {}).get(name)

    def companion(name: str, path: str, names: list[str], host: bool = False) -> Any:
        """Tensor `name` (read with its weight: a scale, zeros, group indices) from this file or
        the one the index names, as a numpy array with `host`; None where neither has it."""
        where = located(name, path, names)
        if where is None:
            return None
        if host:
            return read_array(where, name)
        with safe_open(where, framework="flax") as g:
            return g.get_tensor(name)

    def fp8_scale(name: str, names: list[str], path: str) -> Any:
        scale = companion(fp8_scale_name(fp8, name), path, names)
        if scale is None:
            raise WeightLoadError(f"{path}: float8 tensor {name!r} has no "
                                  f"{fp8_scale_name(fp8, name)!r}")
        return scale

    def add_integer(name: str, names: list[str], path: str) -> None:
        prefix, suffix = name.rsplit(".", 1)
        if integer is None or suffix != integer.parts[0]:
            kind = "AWQ or GPTQ" if suffix == "qweight" else "compressed-tensors pack-quantized"
            raise WeightLoadError(f"{path}: tensor {name!r} is a packed integer weight but "
                                  f"config.json has no {kind} quantization_config")
        if not builder.wants(prefix + ".weight"):
            return
        try:  # on the host (numpy): unpacked there, placed once packed
            parts = {part: companion(f"{prefix}.{part}", path, names, host=True)
                     for part in integer.parts}
        except WeightLoadError:
            raise
        except Exception as e:
            raise WeightLoadError(f"{path}: cannot read tensor {name!r} ({e})") from e
        parts = {k: v for k, v in parts.items() if v is not None}
        w = unpack_integer(integer, name, parts, path)
        if builder.takes_integer(prefix + ".weight", w):
            (builder.add_int8 if isinstance(w, Int8Weight) else builder.add_int4)(
                prefix + ".weight", w, path)
            return
        if not dequantized:  # a quantized LM head
            logger.warning("%s: integer weights the int4 and int8 layouts do not hold (the LM "
                           "head; e.g. %s) are dequantized to %s at load, taking that dtype's "
                           "memory", model_dir, name, dtype)
        dequantized.append(name)
        builder.add(prefix + ".weight", dequantize_integer(w), path)

    for path in files:
        try:
            handle = safe_open(path, framework="flax")
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise WeightLoadError(f"{path}: not a valid safetensors file ({e})") from e
        with handle as f:
            try:
                names = list(f.keys())
            except Exception as e:
                raise WeightLoadError(f"{path}: cannot list tensors ({e})") from e
            for name in names:
                if name.endswith(PACKED) or (  # int-quantized: "<prefix>.weight" int8, scaled
                        integer is not None and not integer.packed and name.endswith(".weight")
                        and located(name + "_scale", path, names) is not None):
                    add_integer(name, names, path)
                    continue
                if _KV_SCALE.match(text_model_name(name)):
                    builder.take_kv_scale(name, f.get_tensor(name), path)
                    continue
                if not builder.wants(name):
                    continue
                try:
                    header = f.get_slice(name)
                    shape = header.get_shape()
                except Exception as e:
                    raise WeightLoadError(f"{path}: cannot read tensor {name!r} ({e})") from e
                builder.check_shape(name, shape, path)
                is_fp8 = header.get_dtype() == "F8_E4M3"
                if is_fp8 and fp8 is None:
                    raise WeightLoadError(f"{path}: tensor {name!r} is float8 but config.json has "
                                          "no quantization_config")
                try:
                    tensor = read_array(path, name) if is_fp8 else f.get_tensor(name)
                except Exception as e:
                    raise WeightLoadError(f"{path}: cannot read tensor {name!r} ({e})") from e
                if is_fp8:
                    scale = fp8_scale(name, names, path)
                    kept = (fp8_channel_scales(fp8, name, tensor, scale, path)
                            if builder.takes_fp8(name) else None)
                    if kept is not None:
                        builder.add_fp8(name, tensor, kept, path)
                        continue
                    tensor = dequantize_fp8(fp8, name, tensor, scale, path)
                    if builder.takes_fp8(name):  # block scales: one per output channel
                        q, channel = quantize_fp8(jnp.asarray(tensor).T)
                        builder.add_fp8(name, np.asarray(q), np.asarray(channel), path)
                        continue
                builder.add(name, tensor, path)
                del tensor

    def where(name: str) -> str:
        if weight_map and name in weight_map:
            return weight_map[name]
        return files[0] if len(files) == 1 else model_dir

    return builder.finish(where)
