"""Random weights of the layout's shapes, made on the default device (load_format="dummy", for benchmarks).

Matrices (and the embedding) ~ N(0, 0.02^2), norms = 1, biases = 0. Each leaf's key is
fold_in(key(seed), leaf index), so the result depends only on (config, dtype, seed). One small jitted
initializer per distinct (shape, dtype, kind) is compiled; layers reuse them.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from jaxvllm.models.config import ModelConfig
from jaxvllm.models.params import param_shapes

INIT_STD = 0.02


@functools.partial(jax.jit, static_argnames=("shape", "dtype", "kind"))
def _init_leaf(key: jax.Array, shape: tuple[int, ...], dtype: str, kind: str) -> jax.Array:
    dt = jnp.dtype(dtype)
    if kind == "norm":
        return jnp.ones(shape, dt)
    if kind == "bias":
        return jnp.zeros(shape, dt)
    return (INIT_STD * jax.random.normal(key, shape, jnp.float32)).astype(dt)


def _kind(name: str) -> str:
    if name.endswith("norm"):
        return "norm"
    if name.endswith("bias"):
        return "bias"
    return "matrix"


def init_dummy_params(cfg: ModelConfig, dtype: str = "float32", seed: int = 0) -> dict[str, Any]:
    """Seeded random params for `cfg` in `dtype` ("float32" | "bfloat16" | "float16")."""
    base = jax.random.key(seed)
    counter = iter(range(1 << 30))

    def make(name: str, shape: tuple[int, ...]) -> jax.Array:
        key = jax.random.fold_in(base, next(counter))
        return _init_leaf(key, shape=tuple(shape), dtype=dtype, kind=_kind(name))

    shapes = param_shapes(cfg)
    params: dict[str, Any] = {}
    for name, shape in shapes.items():
        if name == "layers":
            params["layers"] = [{k: make(k, s) for k, s in layer.items()} for layer in shape]
        else:
            params[name] = make(name, shape)
    return params
