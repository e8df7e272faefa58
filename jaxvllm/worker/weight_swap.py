"""Overwriting the model's weights in place between steps (LLM.update_weights)."""
from __future__ import annotations

import functools
from typing import Any, Iterator

import jax


# The old buffer is donated and aliased to the output: the new values land in the engine's own
# memory, so a swap allocates nothing beyond the caller's arrays and compiles once per leaf shape.
_copy_into = jax.jit(lambda old, new: new.astype(old.dtype), donate_argnums=0)


@functools.partial(jax.jit, static_argnames="sharding")
def _reshard(x: jax.Array, sharding: jax.sharding.Sharding) -> jax.Array:
    return jax.lax.with_sharding_constraint(x, sharding)


def _to_layout(x: jax.Array, sharding: jax.sharding.Sharding) -> jax.Array:
    """x laid out as `sharding`: by the devices themselves (one program of collectives per leaf
    shape and pair of layouts) when both span the same devices, as a trainer's mesh and the
    engine's do; jax.device_put, which went through the host for another mesh of the same
    devices, only between different devices."""
    if x.sharding.device_set == sharding.device_set and len(sharding.device_set) > 1:
        return _reshard(x, sharding=sharding)
    return jax.device_put(x, sharding)


def swap_in_place(current: Any, new: Any, donate: bool = True) -> Any:
    """Returns `current` with every leaf overwritten by `new`'s values (same tree, shapes, dtypes).
    donate=False (weights shared with the caller, LLM.from_params): `new`'s arrays are taken as
    they are where already placed like `current`'s (none of `current`'s is overwritten: the
    caller may hold them)."""
    cur_leaves, cur_tree = jax.tree_util.tree_flatten_with_path(current)
    new_leaves, new_tree = jax.tree_util.tree_flatten_with_path(new)
    if cur_tree != new_tree:
        cur_names = {jax.tree_util.keystr(p) for p, _ in cur_leaves}
        new_names = {jax.tree_util.keystr(p) for p, _ in new_leaves}
        missing, extra = sorted(cur_names - new_names)[:5], sorted(new_names - cur_names)[:5]
        raise ValueError(f"params tree does not match the model's: missing {missing}, unexpected {extra}")
    for (path, old), (_, leaf) in zip(cur_leaves, new_leaves):
        name = jax.tree_util.keystr(path)
        if tuple(leaf.shape) != tuple(old.shape):
            raise ValueError(f"params{name}: shape {tuple(leaf.shape)} does not match the model's "
                             f"{tuple(old.shape)}")
        if leaf.dtype != old.dtype:
            raise ValueError(f"params{name}: dtype {leaf.dtype} does not match the model's {old.dtype}")
    out = []
    for (_, old), (_, leaf) in zip(cur_leaves, new_leaves):
        if leaf is old:  # kept as it is (an FP8 cache's scales, an input order): nothing to copy
            out.append(old)
            continue
        if not isinstance(leaf, jax.Array):
            # Host values go where the old ones are, committed to it only if they were: jit's
            # cache keys on it, and committed weights compiled every bucket's step once more.
            leaf = jax.device_put(leaf, old.sharding if old.committed else None)
        elif leaf.sharding != old.sharding:
            leaf = _to_layout(leaf, old.sharding)
        out.append(_copy_into(old, leaf) if donate else leaf)
    return jax.tree_util.tree_unflatten(cur_tree, out)


def weight_chunks(params: Any) -> Iterator[dict[str, Any]]:
    """The engine's params by name ("layers.3.q", ...), a layer per dict, then the rest: what a
    trainer streams to update_weights between start_weight_update() and finish_weight_update()."""
    for i, lp in enumerate(params["layers"]):
        yield {f"layers.{i}.{k}": v for k, v in lp.items()}
    yield {k: v for k, v in params.items() if k != "layers"}


def get_named(params: Any, name: str) -> Any:
    """The leaf `name` of the engine's params ("embed", "layers.3.q", ...: keys joined by dots,
    list indices as numbers); a ValueError naming it when there is none."""
    node: Any = params
    try:
        for part in name.split("."):
            node = node[int(part)] if isinstance(node, list) else node[part]
    except (KeyError, IndexError, ValueError, TypeError):
        node = None
    if not isinstance(node, jax.Array):
        raise ValueError(f"params has no weight {name!r} (names: 'embed', 'final_norm', "
                         f"'layers.<i>.<name>', ...)")
    return node


def set_named(params: Any, name: str, value: Any) -> None:
    *parents, last = name.split(".")
    node: Any = params
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    node[int(last) if isinstance(node, list) else last] = value
