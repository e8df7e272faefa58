"""Tile lists of the attention launches: per-sequence tile counts -> one row per tile."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def expand_tiles(n_r: jax.Array, n_tiles: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """For tiles 0..n_tiles-1: (sequence, tile index within it, valid).

    Sequence r owns n_r[r] consecutive tiles; within a sequence the last (heaviest, under a
    causal mask) tile comes first. Tiles past sum(n_r) are invalid (sequence clamped to R-1).
    """
    R = n_r.shape[0]
    cum = jnp.cumsum(n_r)
    ti = jnp.arange(n_tiles, dtype=jnp.int32)
    seq = jnp.searchsorted(cum, ti, side="right", method="compare_all").astype(jnp.int32)
    valid = seq < R
    seq_c = jnp.minimum(seq, R - 1)
    j = n_r[seq_c] - 1 - (ti - (cum[seq_c] - n_r[seq_c]))
    return seq_c, j, valid
