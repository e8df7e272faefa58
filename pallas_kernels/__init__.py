"""Pallas kernels with pure-jnp references of the same signature."""
from pallas_kernels.ragged_paged_attention import (  # noqa: F401
    TILE_TABLE,
    get_tiles,
    ragged_paged_attention,
    ragged_paged_attention_kernel,
)
from pallas_kernels.reference import ragged_paged_attention_reference  # noqa: F401

__all__ = [
    "ragged_paged_attention",
    "ragged_paged_attention_kernel",
    "ragged_paged_attention_reference",
    "TILE_TABLE",
    "get_tiles",
]
