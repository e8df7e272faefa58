"""Joining the processes of a multi-host engine (`nnodes > 1`) into one JAX runtime.

After `initialize`, `jax.devices()` lists every process's devices (the same list, in the same order,
on every rank), so the tensor-parallel mesh spans hosts and every process runs the same programs
(multi-controller SPMD), and the ranks' own connections (engine/multihost.py) are open. Must run
before the first device use: the backends read the distributed client when they start.
"""
from __future__ import annotations

import logging

from jaxvllm.config import EngineArgs

logger = logging.getLogger(__name__)


def initialize(args: EngineArgs) -> None:
    """`jax.distributed.initialize` for `args` (nothing with one node). A runtime that an embedding
    application (or an earlier engine in this process) already initialized is kept, if it has the
    same shape."""
    if args.nnodes == 1:
        return
    import jax
    if not jax.distributed.is_initialized():
        # CPU devices of different processes need a collectives library to talk at all (jax's
        # default is none); GPUs use NCCL whatever this says.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        # Its preemption service takes over SIGTERM (to sync checkpoints, which an engine has
        # none of): the server's own handler never ran, so SIGTERM no longer stopped it.
        jax.config.update("jax_enable_preemption_service", False)
        logger.info("Joining %d processes as rank %d at %s", args.nnodes, args.node_rank,
                    args.dist_init_addr)
        jax.distributed.initialize(coordinator_address=args.dist_init_addr,
                                   num_processes=args.nnodes, process_id=args.node_rank)
    if (jax.process_count(), jax.process_index()) != (args.nnodes, args.node_rank):
        raise RuntimeError(f"JAX's distributed runtime has {jax.process_count()} processes with "
                           f"this one as rank {jax.process_index()}, but nnodes={args.nnodes} and "
                           f"node_rank={args.node_rank}")
    from jaxvllm.engine.multihost import open_channel
    open_channel(args)  # before the weights load: a rank lost in start-up ends the others at once
