"""Turns EngineArgs into a loaded model, a ModelRunner and a SchedulerConfig (start-up policy lives here)."""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Optional

from jaxvllm.config import (COMMAND_BUFFERS_OFF_MIN_BYTES, FP8_CHECKPOINTS,
                            FP8_KV_CACHE_DTYPES, INT_CHECKPOINTS, INTEGER_QUANTIZATIONS,
                            TRITON_GEMM_MAX_TOKENS, EngineArgs)
from jaxvllm.core.scheduler import SchedulerConfig

logger = logging.getLogger(__name__)

# Batch limits left unset (EngineArgs.max_num_seqs, max_num_batched_tokens). Offline on a GPU of
# at least 70 GiB (H100, H200), vLLM V1's: 1024 sequences and 16384 tokens (the 1000-request row
# +16% on one H200). A server there takes 384 and 1024: against 256 and 2048, 8,805 against 7,602
# output tok/s at rate inf (TPOT p50 31.6 against 31.0 ms) and TTFT p50 46.9 against 52.1 ms at
# 16 req/s, one H200, one run; vLLM's 1024 and 8192 gave 8,771 at twice the TPOT (63.7 ms), its
# streams waiting on long prefill steps (bench/RESULTS.md; use_server_defaults, at the server's
# entry points). Elsewhere (smaller GPUs, a CPU) 256 and 2048.
BIG_GPU_BYTES = 70 << 30
BIG_GPU_OFFLINE_LIMITS = (1024, 16384)
BIG_GPU_SERVER_LIMITS = (384, 1024)
DEFAULT_LIMITS = (256, 2048)


_ENGINE_CHOSE_GEMMS = False  # set once configure_jax added the GEMM flag (the user did not set it)
_USER_CHOSE_COMMAND_BUFFERS = False  # the user's XLA_FLAGS set XLA's command buffers
# XLA_FLAGS as configure_jax left them, and the user's before it: a replica process inherits the
# flags its front set, and must still see which of them the user chose.
_SET_XLA_FLAGS, _USER_XLA_FLAGS = "JAXVLLM_SET_XLA_FLAGS", "JAXVLLM_USER_XLA_FLAGS"


def cache_root() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "jaxvllm")


def configure_jax(args: EngineArgs) -> None:
    """Process-wide JAX settings; must run before the first device use to take full effect."""
    # Let the allocator take gpu_memory_utilization of the card (XLA's default pool is 75%).
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", str(args.gpu_memory_utilization))
    # cuBLAS instead of autotuned Triton GEMMs: ~15x faster compiles per bucket (measured:
    # docs/architecture.md); the smallest buckets still get Triton GEMMs, per program
    # (RunnerConfig.triton_gemm_max_tokens). A user's own XLA_FLAGS setting wins everywhere.
    global _ENGINE_CHOSE_GEMMS, _USER_CHOSE_COMMAND_BUFFERS
    flags = os.environ.get("XLA_FLAGS", "")
    if flags and flags == os.environ.get(_SET_XLA_FLAGS):  # set by an engine, here or in the parent
        flags = os.environ.get(_USER_XLA_FLAGS, "")
    user = flags
    if "xla_gpu_enable_triton_gemm" not in user:
        flags += " --xla_gpu_enable_triton_gemm=false"
        _ENGINE_CHOSE_GEMMS = True
    # XLA's dot merger fuses the q/k/v projections by concatenating their weights on every step
    # (a ~50 MB copy per layer at the 8B shape: 1 ms of a 7 ms batch-1 decode step).
    if "xla_disable_hlo_passes" not in user:
        flags += " --xla_disable_hlo_passes=dot-merger"
    _USER_CHOSE_COMMAND_BUFFERS = "xla_gpu_enable_command_buffer" in user
    os.environ["XLA_FLAGS"] = os.environ[_SET_XLA_FLAGS] = flags.strip()
    os.environ[_USER_XLA_FLAGS] = user
    import jax

    from jaxvllm.engine.distributed import initialize
    initialize(args)
    if args.compilation_cache_dir is None and jax.config.jax_compilation_cache_dir:
        return  # the embedding application already chose one
    cache_dir = args.compilation_cache_dir or os.path.join(cache_root(), "jax")
    if cache_dir.lower() != "none":
        jax.config.update("jax_compilation_cache_dir", cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def load(args: EngineArgs) -> Any:
    """Weights and config; the tokenizer is left to `start_tokenizer_load` (the engine overlaps it
    with loading and compiling)."""
    configure_jax(args)
    import contextlib

    import jax
    from converters import load_model
    from jaxvllm.engine.multihost import startup_phase
    startup_phase("loading the weights")
    # Under tensor parallelism the whole model is loaded into host memory and only its shards go to
    # the devices (worker/sharding.py). Loaded on the first device instead, it left that device's
    # allocator fragmented around the replicated leaves (aliased, so kept in place): the KV cache,
    # sized to the devices' free memory, then failed to fit there (measured on 2x H200, 8B shape: an
    # allocator OOM on device 0 only, and the first step hung waiting for it in NCCL).
    # Under data parallelism it is loaded there once and each replica's copy goes to its devices.
    on_host = args.tensor_parallel_size > 1 or args.data_parallel_size > 1
    # This process's own CPU: with several processes, jax.devices("cpu") starts with rank 0's.
    where = (jax.default_device(jax.local_devices(backend="cpu")[0]) if on_host
             else contextlib.nullcontext())
    with where:
        loaded = load_model(args.model, dtype=args.dtype, load_format=args.load_format,
                            seed=args.seed, cache_dir=_weights_cache_dir(args),
                            tokenizer=args.tokenizer, load_tokenizer=False,
                            keep_gguf_quantized=args.quantization == "gguf")
        args.quantization = _checkpoint_quantization(args.quantization, loaded)
        # Each transformation frees the weights it replaces as it goes: loading peaks at the
        # model plus one weight's copy, and leaves fewer holes in device memory.
        if args.quantization == "fp8" and not _fp8_checkpoint(loaded):  # one's linears load as stored
            from jaxvllm.models.quant import quantize_params
            loaded.params = quantize_params(loaded.params, args.quantization, consume=True)
        elif args.quantization in INTEGER_QUANTIZATIONS:
            from jaxvllm.models import int4
            if loaded.load_format == "dummy":  # awq, gptq measured without a checkpoint
                loaded.params = int4.quantize_params(loaded.params, consume=True)
        if args.quantization is not None and args.tensor_parallel_size == 1:
            from jaxvllm.models.fused import fuse_projections
            loaded.params = fuse_projections(loaded.params, consume=True)
    return loaded


def _fp8_checkpoint(loaded: Any) -> bool:
    """Whether the loaded weights are an FP8 checkpoint's (its linears in FP8 as stored)."""
    from converters.fp8 import fp8_checkpoint
    return loaded.load_format == "safetensors" and fp8_checkpoint(loaded.hf_config) is not None


def _checkpoint_quantization(asked: Optional[str], loaded: Any) -> Optional[str]:
    """The quantization the loaded checkpoint's own config implies, as vLLM takes it: an FP8
    checkpoint turns "fp8" on (and runs as "fp8" when asked for by its own method's name:
    "compressed-tensors", "modelopt", "fbgemm_fp8"), an integer one (4 or 8 bits) is its method;
    asking for a checkpoint method of a checkpoint that is not one, or for another method than an
    integer checkpoint's, is a ValueError."""
    from converters.integer import int_checkpoint
    from converters.quant_config import quantization_config
    hf = loaded.hf_config if loaded.load_format == "safetensors" else {}
    integer = int_checkpoint(hf)
    if integer is not None:
        if asked not in (None, integer.method):
            raise ValueError(f"quantization={asked!r}, but {loaded.source} is an "
                             f"int{integer.bits} checkpoint of quantization={integer.method!r}")
        return integer.method
    fp8 = _fp8_checkpoint(loaded)
    if fp8 and asked == quantization_config(hf).get("quant_method"):
        asked = None  # its float8 weights are the FP8 path's
    if asked in FP8_CHECKPOINTS:
        raise ValueError(f"quantization={asked!r} loads the FP8 weights of {asked} checkpoints; "
                         f"{loaded.source} ({loaded.load_format}) is not one")
    if asked in INT_CHECKPOINTS and loaded.load_format != "dummy":  # dummy weights: quantized in load()
        what = ("a compressed-tensors checkpoint (int pack-quantized or FP8 float-quantized)"
                if asked == "compressed-tensors" else f"the integer weights of {asked.upper()} "
                "checkpoints")
        raise ValueError(f"quantization={asked!r} loads {what}; {loaded.source} "
                         f"({loaded.load_format}) is not one")
    if asked is None and fp8:
        logger.info("%s is an FP8 checkpoint: quantization='fp8'", loaded.source)
        return "fp8"
    return asked


def _checkpoint_kv_cache_dtype(asked: str, loaded: Any) -> str:
    """The KV cache's dtype, as vLLM takes it: "auto" is "fp8" where the checkpoint's config asks
    for an FP8 cache (converters/quant_config.asks_fp8_kv_cache), the model's dtype otherwise; a
    dtype named must be the model's (a ValueError naming both otherwise)."""
    from converters.quant_config import asks_fp8_kv_cache
    if asked == "auto":
        if loaded.load_format == "safetensors" and asks_fp8_kv_cache(loaded.hf_config):
            logger.info("%s asks for an FP8 KV cache: kv_cache_dtype='fp8' (pass the model's "
                        "dtype to keep the cache in it)", loaded.source)
            return "fp8"
        return asked
    if asked not in FP8_KV_CACHE_DTYPES and asked != loaded.config.dtype:
        raise ValueError(f"kv_cache_dtype={asked!r}: the cache is in the model's dtype "
                         f"({loaded.config.dtype}) or in FP8 ('fp8')")
    return asked


def start_tokenizer_load(args: EngineArgs) -> Any:
    """The tokenizer, from the tokenizer cache beside the converted weights or loading in a child
    process from now on (`.result()` waits for it)."""
    from converters.tokenizer_child import PendingTokenizer
    weights = _weights_cache_dir(args)
    return PendingTokenizer(args.model, tokenizer=args.tokenizer, load_format=args.load_format,
                            cache_dir=None if weights is None else os.path.join(weights, "tokenizers"))


def _weights_cache_dir(args: EngineArgs) -> Optional[str]:
    cache_dir = args.weights_cache_dir or os.path.join(cache_root(), "weights")
    return None if cache_dir.lower() == "none" else cache_dir


def _batch_invariant(cfg: Any) -> tuple[Any, Any]:
    """The model config and attention of batch-invariant mode: GEMMs whose rows do not depend on
    the batch (models/layers.matmul) and the attention's invariant form (one launch of fixed tiles
    on a GPU, the reference's fixed chunks elsewhere: pallas_kernels.ragged_paged_attention)."""
    import functools
    from pallas_kernels import ragged_paged_attention
    if cfg.num_experts:
        raise ValueError("batch_invariant is not supported for mixture-of-experts models yet")
    return (dataclasses.replace(cfg, batch_invariant=True),
            functools.partial(ragged_paged_attention, invariant=True))


def device_memory_bytes(device: Any) -> Optional[int]:
    """A GPU's memory: the allocator's limit over the fraction of the card it may take
    (configure_jax sets that fraction); None off a GPU or when the device does not say."""
    if device.platform != "gpu":
        return None
    stats = device.memory_stats() or {}
    if "bytes_limit" not in stats:
        return None
    return int(stats["bytes_limit"] / float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", 0.75)))


def resolve_batch_limits(args: EngineArgs, device_bytes: Optional[int],
                         server: bool = False) -> None:
    """Fills in max_num_seqs and max_num_batched_tokens where `args` leaves them unset (None),
    for an offline engine or (`server`) a server's. `device_bytes`: the memory of one of the
    engine's GPUs (None: not a GPU)."""
    big = device_bytes is not None and device_bytes >= BIG_GPU_BYTES
    seqs, tokens = ((BIG_GPU_SERVER_LIMITS if server else BIG_GPU_OFFLINE_LIMITS) if big
                    else DEFAULT_LIMITS)
    if args.max_num_seqs is None:  # within a budget given alone
        args.max_num_seqs = min(seqs, args.max_num_batched_tokens or seqs)
    if args.max_num_batched_tokens is None:
        args.max_num_batched_tokens = max(tokens, args.max_num_seqs)


def use_server_defaults(args: EngineArgs) -> None:
    """A server's settings where `args` leaves them unset, filled in before its engine starts:
    batch limits 384 and 1024 on a GPU of >= 70 GiB, else 256 and 2048 (see above), so the
    engine's own resolution finds them set; and on a GPU of one host the engine in a process of
    its own (engine_process: +9% output tok/s and ITL p50 23 against 31 ms at rate inf on one
    H200, bench/RESULTS.md; on a CPU the engine's device work shares the host's cores with the
    server anyway). The devices are probed only for what is unset, and not with several hosts:
    each would probe its own, and all must take the same limits (256 and 2048, as before)."""
    limits_unset = args.max_num_seqs is None or args.max_num_batched_tokens is None
    one_engine = args.nnodes == 1 and args.data_parallel_size == 1
    backend, device_bytes = None, None
    if args.nnodes == 1 and (limits_unset or (args.engine_process is None and one_engine)):
        from jaxvllm.engine.dp_replica import probe_devices
        backend, _, device_bytes = probe_devices()
    resolve_batch_limits(args, device_bytes, server=True)
    if args.engine_process is None:
        args.engine_process = one_engine and backend == "gpu"


def step_command_buffers(args: EngineArgs, params: Any) -> bool:
    """Whether the steps compile with XLA's command buffers (CUDA graphs). They are updated when a
    step is launched: a step launched while the one before runs hides that, one launched onto an
    idle device (speculative verification, no async scheduling) waits for it. Without them the
    kernels are launched one by one, which bounds a step of a small model: so they are off for
    such an engine whose weights take long enough to read (config.COMMAND_BUFFERS_OFF_MIN_BYTES,
    measured); the user's XLA_FLAGS win."""
    if _USER_CHOSE_COMMAND_BUFFERS or (args.speculative_config is None and args.async_scheduling):
        return True
    return param_bytes(params) / args.tensor_parallel_size < COMMAND_BUFFERS_OFF_MIN_BYTES


def param_bytes(params: Any) -> int:
    """Bytes of a weight tree's arrays (all devices' shares together)."""
    import jax
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params)
                   if hasattr(x, "dtype")))


def pallas_gemms_fit() -> bool:
    """Whether quantized linears may run their Pallas GEMMs (ModelConfig.pallas_gemms): on GPUs,
    under tensor parallelism per device (models/grouped.per_device)."""
    import jax
    return jax.default_backend() == "gpu"


def one_row_bucket(args: EngineArgs, params: Any) -> bool:
    """Whether the engine compiles a bucket of one token below the default ones, so that one
    decoding request runs without padded rows: where a quantized linear reads its weight faster
    at one row than at the smallest default bucket's eight, on its Pallas GEMM (pallas_gemms_fit).
    FP8's one-row Pallas GEMM runs only there; the int4 GEMM's split-K partial sums are eight
    times smaller there (batch 1 339-342 against 318-319 decode tok/s, H200, 8B shape;
    bench/RESULTS.md, "Issue 23's rows in one run, and int4 at one row"), for any int4 weight in
    `params` (a GGUF's kept types; its other types load dequantized), and the int8 GEMM's alike
    (split as the int4's)."""
    from jaxvllm.models.int4 import INT4
    from jaxvllm.models.int8 import INT8
    grouped = any(w.dtype in (INT4, INT8) for lp in params["layers"] for w in lp.values())
    return pallas_gemms_fit() and (args.quantization == "fp8" or grouped)


def build_runner(args: EngineArgs, loaded: Any,
                 devices: Optional[list[Any]] = None) -> tuple[Any, int, SchedulerConfig]:
    """`devices`: a data-parallel replica's device group (None: the first devices); the params are
    placed there."""
    import jax
    import jax.numpy as jnp
    from jaxvllm.engine.multihost import startup_phase
    from jaxvllm.worker.model_runner import ModelRunner, RunnerConfig

    startup_phase("placing the weights and sizing the KV cache")
    cfg = loaded.config
    args.kv_cache_dtype = _checkpoint_kv_cache_dtype(args.kv_cache_dtype, loaded)
    max_model_len = args.max_model_len or cfg.max_position_embeddings
    if max_model_len > cfg.max_position_embeddings and not cfg.rope_scaling:
        raise ValueError(f"max_model_len ({max_model_len}) exceeds the model's "
                         f"max_position_embeddings ({cfg.max_position_embeddings})")
    resolve_batch_limits(args, device_memory_bytes((devices or jax.devices())[0]))
    max_num_seqs, budget = args.max_num_seqs, args.max_num_batched_tokens
    if budget < max_num_seqs:
        raise ValueError(f"max_num_batched_tokens ({budget}) must be >= max_num_seqs ({max_num_seqs})")
    params_dtype = jnp.asarray(loaded.params["final_norm"]).dtype
    shardings = device = None
    if args.tensor_parallel_size > 1:
        from jaxvllm.worker.sharding import shard_model
        loaded.params, shardings = shard_model(loaded.params, cfg, args.tensor_parallel_size, devices)
        cfg = shardings.model_config  # KV heads replicated when fewer than tensor_parallel_size
    elif devices is not None:
        device = devices[0]
        loaded.params = jax.device_put(loaded.params, device)
    runner_config = RunnerConfig(
        block_size=args.block_size, max_model_len=max_model_len, max_num_seqs=max_num_seqs,
        max_num_batched_tokens=budget, num_blocks=args.num_gpu_blocks_override,
        gpu_memory_utilization=args.gpu_memory_utilization,
        kv_dtype=jnp.float8_e4m3fn if args.kv_cache_dtype in FP8_KV_CACHE_DTYPES else params_dtype,
        token_buckets=args.token_buckets,
        one_row_bucket=one_row_bucket(args, loaded.params),
        seed=args.seed, max_logprobs=args.max_logprobs,
        logprobs_mode=args.logprobs_mode,
        max_loras=args.max_loras if args.enable_lora else 0, max_lora_rank=args.max_lora_rank,
        step_timeout=args.step_timeout,
        speculative=args.speculative, compile_at_start=args.compiles_at_start(),
        command_buffers=step_command_buffers(args, loaded.params),
        triton_gemm_max_tokens=(TRITON_GEMM_MAX_TOKENS if _ENGINE_CHOSE_GEMMS
                                and not args.batch_invariant else 0))
    if pallas_gemms_fit():
        cfg = dataclasses.replace(cfg, pallas_gemms=True)
    attention_fn = None
    if args.batch_invariant:
        cfg, attention_fn = _batch_invariant(cfg)
    shares = loaded.load_format == "params"
    if shardings is None and device is None and not shares:
        # The runner committed to the device the weights are on (as a data-parallel replica is to
        # its own), the weights with it (no copy): sleep mode then offloads them to pinned host
        # memory and back as committed arrays (runner._offload), the same placement for jit.
        device = next(iter(jax.tree.leaves(loaded.params)[0].devices()))
        loaded.params = jax.device_put(loaded.params, device)
    runner = ModelRunner(cfg, loaded.params, runner_config, attention_fn=attention_fn,
                         shardings=shardings, device=device,
                         draft=_load_draft(args, cfg, params_dtype, max_model_len, device,
                                           shardings))
    runner.shares_params = shares
    # As vLLM: refuse a cache that cannot hold one sequence of max_model_len, rather than start and
    # then reject every long request. The last token is never fed back, and block 0 is reserved.
    need = -(-(max_model_len - 1) // args.block_size)
    if need > runner.num_blocks - 1:
        raise ValueError(
            f"max_model_len ({max_model_len}) needs {need} KV-cache blocks of {args.block_size} "
            f"tokens, but the cache has only {runner.num_blocks - 1}: lower max_model_len or give the "
            f"cache more room (gpu_memory_utilization, num_gpu_blocks_override)")
    sched = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget,
                            max_model_len=max_model_len, num_blocks=runner.num_blocks,
                            block_size=args.block_size,
                            enable_prefix_caching=args.enable_prefix_caching,
                            policy=args.scheduling_policy,
                            max_loras=args.max_loras if args.enable_lora else 0,
                            num_lookahead_tokens=(args.speculative.num_lookahead_tokens
                                                  if args.speculative else 0))
    return runner, max_model_len, sched


def _load_draft(args: EngineArgs, target: Any, dtype: Any, max_model_len: int,
                device: Any, shardings: Any = None) -> Optional[tuple[Any, Any]]:
    """The draft model of speculative decoding's "draft_model" method, (config, params) on
    `device`, or under tensor parallelism split over the target's mesh as the target is (its KV
    heads then split like the target's, so the runner's per-device attention and cache layout
    serve both), in the target's dtype and, for dummy target weights, dummy too; None without
    one. Each data-parallel replica loads its own (a draft is small)."""
    spec = args.speculative
    if spec is None or spec.method != "draft_model":
        return None
    import jax
    from converters import load_model
    from jaxvllm.worker.drafter import check_draft_config
    draft = load_model(spec.model, dtype=jax.numpy.dtype(dtype).name,
                       load_format="dummy" if args.load_format == "dummy" else "auto",
                       seed=args.seed, cache_dir=_weights_cache_dir(args),
                       load_tokenizer=False)
    check_draft_config(draft.config, target)
    if draft.config.max_position_embeddings < max_model_len:
        logger.warning("The draft model %s was trained for %d positions, fewer than max_model_len "
                       "%d: its guesses for longer requests may be poor (the output is unchanged)",
                       spec.model, draft.config.max_position_embeddings, max_model_len)
    if shardings is not None:
        from jaxvllm.worker.sharding import shard_model
        try:
            params, split = shard_model(draft.params, draft.config, shardings.tp,
                                        list(shardings.mesh.devices.flat))
        except ValueError as e:
            raise ValueError(f"speculative_config model {spec.model!r} (the draft): {e}") from e
        return split.model_config, params  # its KV heads replicated when fewer than the devices
    params = draft.params if device is None else jax.device_put(draft.params, device)
    return draft.config, params
