"""Pallas kernels with pure-jnp references of the same signature."""
from pallas_kernels.ragged_paged_attention import (  # noqa: F401
    TILE_TABLE,
    get_tiles,
    max_cache_elements,
    ragged_paged_attention,
    ragged_paged_attention_kernel,
)
from pallas_kernels.fp8_gemm import fp8_matmul  # noqa: F401
from pallas_kernels.int4_gemm import int4_matmul  # noqa: F401
from pallas_kernels.int8_gemm import int8_matmul  # noqa: F401
from pallas_kernels.reference import (  # noqa: F401
    fp8_matmul_reference,
    int4_matmul_reference,
    int8_matmul_reference,
    ragged_paged_attention_reference,
    routed_swiglu_reference,
)
from pallas_kernels.routed_experts import routed_swiglu  # noqa: F401

__all__ = [
    "fp8_matmul",
    "fp8_matmul_reference",
    "int4_matmul",
    "int4_matmul_reference",
    "int8_matmul",
    "int8_matmul_reference",
    "ragged_paged_attention",
    "ragged_paged_attention_kernel",
    "ragged_paged_attention_reference",
    "routed_swiglu",
    "routed_swiglu_reference",
    "TILE_TABLE",
    "get_tiles",
    "max_cache_elements",
]
