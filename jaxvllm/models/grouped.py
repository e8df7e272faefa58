"""The choice every grouped-integer linear makes (models/int4.py, models/int8.py): its Pallas GEMM
for decode-sized batches where the engine allows Pallas GEMMs (ModelConfig.pallas_gemms) and the
kernel's tiles fit; XLA's dequantize-then-multiply (the kernel's jnp reference) otherwise. And how
any quantized linear's Pallas GEMM (FP8's one-row GEMM too, models/quant.py) runs over devices.

Under tensor parallelism (the runner traces its steps inside the mesh, worker/sharding.py's
TPShardings.in_mesh) a Pallas call would not be partitioned by GSPMD: its operands would be gathered
whole on every device. There the kernel runs per device under `shard_map` on the weight's shard, as
worker/sharding.py splits it: a column-parallel weight's outputs (x whole on every device, each
device writing its slice of the outputs), a row-parallel one's groups of inputs (x split as they
are, each device's partial sums added by one all-reduce, as XLA's partitioner adds a bf16
row-parallel product's)."""
from __future__ import annotations

from types import ModuleType
from typing import Callable

import jax
from jax.sharding import PartitionSpec as P

TP_AXIS = "tp"  # the tensor-parallel mesh axis (worker/sharding.py)
# The linears split over their inputs under tensor parallelism; the others over their outputs.
ROW_PARALLEL = ("o", "down", "shared_down")


def tp_size() -> int:
    """Devices of the tensor-parallel mesh the step is traced in (1: none)."""
    mesh = jax.sharding.get_abstract_mesh()
    return 1 if mesh.empty or TP_AXIS not in mesh.axis_names else mesh.shape[TP_AXIS]


def grouped_linear(x: jax.Array, gemm: ModuleType, kernel: Callable, reference: Callable,
                   w: jax.Array, scale: jax.Array, *rest, pallas: bool = False,
                   row_parallel: bool = False) -> jax.Array:
    """x [..., in] times the weight w [out, ...] with scale [groups, out] (and `rest`, e.g. the
    offsets, None where absent) through `kernel` (of the Pallas module `gemm`: its MAX_ROWS and
    fits()) where `pallas` allows it (interpreted off the GPU), else `reference`, both called as
    f(x [M, in], w, scale, *rest). `row_parallel`: the weight is split over its inputs under tensor parallelism (else
    over its outputs). Returns [..., out]."""
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    n, groups, tp = w.shape[0], scale.shape[0], tp_size()
    local_n, local_k = (n, k // tp) if row_parallel else (n // tp, k)
    fast = (pallas and x2.shape[0] <= gemm.MAX_ROWS
            and gemm.fits(local_n, local_k, k // groups))
    if not fast:
        return reference(x2, w, scale, *rest).reshape(*lead, n)
    given = [a for a in rest if a is not None]

    def call(x, w, scale, *given):
        it = iter(given)
        return kernel(x, w, scale, *[None if a is None else next(it) for a in rest],
                      interpret=jax.default_backend() != "gpu")

    # scale and offsets [groups, out]: a column-parallel weight's outputs split, a row-parallel
    # one's groups of inputs.
    group_specs = (P(None, TP_AXIS), P(TP_AXIS, None))
    return per_device(call, x2, w, (scale, *given), row_parallel,
                      group_specs).reshape(*lead, n)


def per_device(kernel: Callable, x: jax.Array, w: jax.Array, extras: tuple,
               row_parallel: bool, extra_specs: tuple[P, P]) -> jax.Array:
    """kernel(x [M, in], w [out, in...], *extras) -> [M, out]; under tensor parallelism (tp_size()
    > 1) run per device under shard_map on w's shard: its outputs (x whole) or, `row_parallel`,
    its inputs (x split alike; the partial sums added by one all-reduce). `extra_specs`: the
    extras' PartitionSpecs (column-parallel, row-parallel)."""
    if tp_size() == 1:
        return kernel(x, w, *extras)

    def local(x, w, *extras):
        y = kernel(x, w, *extras)
        return jax.lax.psum(y, TP_AXIS) if row_parallel else y

    split_in, split_out = P(None, TP_AXIS), P(TP_AXIS, None)  # of w [out, in]
    spec = extra_specs[1] if row_parallel else extra_specs[0]
    return jax.shard_map(local, mesh=jax.sharding.get_abstract_mesh(),
                         in_specs=(split_in if row_parallel else P(),
                                   split_in if row_parallel else split_out,
                                   *[spec] * len(extras)),
                         out_specs=P() if row_parallel else P(None, TP_AXIS),
                         check_vma=False)(x, w, *extras)
