"""New weights in a running quantized model's layouts (a weight swap, LLM.update_weights, on an FP8,
AWQ, GPTQ, compressed-tensors or GGUF model): each linear the model holds quantized is rounded to
nearest in the same layout: FP8 per output channel (and per expert; models/quant.py); int4
(models/int4.py) or int8 (models/int8.py; experts expert by expert) in the same groups of inputs,
offset kind (zero points or a min), input order (GPTQ's activation order, kept as it is) and
fused projections ("q+k+v" from the new q, k and v), with no calibration data: neither AWQ's
scale search nor GPTQ's error feedback. The new weights arrive in the engine's unquantized layout
(models/params.py: [in, out], a float dtype); a linear the model keeps unquantized (an FP8
checkpoint's ignored ones) takes them as they are. A whole tree is checked first, then quantized
and written a layer at a time (layers_like), so a swap holds one layer's quantized copy beside the
model, not a second model (under tensor parallelism that copy is made on the first device before
it is split).
"""
from __future__ import annotations

from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from jaxvllm.models.config import ModelConfig
from jaxvllm.models.fused import FUSED
from jaxvllm.models.int4 import INT4, offset, quantize_experts_int4, quantize_int4
from jaxvllm.models.int8 import INT8, quantize_experts_int8, quantize_int8
from jaxvllm.models.moe import DOWN_ORDER, ORDER
from jaxvllm.models.params import KV_CACHE_SCALES, layer_shapes, param_shapes
from jaxvllm.models.quant import EXPERTS, FP8, QUANTIZED, fp8_weight

# The weights a quantized layer can hold: each projection, the fused ones (fuse_projections) and
# the experts.
_WEIGHTS = (*QUANTIZED, *("+".join(names) for names in FUSED), *EXPERTS)


def _quantized_weights(like: dict[str, Any]) -> list[str]:
    """The names of the layer params `like`'s FP8, int4 or int8 weights (not their companions)."""
    return [n for n in _WEIGHTS if n in like and like[n].dtype in (FP8, INT4, INT8)]


def _host(a: jax.Array) -> np.ndarray:
    """A replicated array's values from this process's own copy (a mesh over several hosts holds
    one on each)."""
    return np.asarray(a.addressable_shards[0].data if a.is_fully_replicated else a)


def quantize_as(w: Any, like: dict[str, Any], name: str) -> dict[str, Any]:
    """w [in, out] ([experts, in, out]) as the layer params `like` store their quantized weight
    `name`: the weight, its scales and offsets by full name ("q+k+v", "q+k+v_scale", ...) and
    `like`'s input order (the stored weight's inputs come in the order the layer gathers x in)."""
    w = jnp.asarray(w)
    if like[name].dtype == FP8:
        return dict(zip((name, name + "_scale"), fp8_weight(w)))
    perm = like.get(name + "_perm")
    if name in EXPERTS:
        w = _in_expert_orders(w, like, name)
    elif perm is not None:
        w = jnp.take(w, jnp.asarray(_host(perm)), axis=0)
    group = w.shape[-2] // like[name + "_scale"].shape[-2]
    if like[name].dtype == INT4:
        off = "_zero" if offset(like, name).dtype == jnp.uint8 else "_min"
        q, scale, o = (quantize_experts_int4 if w.ndim == 3 else quantize_int4)(w, group, off[1:])
        out = {name: q, name + "_scale": scale, name + off: o}
    else:
        q, scale, mn = (quantize_experts_int8 if w.ndim == 3 else quantize_int8)(
            w, group, with_min=name + "_min" in like)
        out = {name: q, name + "_scale": scale, **({} if mn is None else {name + "_min": mn})}
    return out if perm is None else {**out, name + "_perm": perm}


def _in_expert_orders(w: jax.Array, like: dict[str, Any], name: str) -> jax.Array:
    """New experts [E, in, out] in the orders integer experts in activation order are stored in
    (models/moe.py): gate's and up's inputs in ORDER, down's in DOWN_ORDER, and gate's and up's
    outputs too."""
    def along(w: jax.Array, order: str, axis: int) -> jax.Array:
        index = jnp.asarray(_host(like[order]))
        return jnp.take_along_axis(w, jnp.expand_dims(index, 3 - axis), axis=axis)

    down = name == EXPERTS[2]
    if DOWN_ORDER in like:
        w = along(w, DOWN_ORDER, 1 if down else 2)
    if ORDER in like and not down:
        w = along(w, ORDER, 1)
    return w


def _check_part(w: Any, shape: tuple[int, ...], where: str) -> None:
    if not hasattr(w, "dtype") or not jnp.issubdtype(w.dtype, jnp.floating):
        raise TypeError(f"{where}: new weights of a quantized linear come as a float array in "
                        f"the engine's [in, out] layout, got {getattr(w, 'dtype', type(w))}")
    if tuple(w.shape) != tuple(shape):
        raise ValueError(f"{where}: shape {tuple(w.shape)} does not match the model's {shape}")


def _check_leaf(w: Any, shape: tuple[int, ...], dtype: Any, where: str) -> None:
    """An unquantized weight: the model's shape and dtype, as weight_swap.swap_in_place wants."""
    got = (tuple(getattr(w, "shape", ())), getattr(w, "dtype", type(w)))
    if got != (tuple(shape), dtype):
        raise ValueError(f"{where}: shape {got[0]} / dtype {got[1]} do not match the model's "
                         f"{tuple(shape)} / {dtype}")


def quantize_layer_like(new: dict[str, Any], like: dict[str, Any], cfg: ModelConfig,
                        index: int) -> dict[str, Any]:
    """Layer `index`'s params `new` (unquantized weights by name, and whatever else the layer
    holds) with every weight `like` holds quantized in `like`'s layout (quantize_as), a fused one
    from all of its parts, which `new` must hold together; each part checked (a float array of
    the model's shape: ValueError/TypeError naming it)."""
    out = dict(new)
    shapes = layer_shapes(cfg, index)
    for name in _quantized_weights(like):
        parts = name.split("+")
        given = [p for p in parts if p in out]
        if not given:
            continue
        if len(given) < len(parts):
            missing = [p for p in parts if p not in given]
            raise ValueError(f"layers.{index}: the model stores {', '.join(parts)} as one "
                             f"weight ({name!r}): {', '.join(missing)} not given with "
                             f"{', '.join(given)} (a chunked update sends them together)")
        for p in parts:
            _check_part(out[p], shapes[p], f"layers.{index}.{p}")
        w = jnp.concatenate([jnp.asarray(out.pop(p)) for p in parts], axis=1)
        out.update(quantize_as(w, like, name))
    return out


def quantize_named_like(named: dict[str, Any], like: dict[str, Any],
                        cfg: ModelConfig) -> dict[str, Any]:
    """Weights by name ("layers.3.q", ...; a chunk of a streamed update) with those the running
    model `like` holds quantized put in its layout, under their stored names
    ("layers.3.q+k+v", "layers.3.q+k+v_scale", ...)."""
    out: dict[str, Any] = {}
    by_layer: dict[int, dict[str, Any]] = {}
    for full, w in named.items():
        head, _, rest = full.partition(".")
        index, _, name = rest.partition(".")
        if head == "layers" and index.isdigit() and "." not in name and int(index) < len(
                like["layers"]):
            by_layer.setdefault(int(index), {})[name] = w
        else:
            out[full] = w
    for i, ws in by_layer.items():
        out.update({f"layers.{i}.{n}": w for n, w in
                    quantize_layer_like(ws, like["layers"][i], cfg, i).items()})
    return out


def in_layout(params: dict[str, Any], like: dict[str, Any]) -> bool:
    """Whether `params` hold the running model's own layout (its quantized weights, with their
    scales, offsets and input orders): a tree to swap in as it is."""
    layers = params.get("layers")
    return (isinstance(layers, list) and len(layers) == len(like["layers"])
            and all(isinstance(lp, dict) and set(lp) == set(cur)
                    for lp, cur in zip(layers, like["layers"])))


def layers_like(params: dict[str, Any], like: dict[str, Any],
                cfg: ModelConfig) -> Iterator[dict[str, Any]]:
    """The unquantized engine-layout tree `params` as named chunks (weight_swap.get_named's names),
    a layer at a time and then the rest, each layer quantized as quantize_layer_like does. Every
    name, shape and dtype is checked before the first chunk (ValueError/TypeError naming it), so a
    bad tree changes nothing."""
    top = {k: v for k, v in params.items() if k != "layers"}
    shapes = {k: v for k, v in param_shapes(cfg).items() if k != "layers"}
    if set(top) != set(shapes):
        raise ValueError(f"params: keys {sorted(top)} do not match the model's {sorted(shapes)}")
    for k, w in top.items():
        _check_leaf(w, shapes[k], like[k].dtype, k)
    layers = params.get("layers")
    if not isinstance(layers, list) or len(layers) != len(like["layers"]):
        raise ValueError(f"params['layers'] must be a list of the model's {len(like['layers'])} "
                         f"layers")
    for i, (lp, cur) in enumerate(zip(layers, like["layers"])):
        shapes = layer_shapes(cfg, i)
        want = set(shapes) | {k for k in KV_CACHE_SCALES if k in cur}
        if not isinstance(lp, dict) or set(lp) != want:
            got = set(lp) if isinstance(lp, dict) else set()
            raise ValueError(f"layers.{i}: missing {sorted(want - got)}, unexpected "
                             f"{sorted(got - want)}")
        quantized = {p for n in _quantized_weights(cur) for p in n.split("+")}
        for k, w in lp.items():
            if k in quantized:
                _check_part(w, shapes[k], f"layers.{i}.{k}")
            elif k in shapes:
                _check_leaf(w, shapes[k], cur[k].dtype, f"layers.{i}.{k}")
    for i, (lp, cur) in enumerate(zip(layers, like["layers"])):
        yield {f"layers.{i}.{k}": w for k, w in quantize_layer_like(lp, cur, cfg, i).items()}
    yield top
