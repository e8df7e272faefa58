"""New weights in a running model's integer layouts (a weight swap, LLM.update_weights, on an AWQ,
GPTQ, compressed-tensors or GGUF model): each linear the model holds in int4 (models/int4.py) or
int8 (models/int8.py) is rounded to nearest in the same layout: the same groups of inputs, offset
kind (zero points or a min), input order (GPTQ's activation order) and fused projections ("q+k+v"
from the new q, k and v). Round to nearest with no calibration data, as FP8 models quantize their
new weights (models/quant.py): neither AWQ's scale search nor GPTQ's error feedback. The new weights
arrive in the engine's layout ([in, out], the model's dtype); a linear the model keeps unquantized
takes them as they are.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxvllm.models.int4 import FUSED, INT4, quantize_int4
from jaxvllm.models.int8 import INT8, quantize_int8
from jaxvllm.models.quant import QUANTIZED

# The weights an integer layer can hold: each projection, and the fused ones (int4.fuse_projections).
_WEIGHTS = (*QUANTIZED, *("+".join(names) for names in FUSED))


def _integer_weights(like: dict[str, Any]) -> list[str]:
    """The names of the layer params `like`'s int4 or int8 weights (not their companions)."""
    return [n for n in _WEIGHTS if n in like and like[n].dtype in (INT4, INT8)]


def _host(a: jax.Array) -> np.ndarray:
    """A replicated array's values from this process's own copy (a mesh over several hosts holds
    one on each)."""
    return np.asarray(a.addressable_shards[0].data if a.is_fully_replicated else a)


def quantize_as(w: Any, like: dict[str, Any], name: str) -> dict[str, jax.Array]:
    """w [in, out] as the layer params `like` store their integer weight `name`: the weight and
    its scales and offsets by full name ("q+k+v", "q+k+v_scale", ...), its inputs in the order of
    `like`'s (which stays)."""
    perm = like.get(name + "_perm")
    w = jnp.asarray(w)
    if perm is not None:  # the stored weight's inputs come in the order the layer gathers x in
        w = jnp.take(w, jnp.asarray(_host(perm)), axis=0)
    group = w.shape[0] // like[name + "_scale"].shape[0]
    if like[name].dtype == INT4:
        offset = "zero" if name + "_zero" in like else "min"
        q, scale, off = quantize_int4(w, group, offset)
        out = {name: q, name + "_scale": scale, name + "_" + offset: off}
    else:
        q, scale, mn = quantize_int8(w, group, with_min=name + "_min" in like)
        out = {name: q, name + "_scale": scale, **({} if mn is None else {name + "_min": mn})}
    return out


def quantize_layer_like(new: dict[str, Any], like: dict[str, Any], where: str) -> dict[str, Any]:
    """The layer params `new` (unquantized weights by name, and whatever else the layer holds)
    with every weight `like` holds in an integer layout quantized as `like` holds it (quantize_as),
    a fused one from all of its parts, which `new` must hold together; one `new` holds in that
    layout already (with its scales and offsets) is taken as it is. `where` names the layer in
    errors ("layers.3")."""
    out = dict(new)
    for name in _integer_weights(like):
        parts = name.split("+")
        given = [p for p in parts if p in out]
        if not given or out[given[0]].dtype == like[name].dtype:  # none, or already in the layout
            continue
        if len(given) < len(parts):
            raise ValueError(f"{where}.{given[0]}: the model stores {' and '.join(parts)} as one "
                             f"int4/int8 weight ({where}.{name}): send them together")
        w = jnp.concatenate([jnp.asarray(out.pop(p)) for p in parts], axis=1)
        out.update(quantize_as(w, like, name))
    return out


def quantize_like(params: dict[str, Any], like: dict[str, Any]) -> dict[str, Any]:
    """The engine-layout params tree `params` (unquantized) in the integer layouts of the running
    model's params `like`, layer by layer (quantize_layer_like), with `like`'s input orders."""
    layers = []
    for i, (lp, cur) in enumerate(zip(params["layers"], like["layers"])):
        lp = quantize_layer_like(lp, cur, f"layers.{i}")
        lp.update({k: v for k, v in cur.items() if k.endswith("_perm")})
        layers.append(lp)
    return {**params, "layers": layers}


def quantize_named_like(named: dict[str, Any], like: dict[str, Any]) -> dict[str, Any]:
    """Weights by name ("layers.3.q", ...; a chunk of a streamed update) with those the running
    model `like` holds in an integer layout quantized so, under their stored names
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
                    quantize_layer_like(ws, like["layers"][i], f"layers.{i}").items()})
    return out
