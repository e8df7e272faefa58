"""ModelRunner: SchedulerOutput -> padded ragged batch -> one jitted model step + one jitted sampler
call -> ModelRunnerOutput.

Shapes come from a bucket ladder of token counts T (the request bucket is R = min(T, max_num_seqs)),
so a handful of executables covers every batch. The KV cache is donated to the step and updated in
place. Only sampled ids (and logprobs when asked) come back to the host.
"""
from __future__ import annotations

import functools
import logging
import os
import re
import sys
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from jaxvllm.core.outputs import ModelRunnerOutput, SchedulerOutput
from jaxvllm.models import llama
from jaxvllm.models.config import ModelConfig
from jaxvllm.models.params import KV_CACHE_SCALES
from jaxvllm.models.registry import get_model_module
from jaxvllm.models.layers import INVARIANT_COMPILER_OPTIONS
from jaxvllm.outputs import Logprob
from jaxvllm.sampling_params import MAX_LOGIT_BIAS
from jaxvllm.spec_decode import SpeculativeConfig
from jaxvllm.structured_output import new_bitmask
from jaxvllm.worker import compile_watch, executables
from jaxvllm.worker.drafter import Drafter
from jaxvllm.worker.serial_thread import SerialThread
from jaxvllm.worker.weight_swap import get_named, set_named, swap_in_place
from jaxvllm.worker import sampler as sampler_lib
from jaxvllm.worker.input_batch import (PAD_SLOT, InputBatch, SamplingInputs, StepBatch,
                                        default_token_buckets)
from jaxvllm.worker import token_table
from jaxvllm.worker.lora_slots import LoRASlots
from jaxvllm.worker.token_table import TokenTable
from jaxvllm.models.moe import experts_swiglu
from pallas_kernels import max_cache_elements, ragged_paged_attention

logger = logging.getLogger(__name__)

# The sampler's static variants, (mode, topk_bound): all are compiled at start-up, for every
# request bucket, so that no request compiles anything while serving.
SAMPLER_VARIANTS = (("greedy", 0), ("random", 0), ("random_sort", 0)) + tuple(
    ("random_sort", b) for b in sampler_lib.TOPK_BOUNDS)

# Without a device memory query (CPU), the KV cache gets this many bytes unless overridden.
CPU_KV_CACHE_BYTES = 512 << 20
SCORE_ROWS_MIN = 256
PEER_CHECK_INTERVAL_S = 0.5  # multi-host: how often a waited-for step checks that the peers live
LAUNCH_SWITCH_INTERVAL_S = 2e-4  # the GIL switch interval while a runner lives (see __init__)


@dataclass
class RunnerConfig:
    block_size: int
    max_model_len: int
    max_num_seqs: int
    max_num_batched_tokens: int
    num_blocks: Optional[int] = None          # None: size from device memory
    gpu_memory_utilization: float = 0.9
    kv_dtype: Any = jnp.bfloat16
    token_buckets: Optional[tuple[int, ...]] = None
    one_row_bucket: bool = False              # a bucket of one token below the default ones
    seed: int = 0
    max_logprobs: int = 20                    # the top-k width of every logprobs program
    compile_at_start: bool = False            # warmup() follows: start what it builds early
    logprobs_mode: str = "raw_logprobs"       # config.LOGPROBS_MODES
    # Buckets of at most this many tokens compile with XLA's autotuned Triton GEMMs instead of
    # cuBLAS: on these GEMV-like decode shapes they were faster on the H100 at the 8B shape (step
    # 6.40 -> 6.14 ms at 8 tokens, 6.52 -> 6.38 ms at 16; slower from 32 up), for ~7 s more cold
    # compile each. 0: cuBLAS everywhere.
    triton_gemm_max_tokens: int = 0
    step_timeout: float = 300.0               # tensor parallel: seconds a step may take (StepTimeoutError)
    max_loras: int = 0                        # LoRA adapter slots (0: LoRA off)
    max_lora_rank: int = 0
    speculative: Optional[SpeculativeConfig] = None  # speculative decoding (None: off)
    command_buffers: bool = True              # steps with XLA's command buffers (setup.step_command_buffers)


class StepTimeoutError(RuntimeError):
    """A tensor-parallel step did not finish within RunnerConfig.step_timeout: a device is stuck
    (e.g. a collective waiting for a peer that failed). The devices cannot be recovered in-process."""


class ModelRunner:
    def __init__(self, cfg: ModelConfig, params: Any, config: RunnerConfig,
                 attention_fn: Optional[Callable[..., jax.Array]] = None,
                 shardings: Optional[Any] = None, device: Optional[Any] = None,
                 draft: Optional[tuple[ModelConfig, Any]] = None) -> None:
        """`device`: where a runner without `shardings` keeps what it creates (a data-parallel
        replica's device; None: JAX's default device). `params` must already be there, and so
        must `draft`'s, the draft model's (config, params) of speculative decoding's
        "draft_model" method."""
        self.cfg = cfg
        self.model = get_model_module(cfg.architecture)  # forward, compute_logits
        self.params = params
        # The caller's arrays (LLM.from_params): weight updates replace them, never write into them.
        self.shares_params = False
        self.config = config
        self.shardings = shardings
        self.device = device
        # The cache is committed to the replica's device (or mesh), so every step runs there.
        self._kv_sharding = (shardings.kv_cache if shardings is not None else
                             None if device is None else jax.sharding.SingleDeviceSharding(device))
        self.attention_fn = attention_fn or ragged_paged_attention
        self.experts_fn = experts_swiglu
        if shardings is not None:  # tensor parallel: attention and experts run per device
            self.attention_fn = shardings.attention_fn(self.attention_fn)
            self.experts_fn = shardings.experts_fn(self.experts_fn)
        buckets = config.token_buckets or default_token_buckets(config.max_num_batched_tokens)
        if config.one_row_bucket and not config.token_buckets:
            buckets = (1, *buckets)  # one decoding request without padded rows (setup.py)
        if buckets[-1] < config.max_num_batched_tokens:
            raise ValueError(f"token_buckets must reach max_num_batched_tokens "
                             f"({config.max_num_batched_tokens}), largest is {buckets[-1]}")
        self.token_buckets = tuple(buckets)
        self.max_blocks_per_seq = -(-config.max_model_len // config.block_size)
        # Allocated before the KV cache is sized, which so leaves room for it.
        self.token_table = TokenTable(config.max_num_seqs, cfg.vocab_size,
                                      shardings.replicated if shardings is not None
                                      else self._kv_sharding)
        self.input_batch = InputBatch(config.block_size, self.max_blocks_per_seq,
                                      self.token_buckets,
                                      config.max_num_seqs, config.seed, self.token_table,
                                      config.speculative.num_speculative_tokens
                                      if config.speculative else 0)
        # Sampled ids are padded to this many rows, one shape for the next step's gather.
        self.sample_rows = self.input_batch.logits_rows(self.token_buckets[-1])
        self.drafter = None if draft is None else Drafter(
            *draft, config.speculative.num_speculative_tokens, cfg.vocab_size,
            config.max_model_len, config.block_size, self.attention_fn, self.experts_fn)
        self.lora = (LoRASlots(cfg, config.max_loras, config.max_lora_rank,
                               jnp.asarray(params["final_norm"]).dtype, device, shardings)
                     if config.max_loras else None)
        # Batch-invariant: bf16 values rounded where the program says, whatever XLA fuses.
        invariant = dict(INVARIANT_COMPILER_OPTIONS) if cfg.batch_invariant else {}
        self.step_compiler_options = {**invariant, **(
            {} if config.command_buffers else {"xla_gpu_enable_command_buffer": ""})}
        step_kw = dict(donate_argnums=(1,),
                       **({} if shardings is None else shardings.step_jit_kwargs()))
        # Traced inside the mesh under tensor parallelism: a quantized linear's Pallas GEMM runs
        # per device there (models/grouped.py).
        in_mesh = (lambda fn: fn) if shardings is None else shardings.in_mesh
        step = in_mesh(self._step_impl)
        self._step = jax.jit(step, **step_kw, compiler_options=self.step_compiler_options or None)
        self._step_triton_gemm = jax.jit(step, **step_kw, compiler_options={
            **self.step_compiler_options, "xla_gpu_enable_triton_gemm": True})
        self._bucket_by_packed_len = {self._packed_len(t): t for t in self.token_buckets}
        self._sample = jax.jit(self._sample_impl, static_argnames=("mode", "topk_bound"))
        # Logprobs: a program of its own, run only for batches with a row that asks for them (one
        # top-k width for every k, each request's k sliced on the host; a width per k would be a
        # variant per k).
        self._token_logprobs = jax.jit(self._token_logprobs_impl)
        # Token bits (penalties, min_tokens masking) are programs of their own, run only for
        # batches with a row that has them: inside the sampler they cost every batch ~0.1 ms at 64
        # rows on an H200, and as a static sampler switch they would double its variants.
        self._apply_token_bits = jax.jit(self._apply_token_bits_impl)
        # Structured outputs' grammar masks and logit_bias: likewise only for batches with such
        # a row.
        self._apply_token_bitmask = jax.jit(sampler_lib.apply_token_bitmask)
        self._apply_logit_bias = jax.jit(sampler_lib.apply_logit_bias)
        self._record_tokens = jax.jit(token_table.record, donate_argnums=(0,))
        # Under tensor parallelism the draft's cache stays split over its KV heads, as the target's
        # (the donated buffers updated in place), and its guesses come back whole.
        self._propose = jax.jit(in_mesh(self._propose_impl), donate_argnums=(1,), **(
            {} if shardings is None else
            {"out_shardings": (shardings.kv_cache, shardings.replicated)}))
        self._prompt_logprobs = jax.jit(self._prompt_logprobs_impl, static_argnames=("num_logprobs",),
                                        compiler_options=invariant or None)
        # Rows per prompt-scoring call: each call reads the whole LM head (1 GiB at the 8B shape),
        # so not fewer than SCORE_ROWS_MIN even when max_num_seqs is small.
        self.score_rows = max(config.max_num_seqs, SCORE_ROWS_MIN)
        self._prev_sampled = jax.device_put(np.zeros(self.sample_rows, np.int32),
                                            device if shardings is None else shardings.replicated)
        # Under tensor parallelism a stuck collective would block a plain device->host copy forever;
        # the copy runs on this thread instead, waited for with a deadline.
        self._waiter = None if shardings is None else SerialThread("jaxvllm-step-wait")
        # Enqueueing a step holds its caller (2.6 ms under TP 2 at the 8B shape): on a thread of
        # its own it overlaps the engine's host work (docs/architecture.md, Async scheduling).
        self._launcher = SerialThread("jaxvllm-launch")
        # At the default 5 ms, each of that thread's GIL handovers could wait that long behind the
        # engine's Python (TP 2: 5.35 ms per step at 5 ms, 4.18 at 0.2 ms; bench/RESULTS.md).
        sys.setswitchinterval(min(sys.getswitchinterval(), LAUNCH_SWITCH_INTERVAL_S))
        # Multi-host: raises when another process is gone (engine/multihost.py), checked while a
        # step is waited for, so a collective left waiting for a dead peer fails within a second.
        self.peer_check: Optional[Callable[[], None]] = None
        self._compile_mark: Optional[int] = None  # set by warmup(): lowerings from then on are news
        # Programs built at warm-up, by name (`_run`); without a warm-up each call is jit's.
        self._executables: dict[str, Any] = {}
        # Warm-up's (lower, compile, store) seconds per program built (not those loaded from the
        # store).
        self.program_seconds: dict[str, tuple[float, float, float]] = {}
        self._store = executables.store_for(
            repr(cfg), repr(config), self.token_buckets, executables.describe_function(
                attention_fn or ragged_paged_attention), executables.describe_function(experts_swiglu),
            str(getattr(shardings, "mesh", None)), str(device), executables.describe_arrays(params),
            executables.describe_arrays(draft and draft[1]))
        self._host_params: Any = None  # the weights while asleep at level 1 (sleep())
        self._kept: list = []  # what a layer keeps while asleep at level 2 (sleep())
        self._reserved_bytes: Optional[int] = None  # what the cache's sizing left to the programs
        self._host_draft_params: Any = None  # the draft model's while asleep (any level)
        # The step's logits and hidden states are placed so (step_jit_kwargs / the device).
        self._placed = shardings.replicated if shardings is not None else self._kv_sharding
        # With a warm-up to follow, the programs that do not read the cache start compiling now,
        # while it is sized (which reads some of them). None has a Mosaic GPU kernel, so their
        # lowering beside the steps' leaves the steps' modules as they were (executables.Build).
        self._independent = self._start_independent() if config.compile_at_start else None
        t0 = time.perf_counter()
        self.num_blocks = self._within_kernel_bound(config.num_blocks
                                                    or self._profile_num_blocks(),
                                                    overridden=config.num_blocks is not None)
        self.kv_sizing_seconds = time.perf_counter() - t0
        if config.num_blocks is None:
            self._make_sized_caches()
            self._fit_free_pieces()
        else:
            self._make_caches()
        self._log_capacity()

    def update_weights(self, params: Any) -> None:
        """Overwrites every weight in place with `params` (the engine's layout, unsharded)."""
        if self.shardings is not None:
            params = self.shardings.match_layout(params)
        self.params = swap_in_place(self._awake_params(), params, donate=not self.shares_params)

    def update_named_weights(self, named: dict[str, Any]) -> None:
        """Overwrites the weights `named` (weight_swap.get_named's names) in place, each
        checked and placed as update_weights does."""
        if self.shardings is not None:
            named = {n: self.shardings.match_named(n, w) for n, w in named.items()}
        current = {n: get_named(self._awake_params(), n) for n in named}
        for n, value in swap_in_place(current, named, donate=not self.shares_params).items():
            set_named(self.params, n, value)

    def add_lora(self, lora_id: int, path: str, adapter: Any) -> None:
        """Registers an adapter read on the host (LoRASlots.add); a step needing it places it."""
        self.lora.add(lora_id, path, adapter)

    def _awake_params(self) -> Any:
        if self.params is None:
            raise RuntimeError("update_weights while the weights are asleep: call "
                               "wake_up(tags=['weights']) first")
        return self.params

    # ---- sleep / wake ------------------------------------------------------------------------
    def sleep(self, level: int) -> None:
        """Releases the device memory of the KV cache (its contents are dropped) and of the
        weights: level 1 keeps a host copy of them, level 2 drops them (update_weights refills
        them after wake_up). What is already asleep stays so."""
        if self.kv_cache is not None:
            for a in jax.tree.leaves((self.kv_cache, self.draft_kv_cache)):
                a.delete()  # the runner's own: freed now, not when the last reference goes
            self.kv_cache = self.draft_kv_cache = None
        if self.params is not None:
            self._params_spec = _specs(self.params)
            # Dropped, not deleted: LLM.from_params may share them with the caller.
            self._host_params = _offload(self.params) if level == 1 else None
            # Level 2 keeps what update_weights does not bring back, small arrays a layer: the FP8
            # KV-cache scales, the checkpoint's calibration (engine.weights.keep_cache_scales), and
            # GPTQ's input orders, the layout new weights are rounded into (models/requant.py).
            self._kept = [] if level == 1 else [
                {k: v for k, v in lp.items() if k in KV_CACHE_SCALES or k.endswith("_perm")}
                for lp in self.params["layers"]]
            self.params = None
            if self.drafter is not None:  # at any level: update_weights never refills a draft's
                self._draft_spec = _specs(self.drafter.params)
                self._host_draft_params = _offload(self.drafter.params)
                self.drafter.params = None

    def wake_up(self, tags: Sequence[str]) -> None:
        """Puts back what `tags` name ("weights", "kv_cache") as they were placed (shapes, dtypes,
        shardings, and whether committed to them: jit's cache keys on each), so no program
        compiles again: the weights from their host copy (zeros after sleep(level=2)), the KV
        cache zeroed as at start-up."""
        if "weights" in tags and self.params is None:
            spec_leaf = lambda x: isinstance(x, tuple)  # noqa: E731
            if self.drafter is not None:
                self.drafter.params = _restore(self._host_draft_params, self._draft_spec)
                self._host_draft_params = None
            if self._host_params is not None:
                self.params = _restore(self._host_params, self._params_spec)
            else:  # made where they go, not sent from the host (15 GB of zeros took 4.5 s)
                self.params = jax.tree.map(lambda s: jnp.zeros(s[0].shape, s[0].dtype, device=s[1]),
                                           self._params_spec, is_leaf=spec_leaf)
                for lp, kept in zip(self.params["layers"], self._kept):
                    lp.update(kept)
            jax.block_until_ready((self.params, self.drafter and self.drafter.params))
            self._host_params = None
        if "kv_cache" in tags and self.kv_cache is None:
            self._make_caches()

    @property
    def is_sleeping(self) -> bool:
        return self.params is None or self.kv_cache is None

    # ---- the jitted step -------------------------------------------------------------------
    def _step_impl(self, params: Any, kv_cache: llama.KVCache, packed: jax.Array,
                   prev_sampled: jax.Array):
        inp, logits_indices, lora_slots, _ = self._unpack_inputs(packed, prev_sampled)
        if lora_slots is not None:  # unused (and dropped by XLA) in a program without the slots
            params = self.lora.with_mask(params, lora_slots)
        hidden, kv_cache = self.model.forward(params, kv_cache, inp, self.cfg, self.attention_fn,
                                              self.experts_fn)
        logits = self.model.compute_logits(params, hidden[logits_indices], self.cfg)
        # Also every token's hidden state, for prompt logprobs (scored in row chunks afterwards:
        # logits of a whole 2048-token bucket at a 128k vocabulary would be 1 GiB). Always, not as
        # a static variant: that would double the step executables compiled at start-up.
        return kv_cache, logits, hidden

    def _propose_impl(self, params: Any, kv_cache: llama.KVCache, packed: jax.Array,
                      prev_sampled: jax.Array, sampled: jax.Array, accepted: jax.Array):
        """The draft model over the step's batch, then its guesses (worker/drafter.py)."""
        inp, _, _, (num_drafts, guessing) = self._unpack_inputs(packed, prev_sampled)
        return self.drafter.propose(params, kv_cache, inp, num_drafts, guessing != 0, sampled,
                                    accepted)

    def _step_for(self, num_tokens: int) -> Any:
        """The jitted step for a bucket of `num_tokens` (see RunnerConfig.triton_gemm_max_tokens)."""
        small = num_tokens <= self.config.triton_gemm_max_tokens
        return self._step_triton_gemm if small else self._step

    # The host batch crosses to the device as ONE int32 array (and the sampling knobs as two):
    # every separate host array passed to a jitted call is its own transfer, which measured
    # ~0.5 ms each on the GPU, more than the batch-1 step's slack.
    def _packed_len(self, t: int) -> int:
        r = self.input_batch.request_bucket(t)
        rows = self.input_batch.logits_rows(t)
        return ((4 + bool(self.lora)) * t + (r + 1) + r + rows + 1 + r * self.max_blocks_per_seq
                + 2 * r * bool(self.drafter))

    def _packed_inputs(self, b: StepBatch) -> np.ndarray:
        lora = [] if self.lora is None else [
            b.lora_slots if b.lora_slots is not None else np.full(len(b.token_ids), -1, np.int32)]
        draft = []
        if self.drafter is not None:  # per request: its guesses verified, whether it guesses next
            draft = np.zeros((2, len(b.seq_lens)), np.int32)
            n = len(b.req_ids)
            draft[0, :n] = b.num_drafts
            draft[1, :n] = b.sample_mask[:n]
            draft = [draft.ravel()]
        return np.concatenate([b.token_ids, b.positions, b.slot_mapping, b.prev_rows,
                               b.query_start_loc, b.seq_lens, b.logits_indices, b.num_seqs,
                               b.block_tables.ravel(), *lora, *draft])

    def _device_inputs(self, b: StepBatch) -> tuple[Any, ...]:
        """The step's arguments after params and cache (for lowering: a dispatched step reads the
        previous samples when it is launched)."""
        return self._packed_inputs(b), self._prev_sampled

    def _unpack_inputs(self, packed: jax.Array, prev_sampled: jax.Array
                       ) -> tuple[llama.ModelInputs, jax.Array, Optional[jax.Array], tuple]:
        """The batch (token ids resolved), logits rows, (LoRA on) each token's adapter slot and
        (draft model on) each request's guesses verified and whether it guesses next."""
        t = self._bucket_by_packed_len[packed.shape[0]]  # static: shapes are known when tracing
        r = self.input_batch.request_bucket(t)
        rows = self.input_batch.logits_rows(t)
        sizes = ([t, t, t, t, r + 1, r, rows, 1, r * self.max_blocks_per_seq]
                 + [t] * bool(self.lora) + [r, r] * bool(self.drafter))
        parts, o = [], 0
        for n in sizes:
            parts.append(packed[o:o + n])
            o += n
        draft = (parts.pop(-2), parts.pop()) if self.drafter else ()
        lora_slots = parts.pop() if self.lora else None
        token_ids, positions, slots, prev_rows, qsl, seq_lens, logits_indices, num_seqs, bt = parts
        # Decode inputs whose ids are the previous step's samples are read on device (async
        # scheduling: the host never waited for them).
        token_ids = jnp.where(prev_rows >= 0, prev_sampled[jnp.maximum(prev_rows, 0)], token_ids)
        inp = llama.ModelInputs(token_ids, positions, slots, qsl, seq_lens,
                                bt.reshape(r, self.max_blocks_per_seq), num_seqs)
        return inp, logits_indices, lora_slots, draft

    def _apply_token_bits_impl(self, table: jax.Array, logits: jax.Array,
                               sampling: SamplingInputs) -> jax.Array:
        bits = token_table.read_rows(table, sampling.slots)
        if self.config.speculative is not None:
            bits = sampler_lib.count_guesses(bits, sampling.ints[5],
                                             self.config.speculative.num_speculative_tokens)
        return sampler_lib.apply_token_bits(logits, sampling.tensors(bits))

    def _sample_impl(self, logits: jax.Array, processed: jax.Array, sampling: SamplingInputs, *,
                     mode: str, topk_bound: int) -> sampler_lib.SamplerOutput:
        """`processed`: the logits after token bits, or the logits themselves."""
        no_bits = jnp.zeros((logits.shape[0], 0), jnp.int32)
        out = sampler_lib.sample(processed, sampling.tensors(no_bits), mode=mode,
                                 topk_bound=topk_bound, raw_logits=logits,
                                 logprobs_mode=self.config.logprobs_mode,
                                 invariant=self.cfg.batch_invariant)
        # Padded so the next step's input gather has one shape for every bucket (and the token
        # table's count of them, which with guesses reads which rows' tokens are output).
        pad = self.sample_rows - out.token_ids.shape[0]
        out = out._replace(token_ids=jnp.pad(out.token_ids, (0, pad)))
        return out if out.counted is None else out._replace(counted=jnp.pad(out.counted, (0, pad)))

    def _token_logprobs_impl(self, values: jax.Array, token_ids: jax.Array
                             ) -> sampler_lib.TokenLogprobs:
        """`values`: the step's logits, or the sampler's `processed` ones; `token_ids`: the
        sampler's (padded to sample_rows)."""
        return sampler_lib.token_logprobs(
            values, token_ids[:values.shape[0]], self.config.max_logprobs,
            as_logits=self.config.logprobs_mode.endswith("logits"),
            invariant=self.cfg.batch_invariant)

    # ---- memory ------------------------------------------------------------------------------
    def _make_caches(self) -> None:
        self.kv_cache = llama.make_kv_cache(self.cfg, self.num_blocks, self.config.block_size,
                                            self.config.kv_dtype, self._kv_sharding)
        self.draft_kv_cache = (None if self.drafter is None else self.drafter.make_cache(
            self.num_blocks, self.config.kv_dtype, self._kv_sharding))

    def _make_sized_caches(self) -> None:
        """Makes the cache the sizing chose, a tenth fewer blocks at a time while its layers do not
        all find a free piece: the sizing counts all free memory, and a model quantized on load
        leaves holes between its new weights (an 8B model's dummy weights quantized to int4 on an
        80 GB H100: a 920 MiB cache layer failed to allocate; bench/RESULTS.md)."""
        while self._caches_out_of_memory():
            # Every process shrinks alike (one program for all); the failed try's layers are
            # freed with its traceback, before the next.
            self.kv_cache = self.draft_kv_cache = None
            fewer = max(1, self.num_blocks // 10)
            if self.num_blocks - fewer < 2:
                raise ValueError("No device memory left for the KV cache in free pieces: lower "
                                 "max_num_batched_tokens or raise gpu_memory_utilization")
            logger.info("KV cache: %d blocks did not find free pieces of device memory; trying %d",
                        self.num_blocks, self.num_blocks - fewer)
            self.num_blocks -= fewer

    def _caches_out_of_memory(self) -> bool:
        """Makes the caches; whether any process ran out of device memory doing so."""
        try:
            self._make_caches()
            jax.block_until_ready((self.kv_cache, self.draft_kv_cache))
            failed = False
        except jax.errors.JaxRuntimeError as e:
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            failed = True
        return bool(_across_processes(int(failed), np.max))

    def _block_bytes(self) -> int:
        """One block's K/V (the draft's too) on one device."""
        per_block = llama.kv_cache_bytes_per_block(self.cfg, self.config.block_size,
                                                   self.config.kv_dtype)
        if self.drafter is not None:  # a block holds the draft's K/V too
            per_block += self.drafter.bytes_per_block(self.config.kv_dtype)
        if self.shardings is not None:
            per_block //= self.shardings.kv_split  # each device holds its KV heads only
        return per_block

    def _local_devices(self) -> list:
        """The devices of this process the runner uses (multi-host: the others' are remote)."""
        return ([d for d in self.shardings.mesh.devices.flat
                 if d.process_index == jax.process_index()] if self.shardings is not None
                else [self.device if self.device is not None else jax.local_devices()[0]])

    def _fit_free_pieces(self) -> None:
        """Shrinks the cache just made until the memory its sizing left to the programs is one free
        piece on every device. The sizing counts all free memory, but free memory in pieces holds
        the cache's layers only where they fit, and a step's temporaries are one allocation: an 8B
        model quantized to FP8 on load on an H100 left 13 GiB of holes between its weights, and its
        first step failed to allocate 1.8 GiB with 15 GiB free (bench/RESULTS.md)."""
        if self._reserved_bytes is None or not _preallocates():
            return  # a pool that grows on demand has no fixed pieces
        while True:  # each round gives up blocks: it ends, or raises below 2
            jax.block_until_ready((self.kv_cache, self.draft_kv_cache))
            stats = [_device_memory_stats(d) for d in self._local_devices()]
            if any(s is None or "largest_free_block_bytes" not in s for s in stats):
                return
            piece = min(s["largest_free_block_bytes"] for s in stats)
            # one program for all: the cache shrinks everywhere alike
            short = _across_processes(self._reserved_bytes - piece, np.max)
            if short <= 0:
                return
            fewer = int(-(-short // self._block_bytes()))
            if self.num_blocks - fewer < 2:
                raise ValueError("No device memory left for the KV cache in one piece beside the "
                                 "programs: lower max_num_batched_tokens or raise "
                                 "gpu_memory_utilization")
            logger.info("KV cache: %d blocks fewer, for the programs' %.2f GiB to fit in one free "
                        "piece (the largest was %.2f GiB)", fewer, self._reserved_bytes / 2**30,
                        piece / 2**30)
            self.kv_cache = self.draft_kv_cache = None
            self.num_blocks -= fewer
            self._make_caches()

    def _profile_num_blocks(self) -> int:
        per_block = self._block_bytes()
        devices = self._local_devices()
        if _device_memory_stats(devices[0]) is None:
            return max(2, CPU_KV_CACHE_BYTES // per_block)
        # What the cache must leave free comes from the compiled programs, not from a trial run's
        # peak: that peak also holds what XLA allocated while compiling (autotuning), so a cold and
        # a warm start would size the cache differently, and a different cache shape misses every
        # persistent-cache entry of the previous start.
        # The sampler and prompt scoring run after the step, one at a time. Under tensor parallelism
        # every device holds the same share, so the device with the least room decides (an OOM on
        # one device leaves the others waiting in a collective).
        # Stored with the executables: the probe programs cost a warm start 6 s at the 8B shape.
        reserved = self._store and self._store.get_json("kv-reserved-bytes")
        if reserved is None:
            reserved = self._step_bytes() + max(self._sampler_bytes(),
                                                self._prompt_scoring_bytes(), self._propose_bytes())
            if self._store is not None:
                self._store.put_json("kv-reserved-bytes", reserved)
        self._reserved_bytes = reserved
        budget = min(self._device_budget(_device_memory_stats(d)) for d in devices)
        budget -= reserved + (256 << 20)
        budget = _across_processes(budget, np.min)  # one program for all: the smallest cache
        if budget < 2 * per_block:
            raise ValueError(f"No device memory left for the KV cache (budget {budget / 2**30:.2f} "
                             f"GiB): lower max_num_batched_tokens or raise gpu_memory_utilization")
        return int(budget // per_block)

    def _within_kernel_bound(self, num_blocks: int, overridden: bool) -> int:
        """`num_blocks`, or fewer where a cache layer (per device) would hold more elements than the
        attention kernels index correctly (an FP8 cache past 2**31: a small model's on a large
        card); a cache size set by the user that exceeds it is refused."""
        limit = max_cache_elements(self.config.kv_dtype)
        if limit is None:
            return num_blocks
        split = self.shardings.kv_split if self.shardings is not None else 1
        dtype = jnp.dtype(self.config.kv_dtype).name
        cfgs = [self.cfg] + ([self.drafter.cfg] if self.drafter is not None else [])
        most = min(limit // (self.config.block_size * c.kv_size // split) for c in cfgs)
        if num_blocks <= most:
            return num_blocks
        if overridden:
            raise ValueError(f"num_gpu_blocks_override ({num_blocks}) exceeds the {most} blocks of "
                             f"{self.config.block_size} tokens whose {dtype} cache "
                             f"layers the attention kernels can index ({limit} elements each)")
        logger.info("KV cache: %d blocks fit in memory; %d kept, the most a %s cache layer's "
                    "%d elements allow the attention kernels", num_blocks, most, dtype, limit)
        return most

    def _device_budget(self, stats: dict) -> float:
        """gpu_memory_utilization of one device's memory, less what is in use there. A preallocated
        pool bounds it too: the allocator's limit is what it asked the card for, and where another
        process holds part of the card XLA backs off to a smaller pool rather than fail, so a cache
        sized from the limit would not fit."""
        limit = stats["bytes_limit"]
        total = stats.get("bytes_reservable_limit", limit)
        share = min(self.config.gpu_memory_utilization * max(total, limit), limit)
        if _preallocates() and stats.get("pool_bytes"):
            share = min(share, stats["pool_bytes"])
        return share - stats["bytes_in_use"]

    def _step_bytes(self) -> int:
        """Temporaries and new outputs of the largest bucket's step, compiled on a 2-block cache: the
        cache is donated and aliased, and its size changes no temporary (on 2x H200 at the 8B shape,
        TP 2: 0.27 GiB at 2 blocks and at 106,304). On CPU with one KV head per device XLA copies
        each layer's cache (a layout change around a size-1 dimension), which this does not see."""
        probe = llama.make_kv_cache(self.cfg, 2, self.config.block_size, self.config.kv_dtype,
                                    self._kv_sharding)
        t = self.token_buckets[-1]
        b = self._dummy_batch(t)
        return _new_bytes(self._step_for(t).lower(self._step_params(), probe,
                                                  *self._device_inputs(b)).compile())

    def _propose_bytes(self) -> int:
        """The draft model's guessing from the largest bucket, as `_step_bytes` (0: no draft)."""
        if self.drafter is None:
            return 0
        probe = self.drafter.make_cache(2, self.config.kv_dtype, self._kv_sharding)
        t = self.token_buckets[-1]
        inputs = self._propose_inputs(self._dummy_batch(t))
        return _new_bytes(self._propose.lower(self.drafter.params, probe, *inputs).compile())

    def _propose_inputs(self, b: StepBatch) -> tuple[Any, ...]:
        """The draft's arguments after params and cache, for warming up: a batch's, and sampler
        outputs of its shapes."""
        return (*self._device_inputs(b), self._prev_sampled,
                self._like_samples(np.zeros(len(b.logits_indices), bool)))

    def _like_samples(self, a: np.ndarray) -> jax.Array:
        """`a` placed as the sampler's outputs are, committed to a device only where the runner
        is (jit's cache keys on it), for warming up programs that take them."""
        return jax.device_put(a, self._prev_sampled.sharding if self._prev_sampled.committed
                              else None)

    def _sampler_bytes(self) -> int:
        """The sampler's most memory-hungry variant at its most rows: a full sort over the
        vocabulary (top-p without top-k). At the 8B shape (128k vocabulary, 256 rows) it measured
        878 MiB of temporaries on the H100, 7x the step's own and more than the fixed margin:
        OpenAI clients often send top_p. Compiling it here also does its autotuning before the
        cache takes the memory. Plus the outputs of the programs that process the logits before
        it (grammar masks, logit_bias, token bits; the token table itself is allocated already)
        and the logprobs after it (summed with the sampler's, an upper bound)."""
        return self._independent_bytes(self._sizing_programs()[1])

    def _prompt_scoring_bytes(self) -> int:
        """One chunk of prompt scoring (`_score_prompts`) at max_logprobs, from the largest bucket."""
        return self._independent_bytes(self._sizing_programs()[0])

    def _sizing_programs(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """The independent programs the KV sizing reads: (prompt scoring's, the sampler's)."""
        r = self.sample_rows
        return ((f"prompt-logprobs-{self.token_buckets[-1]}",),
                (f"bitmask-{r}", f"logit-bias-{r}", f"token-bits-{r}",
                 _sampler_name(r, "random_sort", 0), f"logprobs-{r}"))

    def _log_capacity(self) -> None:
        tokens = (self.num_blocks - 1) * self.config.block_size
        logger.info("KV cache: %d blocks of %d tokens = %d tokens; max concurrency at "
                    "max_model_len %d: %.1fx", self.num_blocks, self.config.block_size, tokens,
                    self.config.max_model_len, tokens / self.config.max_model_len)

    # ---- compilation -------------------------------------------------------------------------
    def _step_params(self, adapters: bool = True) -> Any:
        """The weights a step reads: with LoRA on and `adapters` (a token of the step has one),
        each layer's adapter slots beside them."""
        return self.params if self.lora is None or not adapters else self.lora.step_params(
            self.params)

    def _step_variants(self) -> tuple[bool, ...]:
        """Whether each step program of a token bucket reads the adapter slots. With LoRA on, a
        second program without them runs the steps where no token has an adapter: the update
        costs every token of a step it runs in (two GEMMs and a mask per projection; +23% at
        batch 1 and +38% at 64 on the 8B shape, bench/RESULTS.md, "LoRA")."""
        return (False,) if self.lora is None else (True, False)

    def _step_name(self, t: int, adapters: bool) -> str:
        base = "-base" if self.lora is not None and not adapters else ""
        return f"step-{t}-kv{self.num_blocks}{base}"

    def _token_lora_slots(self, b: StepBatch) -> np.ndarray:
        """Each token's adapter slot (-1: none), the step's adapters loaded into slots first."""
        ids = [self.input_batch.requests[rid].lora_id for rid in b.req_ids]
        slot_of = self.lora.ensure(i for i in ids if i)
        per_request = np.array([slot_of.get(i, -1) for i in ids], np.int32)
        slots = np.full(len(b.token_ids), -1, np.int32)
        qsl = b.query_start_loc
        slots[:b.num_tokens] = np.repeat(per_request, np.diff(qsl[:len(ids) + 1]))
        return slots

    def _dummy_batch(self, t: int) -> StepBatch:
        r = self.input_batch.request_bucket(t)
        rows = self.input_batch.logits_rows(t)
        z = lambda *s: np.zeros(s, np.int32)
        qsl = z(r + 1)
        spec = {} if self.config.speculative is None else dict(
            num_drafts=z(0), draft_ids=np.full(rows, -1, np.int32))
        return StepBatch([], 0, z(t), z(t), np.full(t, PAD_SLOT, np.int32), qsl, z(r),
                         z(r, self.max_blocks_per_seq),
                         np.array([0], np.int32), z(rows), np.zeros(r, bool),
                         np.full(t, -1, np.int32), **spec)

    def _independent_programs(self) -> dict[str, Callable[[], Any]]:
        """The programs that do not read the KV cache, lowered from the shapes and placement of
        the step's outputs (so they can compile while the cache is sized): every sampler variant
        (SAMPLER_VARIANTS), logprobs, token bits, grammar bitmask and logit_bias per logits-row
        count, prompt scoring from each token bucket, the token record. Those the KV sizing reads
        come first."""
        sds = jax.ShapeDtypeStruct
        rows = np.zeros(self.score_rows, np.int32)
        processed = self.config.logprobs_mode.startswith("processed")
        counted = (() if self.config.speculative is None
                   else (self._like_samples(np.zeros(self.sample_rows, bool)),))
        programs: dict[str, Callable[[], Any]] = {}
        for t in self.token_buckets:
            hidden = sds((t, self.cfg.hidden_size), self._hidden_dtype(), sharding=self._placed)
            programs[f"prompt-logprobs-{t}"] = functools.partial(
                self._prompt_logprobs.lower, self.params, hidden, rows, rows,
                num_logprobs=self.config.max_logprobs)
            r = self.input_batch.logits_rows(t)
            if f"token-bits-{r}" in programs:
                continue
            logits = sds((r, self.cfg.vocab_size), self._logits_dtype, sharding=self._placed)
            sampling = self.input_batch.sampling_inputs(self._dummy_batch(t))
            programs[f"token-bits-{r}"] = functools.partial(
                self._apply_token_bits.lower, self.token_table.array, logits, sampling)
            programs[f"bitmask-{r}"] = functools.partial(
                self._apply_token_bitmask.lower, logits, new_bitmask(r, self.cfg.vocab_size))
            programs[f"logit-bias-{r}"] = functools.partial(
                self._apply_logit_bias.lower, logits, *_logit_bias_rows(r, []))
            programs.update({_sampler_name(r, mode, bound): functools.partial(
                self._sample.lower, logits, logits, sampling, mode=mode, topk_bound=bound)
                for mode, bound in SAMPLER_VARIANTS})
            values = sds(logits.shape, jnp.float32, sharding=self._placed) if processed else logits
            programs[f"logprobs-{r}"] = functools.partial(
                self._token_logprobs.lower, values, self._prev_sampled)
        programs["record"] = lambda: self._record_tokens.lower(
            self.token_table.array, np.zeros(self.sample_rows, np.int32), self._prev_sampled,
            *counted)
        first = sum(self._sizing_programs(), ())
        return {**{n: programs[n] for n in first}, **programs}

    def _hidden_dtype(self) -> Any:
        return self.params["final_norm"].dtype

    @functools.cached_property
    def _logits_dtype(self) -> Any:
        hidden = jax.ShapeDtypeStruct((1, self.cfg.hidden_size), self._hidden_dtype())
        return jax.eval_shape(lambda p, h: self.model.compute_logits(p, h, self.cfg),
                              self.params, hidden).dtype

    def _start_independent(self) -> executables.Build:
        return executables.Build(self._independent_programs(), self._store, _compile_workers(),
                                 seconds=self.program_seconds)

    def _independent_bytes(self, names: Sequence[str]) -> int:
        """`_new_bytes` of independent programs: from the build under way, or compiled here."""
        if self._independent is not None:
            return sum(_new_bytes(self._independent.get(n)) for n in names)
        programs = self._independent_programs()
        return sum(_new_bytes(programs[n]().compile()) for n in names)

    def warmup(self, progress: bool = True) -> float:
        """Builds every program a request can need, so that serving compiles nothing: each token
        bucket's step, and `_independent_programs` (started already when the runner was made with
        `compile_at_start`, to compile while the cache was sized); returns seconds. Programs
        stored by an earlier start are loaded (worker/executables.py); the others are lowered on a
        thread and compiled on a thread pool (XLA compiles, and loads from the persistent cache,
        release the GIL). Then each bucket runs once on the real cache."""
        t0 = time.perf_counter()
        independent, self._independent = self._independent or self._start_independent(), None
        batches = {t: self._dummy_batch(t) for t in self.token_buckets}
        kv = f"kv{self.num_blocks}"  # the cache's shape is in every step's signature
        steps = {self._step_name(t, adapters): functools.partial(
            lambda t, b, a: self._step_for(t).lower(self._step_params(a), self.kv_cache,
                                                    *self._device_inputs(b)), t, b, adapters)
            for t, b in batches.items() for adapters in self._step_variants()}
        if self.drafter is not None:
            steps.update({f"propose-{t}-{kv}": functools.partial(
                lambda b: self._propose.lower(self.drafter.params, self.draft_kv_cache,
                                              *self._propose_inputs(b)), b)
                for t, b in batches.items()})
        bar = tqdm(total=len(steps), desc="Compiling buckets", unit="program",
                   disable=not progress)
        self._executables.update(executables.Build(
            steps, self._store, _compile_workers(), lambda: bar.update(1),
            self.program_seconds).result())
        bar.close()
        t_steps = time.perf_counter()
        for t, b in batches.items():
            for adapters in self._step_variants():
                self.kv_cache, logits, hidden = self._run(
                    self._step_name(t, adapters), None, self._step_params(adapters),
                    self.kv_cache, *self._device_inputs(b))
            # The independent programs were lowered for outputs of these kinds.
            for x, dtype in ((logits, self._logits_dtype), (hidden, self._hidden_dtype())):
                if x.dtype != dtype or x.sharding != (self._placed or x.sharding):
                    raise RuntimeError(f"a step's output ({x.dtype}, {x.sharding}) is not what "
                                       f"its sampler and scoring programs were built for")
            if self.drafter is not None:
                self.draft_kv_cache, _ = self._run(
                    f"propose-{t}-{kv}", None, self.drafter.params, self.draft_kv_cache,
                    *self._propose_inputs(b))
        built = independent.result()
        self._executables.update(built)
        self.token_table.warmup().compile()
        jax.block_until_ready(self.kv_cache)
        self._compile_mark = compile_watch.mark()
        done = time.perf_counter()
        logger.info("Warm-up: %d step executables in %.1f s, then %d sampler, prompt-scoring and "
                    "token-table executables done %.1f s later", len(steps), t_steps - t0,
                    len(built), done - t_steps)
        return done - t0

    def program_summary(self) -> dict[str, list]:
        """Warm-up's compiled programs by kind (the name less its bucket and cache size): [count,
        lowering seconds, compile seconds summed over the compiling threads, the slowest compile's
        seconds, seconds storing them (executables.Build)]."""
        kinds: dict[str, list] = {}
        for name, (lower_s, compile_s, store_s) in self.program_seconds.items():
            kind = re.sub(r"-kv\d+", "", re.sub(r"-\d+", "", name, count=1))
            k = kinds.setdefault(kind, [0, 0.0, 0.0, 0.0, 0.0])
            k[:] = (k[0] + 1, k[1] + lower_s, k[2] + compile_s, max(k[3], compile_s),
                    k[4] + store_s)
        return kinds

    def _run(self, name: str, fn: Any, *args: Any, **static: Any) -> Any:
        """The program built at warm-up as `name`, else `fn` (jit: compiled on first use)."""
        exe = self._executables.get(name)
        return exe(*args) if exe is not None else fn(*args, **static)

    # ---- one step ----------------------------------------------------------------------------
    def dispatch(self, scheduler_output: SchedulerOutput) -> Optional["Inflight"]:
        """Queue one step for the device without waiting for it (None: nothing to run). The batch
        is built here; its programs are enqueued by the launch thread, in dispatch order."""
        input_batch = self.input_batch
        input_batch.update(scheduler_output)
        if scheduler_output.total_num_scheduled_tokens == 0:
            return None
        b = input_batch.build(scheduler_output)
        t = len(b.token_ids)
        adapters = False
        if self.lora is not None:
            b.lora_slots = self._token_lora_slots(b)
            adapters = bool((b.lora_slots >= 0).any())
        step_params = self._step_params(adapters)  # now: a later dispatch may load others
        step_name = self._step_name(t, adapters)
        packed = self._packed_inputs(b)
        sampling = input_batch.sampling_inputs(b)
        n = b.num_rows
        knobs = sampling.temperature[:n], sampling.top_k[:n], sampling.top_p[:n]
        mode = sampler_lib.sampling_mode(*knobs)
        logprobs_k = {rid: input_batch.requests[rid].params.logprobs for rid in b.req_ids
                      if input_batch.requests[rid].params.logprobs is not None}
        slots = sampling.slots
        # Rows with token bits: their table rows are read before sampling and counted after.
        record_slots = None
        if (slots < self.token_table.num_slots).any():
            record_slots = np.full(self.sample_rows, self.token_table.num_slots, np.int32)
            record_slots[:len(slots)] = slots
        sampler_kw = dict(
            mode=mode, topk_bound=sampler_lib.topk_bound_for(*knobs) if mode == "random_sort" else 0)
        prompt_rows = self._prompt_rows(b) if b.prompt_logprob_spans else None
        # Structured outputs: the masks come once the step before has been collected (they need
        # its tokens), while this step's forward pass already runs; the sampler waits for them.
        grammar = None
        first_rows = b.row_starts
        if scheduler_output.grammar_rows:
            rows_of = {rid: (int(first_rows[i]), 1 + (0 if b.num_drafts is None
                                                      else int(b.num_drafts[i])))
                       for i, rid in enumerate(b.req_ids)}
            grammar = _GrammarMask({rid: (*rows_of[rid], start) for rid, start
                                    in scheduler_output.grammar_rows.items()},
                                   len(b.logits_indices), Future())
        logit_bias = None
        if input_batch.biased:
            requests = input_batch.requests
            guesses = np.zeros(len(b.req_ids), np.int32) if b.num_drafts is None else b.num_drafts
            logit_bias = _logit_bias_rows(len(b.logits_indices), [
                (row, requests[rid].params.logit_bias)
                for i, rid in enumerate(b.req_ids) if rid in input_batch.biased
                for row in range(first_rows[i], first_rows[i] + guesses[i] + 1)])
        # Rows of new requests, written before the sampler reads them.
        table_writes = self.token_table.take_writes()

        def launch() -> tuple[Any, Optional[_PromptScores], Optional[jax.Array]]:
            self.token_table.write(table_writes)
            prev_sampled = self._prev_sampled
            self.kv_cache, logits, all_hidden = self._run(
                step_name, self._step_for(t), step_params, self.kv_cache, packed, prev_sampled)
            r = logits.shape[0]
            processed = (logits if grammar is None else self._run(
                f"bitmask-{r}", self._apply_token_bitmask, logits, grammar.bitmask.result()))
            if logit_bias is not None:
                processed = self._run(f"logit-bias-{r}", self._apply_logit_bias, processed,
                                      *logit_bias)
            if record_slots is not None:
                processed = self._run(f"token-bits-{r}", self._apply_token_bits,
                                      self.token_table.array, processed, sampling)
            sampled = self._run(_sampler_name(r, **sampler_kw), self._sample, logits, processed,
                                sampling, **sampler_kw)
            logprobs = None if not logprobs_k else self._run(
                f"logprobs-{r}", self._token_logprobs,
                logits if sampled.processed is None else sampled.processed, sampled.token_ids)
            if record_slots is not None:  # count each output token in its request's row
                self.token_table.array = self._run(
                    "record", self._record_tokens, self.token_table.array, record_slots,
                    sampled.token_ids, *(() if sampled.counted is None else (sampled.counted,)))
            self._prev_sampled = sampled.token_ids
            guesses = None
            if self.drafter is not None:
                self.draft_kv_cache, guesses = self._run(
                    f"propose-{t}-kv{self.num_blocks}", self._propose, self.drafter.params,
                    self.draft_kv_cache, packed, prev_sampled, sampled.token_ids, sampled.accepted)
            prompt = None if prompt_rows is None else self._score_prompts(all_hidden, *prompt_rows)
            self._warn_on_compiles(t, mode)
            return sampled, logprobs, prompt, guesses

        return Inflight(b.req_ids, b.sample_mask[:len(b.req_ids)].copy(),
                        self._launcher.submit(launch), logprobs_k, t, prompt_rows is not None,
                        grammar, n, None if b.num_drafts is None else first_rows, b.num_drafts)

    def set_grammar_bitmask(self, h: "Inflight", rows: Optional[np.ndarray]) -> None:
        """Give a dispatched step its grammar masks: `rows` as Scheduler.grammar_bitmask returns
        them, each request's from its first row of `SchedulerOutput.grammar_rows` on, one per row
        it samples; its other rows allow every token. None: there are none (the step fails)."""
        if rows is None:
            h.grammar.bitmask.set_exception(RuntimeError("the step's grammar masks failed"))
            return
        mask = new_bitmask(h.grammar.num_rows, self.cfg.vocab_size)
        for first, count, start in h.grammar.batch_rows.values():
            mask[first:first + count] = rows[start:start + count]
        h.grammar.bitmask.set_result(mask)

    def _warn_on_compiles(self, num_tokens: int, mode: str) -> None:
        if self._compile_mark is None:
            return
        names = compile_watch.since(self._compile_mark)
        if names:
            self._compile_mark += len(names)
            logger.warning("%d program(s) compiled while serving, after the warm-up (every request "
                           "waited): %s; step of token bucket %d, sampler mode %s", len(names),
                           ", ".join(names), num_tokens, mode)

    def _fetch(self, h: "Inflight") -> tuple[Any, Any, dict, Optional[np.ndarray]]:
        """The step's samples, their logprobs (None: not asked for), prompt logprobs and draft
        model's guesses on the host (one device->host transfer); under tensor parallelism within
        step_timeout."""
        def get() -> tuple[Any, Any, dict, Optional[np.ndarray]]:
            sampled, logprobs, prompt, guesses = h.launched.result()
            sampled, logprobs, guesses = jax.device_get(
                (sampled._replace(counted=None, processed=None), logprobs, guesses))
            return sampled, logprobs, {} if prompt is None else prompt.fetch(), guesses

        if self._waiter is None:
            return get()
        future = self._waiter.submit(get)
        deadline = time.monotonic() + self.config.step_timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                return future.result(timeout=min(left, PEER_CHECK_INTERVAL_S))
            except TimeoutError:
                if self.peer_check is not None:
                    self.peer_check()
        raise StepTimeoutError(
            f"A step of token bucket {h.num_tokens} ({len(h.req_ids)} requests, prompt scoring "
            f"{'on' if h.prompt_scoring else 'off'}) did not finish within "
            f"{self.config.step_timeout:g} s on {self.shardings.tp} devices: a device is stuck (a "
            f"collective waiting for a peer); the engine cannot continue")

    def collect(self, h: "Inflight") -> ModelRunnerOutput:
        """Wait for a dispatched step's samples; append them to the requests' tokens (with
        speculative decoding: the guesses kept and the token after them, and new guesses)."""
        input_batch = self.input_batch
        sampled, logprobs, prompt_logprobs, drafted = self._fetch(h)
        spec = h.row_starts is not None
        tokens = sampled.token_ids[:h.num_rows].tolist()
        accepted = sampled.accepted[:h.num_rows].tolist() if spec else None
        out = ModelRunnerOutput({}, prompt_logprobs=prompt_logprobs)
        proposer = self.config.speculative
        for i, rid in enumerate(h.req_ids):
            if not h.sample_mask[i]:
                continue
            if spec:
                first, last = int(h.row_starts[i]), int(h.row_starts[i] + h.num_drafts[i])
                row = first
                while row < last and accepted[row]:
                    row += 1  # kept: the guess itself, the next row's token follows it
                rows = range(first, row + 1)
            else:
                rows = (i,)
            toks = [tokens[r] for r in rows]
            k = h.logprobs_k.get(rid)
            if k is not None:
                out.logprobs[rid] = [_logprob_entry(tokens[r], logprobs.logprob[r], logprobs.rank[r],
                                                    logprobs.topk_ids[r], logprobs.topk_logprobs[r], k)
                                     for r in rows]
            out.sampled_token_ids[rid] = toks
            state = input_batch.requests.get(rid)  # gone if finished or preempted since dispatch
            if state is not None:
                state.token_ids.extend(toks)
                state.num_inflight -= 1
                if proposer is not None:
                    limit = self.config.max_model_len - len(state.token_ids) - 1
                    if drafted is not None:
                        guesses = drafted[i, :max(0, limit)].tolist()  # [R, k] already
                    else:
                        if state.ngrams is None:
                            state.ngrams = proposer.index()
                            state.ngrams.extend(state.token_ids)
                        else:
                            state.ngrams.extend(toks)
                        guesses = proposer.propose(state.ngrams, limit)
                    if guesses:
                        out.spec_token_ids[rid] = guesses
        return out

    def _prompt_rows(self, b: StepBatch) -> tuple[list, np.ndarray, np.ndarray]:
        """Which rows of this step's hidden states prompt scoring reads, and their target tokens:
        this step's chunk of each asking request, padded to whole chunks of `score_rows`."""
        rows: list[int] = []
        targets: list[int] = []
        spans = []
        for rid, offset, start, count in b.prompt_logprob_spans:
            state = self.input_batch.requests[rid]
            toks = state.token_ids[start + 1:start + 1 + count]
            spans.append((rid, len(rows), toks, state.params.prompt_logprobs))
            rows += range(offset, offset + len(toks))
            targets += toks
        pad = -len(rows) % self.score_rows
        return (spans, np.asarray(rows + [0] * pad, np.int32),
                np.asarray(targets + [0] * pad, np.int32))

    def _score_prompts(self, all_hidden: jax.Array, spans: list, rows: np.ndarray,
                       targets: np.ndarray) -> "_PromptScores":
        """Prompt logprobs of the given rows, a chunk of `score_rows` rows per call (the KV sizing
        reserved memory for one chunk: the logits of a whole 2048-token bucket at a 128k vocabulary
        would be 1 GiB). One top-k width for every request's k (each k is sliced on the host), as
        for the sampler."""
        c = self.score_rows
        name = f"prompt-logprobs-{all_hidden.shape[0]}"
        chunks = [self._run(name, self._prompt_logprobs, self.params, all_hidden, rows[i:i + c],
                            targets[i:i + c], num_logprobs=self.config.max_logprobs)
                  for i in range(0, len(rows), c)]
        return _PromptScores(spans, chunks)

    def _prompt_logprobs_impl(self, params: Any, hidden: jax.Array, rows: jax.Array,
                              targets: jax.Array, *, num_logprobs: int):
        logits = self.model.compute_logits(params, hidden[rows], self.cfg)
        return sampler_lib.prompt_logprobs(
            logits, targets, num_logprobs=num_logprobs,
            as_logits=self.config.logprobs_mode.endswith("logits"), invariant=self.cfg.batch_invariant)


def _logit_bias_rows(num_rows: int, biased: list[tuple[int, dict[int, float]]]
                     ) -> tuple[np.ndarray, np.ndarray]:
    """(token ids, values), [num_rows, MAX_LOGIT_BIAS] each: one fixed width for every request."""
    ids = np.zeros((num_rows, MAX_LOGIT_BIAS), np.int32)
    values = np.zeros((num_rows, MAX_LOGIT_BIAS), np.float32)
    for row, bias in biased:
        ids[row, :len(bias)] = list(bias)
        values[row, :len(bias)] = list(bias.values())
    return ids, values


@dataclass
class _PromptScores:
    spans: list[tuple[str, int, list[int], int]]  # (req_id, offset in the scored rows, target ids, k)
    chunks: list[Any]                             # per chunk of rows: (logprob, rank, topk ids, topk logprobs)

    def fetch(self) -> dict[str, list]:
        lp, rank, top_ids, top_lp = (np.concatenate(x) for x in zip(*jax.device_get(self.chunks)))
        return {rid: [_logprob_entry(t, lp[off + j], rank[off + j], top_ids[off + j],
                                     top_lp[off + j], k) for j, t in enumerate(toks)]
                for rid, off, toks, k in self.spans}


@dataclass
class _GrammarMask:
    """A step's rows with a grammar and the mask its sampler waits for."""
    # request id -> (its first batch row, its rows, its first row of the scheduler's masks)
    batch_rows: dict[str, tuple[int, int, int]]
    num_rows: int                     # the step's request bucket
    bitmask: Future                   # -> int32[num_rows, ceil(V/32)]


@dataclass
class Inflight:
    """A dispatched step: what collect() needs once the device is done."""
    req_ids: list[str]
    sample_mask: np.ndarray
    launched: Future                  # -> (SamplerOutput of device arrays, Optional[TokenLogprobs],
                                      #     Optional[_PromptScores], the draft's guesses or None)
    logprobs_k: dict[str, int]        # requests that asked for logprobs -> k
    num_tokens: int                   # the token bucket
    prompt_scoring: bool
    grammar: Optional["_GrammarMask"] = None
    num_rows: int = 0                        # sampled rows in use (StepBatch.num_rows)
    row_starts: Optional[np.ndarray] = None  # speculative decoding: StepBatch's
    num_drafts: Optional[np.ndarray] = None

    @property
    def needs_grammar_bitmask(self) -> bool:
        return self.grammar is not None and not self.grammar.bitmask.done()

    @property
    def launch_failed(self) -> bool:
        """Its programs never all reached the device (an exception while enqueueing them)."""
        return self.launched.done() and self.launched.exception() is not None


def _logprob_entry(token: int, logprob: float, rank: int, top_ids: np.ndarray,
                   top_lps: np.ndarray, k: int) -> dict[int, Logprob]:
    """vLLM's shape: the chosen token first, then the top-k (which may include it)."""
    entry = {int(token): Logprob(float(logprob), int(rank))}
    for j in range(k):
        tid = int(top_ids[j])
        if tid not in entry:
            entry[tid] = Logprob(float(top_lps[j]), j + 1)
    return entry


def _offload(params: Any) -> Any:
    """Host copies of the weights (sleep level 1): committed arrays go to pinned host memory, a
    DMA at the link's speed (the 8B shape's 15 GiB in about a second on an H200, against 10 s
    through pageable numpy arrays), and come back committed to the same sharding; uncommitted
    ones (a caller's arrays, LLM.from_params) become numpy arrays, which come back uncommitted
    (jit's cache keys on it)."""
    host = jax.tree.map(lambda a: jax.device_put(a, a.sharding.with_memory_kind("pinned_host"))
                        if a.committed else np.asarray(a), params)
    jax.block_until_ready(host)  # copied before the device buffers are let go
    return host


def _restore(host: Any, specs: Any) -> Any:
    """`_offload`'s copies back on the device, placed as `_specs` recorded."""
    return jax.tree.map(lambda h, s: jax.device_put(h, s[1]), host, specs,
                        is_leaf=lambda x: isinstance(x, tuple))


def _specs(tree: Any) -> Any:
    """Each leaf's (shape and dtype, where to put it back: its sharding, or None if it was not
    committed to one)."""
    return jax.tree.map(lambda a: (jax.ShapeDtypeStruct(a.shape, a.dtype),
                                   a.sharding if a.committed else None), tree)


def _preallocates() -> bool:
    """Whether XLA's GPU allocator takes its pool up front (JAX's default), so that the pool's size
    is all this process has."""
    return (os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE", "true").lower() not in ("false", "0")
            and os.environ.get("XLA_PYTHON_CLIENT_ALLOCATOR", "default") != "platform")


def _across_processes(x: float, reduce: Callable) -> float:
    """`reduce` of `x` over every process (x itself in a single-process run)."""
    if jax.process_count() == 1:
        return float(x)
    from jax.experimental import multihost_utils
    return float(reduce(multihost_utils.process_allgather(np.float64(x))))


def _device_memory_stats(device: Any) -> Optional[dict]:
    """The device's allocator stats (None where there are none, e.g. on CPU)."""
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    return stats if stats and "bytes_limit" in stats else None


def _new_bytes(compiled: Any) -> int:
    """Device bytes a program allocates while it runs: temporaries and outputs not aliased to a
    (donated) input."""
    mem = compiled.memory_analysis()
    return mem.temp_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes


def _sampler_name(rows: int, mode: str, topk_bound: int) -> str:
    return f"sample-{rows}-{mode}-{topk_bound}"


def _compile_workers() -> int:
    return max(1, min(8, (os.cpu_count() or 2) - 1))

