"""Projections of one input stored as one weight: a layer's quantized q/k/v and gate/up fused at
load into "q+k+v" and "gate+up" (outputs concatenated, with their scales and offsets), so the layer
runs one GEMM for them, not three and two (models/layers.projections splits its output). At decode
sizes every such GEMM is a launch of its own and the narrow k and v ones are launch-bound
(bench/RESULTS.md, "int4" and "FP8 projections fused"). Quantized weights only: they are stored
[out, in] (models/params.py), where outputs concatenate along the first axis. Not under tensor
parallelism, whose column split of a fused weight would not fall on the projections' bounds.
"""
from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxvllm.models.int4 import INT4, offset_suffix
from jaxvllm.models.int8 import INT8
from jaxvllm.models.quant import FP8, free_replaced

FUSED = (("q", "k", "v"), ("gate", "up"))  # projections of one input (models/layers.projections)


def companion_suffixes(lp: dict, name: str) -> tuple[str, ...]:
    """The suffixes of the tensors stored beside the weight `name` of layer params `lp` (a linear
    or a stack of experts): an FP8 weight's scale, an int4 one's scale and zero points or min, an
    int8 one's scale and min where it has one; () for a weight in the model's dtype."""
    dtype = lp[name].dtype
    if dtype == FP8:
        return ("_scale",)
    if dtype == INT4:
        return "_scale", offset_suffix(lp, name)
    if dtype == INT8:
        return ("_scale", "_min") if name + "_min" in lp else ("_scale",)
    return ()


def _layout(lp: dict, name: str) -> Optional[tuple[Any, int, tuple[str, ...]]]:
    """The quantized linear `name`'s dtype, groups of inputs (FP8: one) and companion suffixes
    (an FP8 scale [out]; an int4 or int8 one's tensors [groups, out] each), or None for a weight
    left in the model's dtype."""
    suffixes = companion_suffixes(lp, name)
    if not suffixes:
        return None
    dtype = lp[name].dtype
    return dtype, 1 if dtype == FP8 else lp[name + "_scale"].shape[0], suffixes


def fuse_projections(params: dict[str, Any], consume: bool = False) -> dict[str, Any]:
    """A new params tree with each layer's quantized (FP8, int4 or int8) q/k/v and gate/up stored
    as one weight each ("q+k+v", "gate+up"). Projections that differ in dtype, group size, offset
    kind or input order stay apart. Under GPTQ's activation order the projections of one input
    share its order (GPTQ orders a linear's inputs by statistics of the input, which q/k/v, and
    gate/up, see alike): fused, they gather their input once. `consume`: each projection's arrays
    are freed once fused (as quant.map_linears's); `params` must not be used afterwards."""
    layers = []
    for lp in params["layers"]:
        lp = dict(lp)
        for names in FUSED:
            if not all(n in lp for n in names):
                continue
            layouts = {_layout(lp, n) for n in names}
            perms = [lp.get(n + "_perm") for n in names]
            if len(layouts) != 1 or None in layouts or not one_order(perms):
                continue
            key = "+".join(names)
            _, _, companions = layouts.pop()
            apart = {n + part: lp.pop(n + part) for part in ("",) + companions for n in names}
            lp[key] = jnp.concatenate([apart[n] for n in names])
            for part in companions:  # outputs are the last axis: [out] or [groups, out]
                lp[key + part] = jnp.concatenate([apart[n + part] for n in names], axis=-1)
            if consume:
                free_replaced(list(apart.values()), [lp[key + p] for p in ("",) + companions])
            if perms[0] is not None:
                lp[key + "_perm"] = perms[0]
                for n in names:
                    del lp[n + "_perm"]
        layers.append(lp)
    return {**params, "layers": layers}


def one_order(perms: list[Optional[jax.Array]]) -> bool:
    """Whether projections with these input orders (None: the inputs' own) take one input alike."""
    if any(p is None for p in perms):
        return all(p is None for p in perms)
    first = np.asarray(perms[0])
    return all(np.array_equal(first, np.asarray(p)) for p in perms[1:])
