"""Engine arguments: one dataclass, the single source for `LLM(...)` keywords and `serve` CLI flags."""
from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Optional, get_args, get_origin, get_type_hints

from jaxvllm.spec_decode import SpeculativeConfig

DTYPES = ("auto", "float32", "bfloat16", "float16")
LOAD_FORMATS = ("auto", "dummy", "safetensors", "gguf")
# Integer-quantized checkpoints, 4 or 8 bits (converters/integer.py). "compressed-tensors" names
# llm-compressor's checkpoints, whose config says the scheme: int ones (pack-quantized,
# int-quantized) run here, weight-only, float-quantized ones as "fp8".
INT_CHECKPOINTS = ("awq", "gptq", "compressed-tensors")
# Weights in the int4 and int8 layouts (models/int4.py, models/int8.py): those checkpoints, and a
# GGUF's 4-bit tensors kept small, its 5- to 8-bit ones in the int8 layout (converters/gguf_quant.py).
INTEGER_QUANTIZATIONS = (*INT_CHECKPOINTS, "gguf")
# FP8 checkpoints of these methods run as "fp8" (converters/fp8.py); as does a compressed-tensors
# float-quantized one.
FP8_CHECKPOINTS = ("modelopt", "fbgemm_fp8")
# models/quant.py for fp8; vLLM's names
QUANTIZATIONS = ("fp8", *FP8_CHECKPOINTS, *INTEGER_QUANTIZATIONS)
FP8_KV_CACHE_DTYPES = ("fp8", "fp8_e4m3")
KV_CACHE_DTYPES = ("auto", *FP8_KV_CACHE_DTYPES, "bfloat16", "float16", "float32")
LOGPROBS_MODES = ("raw_logprobs", "raw_logits", "processed_logprobs", "processed_logits")
# Decode buckets up to this many tokens compile with Triton GEMMs (RunnerConfig.triton_gemm_max_tokens),
# and FP8 linears that small run weight-only (models/quant.py): the Triton GEMM converts the FP8
# weight in registers, where cuBLAS would need a bf16 copy of it first.
TRITON_GEMM_MAX_TOKENS = 16
# An engine whose steps are launched onto an idle device (speculative verification, no async
# scheduling) compiles its steps without XLA's command buffers when the weights a device reads per
# step are at least this many bytes (RunnerConfig.command_buffers): updating the buffers at launch
# then costs more than launching kernel by kernel. One H200, batch 1, synchronous steps, ms with /
# without them: SmolLM2-135M's shape (0.27 GB) 3.82 / 4.86, Llama-3.2-1B's (2.5 GB) 3.41 / 2.89,
# 3B 5.66 / 4.78, 8B 8.27 / 6.81 (bench/RESULTS.md, "Command buffers by model size").
COMMAND_BUFFERS_OFF_MIN_BYTES = 1 << 30


@dataclass
class EngineArgs:
    model: Optional[str] = field(default=None, metadata={"help": "HF directory or .gguf file; "
                                 "omitted: the embedded default model (SmolLM2-135M-Instruct)."})
    tokenizer: Optional[str] = field(default=None, metadata={"help": "Tokenizer path (default: model)."})
    dtype: str = field(default="auto", metadata={"help": "auto|float32|bfloat16|float16.",
                                                 "choices": DTYPES})
    max_model_len: Optional[int] = field(default=None, metadata={
        "help": "Longest prompt + output (default: the model's max_position_embeddings)."})
    max_num_seqs: Optional[int] = field(default=None, metadata={
        "help": "Most sequences in one step (default on a GPU of >= 70 GiB: 1024 offline, as "
                "vLLM's, 384 for the server; else 256)."})
    max_num_batched_tokens: Optional[int] = field(default=None, metadata={
        "help": "Token budget of one step (default, at least max_num_seqs: on a GPU of >= 70 GiB "
                "16384 offline, as vLLM's, 1024 for the server; else 2048)."})
    block_size: int = field(default=16, metadata={"help": "Tokens per KV-cache block."})
    gpu_memory_utilization: float = field(default=0.9, metadata={
        "help": "Fraction of device memory for weights, activations and KV cache."})
    num_gpu_blocks_override: Optional[int] = field(default=None, metadata={
        "help": "Number of KV-cache blocks (skips memory profiling)."})
    enable_prefix_caching: bool = field(default=True, metadata={"help": "Automatic prefix caching."})
    tensor_parallel_size: int = field(default=1, metadata={"help": "Devices to shard the model over."})
    data_parallel_size: int = field(default=1, metadata={
        "help": "Engine replicas, each on its own tensor_parallel_size devices; requests are "
                "routed by load with prefix-cache affinity."})
    engine_process: Optional[bool] = field(default=None, metadata={
        "help": "Run the engine (scheduler, model runner, detokenizer) in a process of its own, as "
                "data-parallel replicas always run, so a server's HTTP and streaming work does not "
                "share a GIL with the engine's steps. Default: on for a server on a GPU (one "
                "host), off otherwise (LLM, a CPU)."})
    load_format: str = field(default="auto", metadata={"help": "auto|dummy|safetensors|gguf.",
                                                       "choices": LOAD_FORMATS})
    quantization: Optional[str] = field(default=None, metadata={
        "help": "fp8: linear weights quantized to FP8 (e4m3) on load, per output channel, and "
                "activations per token (W8A8); MoE experts per expert and output channel "
                "(weight-only); the embedding and LM head keep dtype. "
                "awq, gptq, compressed-tensors: the 4- or 8-bit weights of such a checkpoint (taken "
                "from its config.json when not given; a compressed-tensors FP8 one runs as fp8). "
                "modelopt, fbgemm_fp8: such an FP8 checkpoint, run as fp8 (as any FP8 checkpoint "
                "is when not given). "
                "gguf: "
                "a GGUF file's Q4_0/Q4_1/Q4_K projections kept at 4 bits and Q5_0/Q5_1/Q5_K/Q6_K/"
                "Q8_0 ones at 8 (otherwise dequantized to dtype).",
        "choices": QUANTIZATIONS})
    kv_cache_dtype: str = field(default="auto", metadata={
        "help": "auto: fp8 where the checkpoint's config asks for an FP8 KV cache (ModelOpt's "
                "kv_cache_quant_algo, compressed-tensors' kv_cache_scheme), else the model's dtype; "
                "fp8 (= fp8_e4m3): K/V stored as float8 e4m3 (values clipped to +-448, divided by "
                "the checkpoint's k_scale / v_scale, per layer or per KV head, where it has them), "
                "half the bytes per cached token; bfloat16, float16, float32: the model's dtype, "
                "named (it must be the model's), whatever the checkpoint asks.",
        "choices": KV_CACHE_DTYPES})
    seed: int = field(default=0, metadata={"help": "Seed for dummy weights and unseeded sampling."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Accepted for vLLM "
                                    "compatibility; remote code is never run."})
    enforce_eager: Optional[bool] = field(default=None, metadata={
        "help": "Compile buckets on first use instead of all at start-up. Default: at start-up on "
                "a GPU (no request then waits on a compile), on first use on a CPU (compiles "
                "there take minutes, and a CPU serves a user or two)."})
    max_logprobs: int = field(default=20, metadata={"help": "Most logprobs a request may ask for."})
    logprobs_mode: str = field(default="raw_logprobs", metadata={
        "help": "What logprobs and prompt_logprobs hold (vLLM's names): raw_logprobs (the model's "
                "log-probabilities), raw_logits, processed_logprobs / processed_logits (after "
                "penalties, logit_bias, grammar masks, temperature, min_p, top_k and top_p: the "
                "distribution a token was drawn from; prompt tokens have no processing).",
        "choices": LOGPROBS_MODES})
    batch_invariant: bool = field(default=False, metadata={
        "help": "A request's tokens and logprobs are bitwise the same whatever else runs beside "
                "it, however its prompt is chunked or cached (sums in an order fixed per row); "
                "score() equals generate()'s logprobs. Slower (1.1-1.2x the step on a GPU)."})
    enable_lora: bool = field(default=False, metadata={
        "help": "Serve LoRA adapters: requests name one (LoRARequest; the server's --lora-modules)."})
    max_loras: int = field(default=1, metadata={
        "help": "Adapters on the device at once (the most distinct ones a step can run)."})
    max_lora_rank: int = field(default=16, metadata={"help": "The largest adapter rank."})
    compilation_cache_dir: Optional[str] = field(default=None, metadata={
        "help": "JAX persistent compilation cache (default: ~/.cache/jaxvllm/jax; 'none' disables)."})
    weights_cache_dir: Optional[str] = field(default=None, metadata={
        "help": "Converted-weights cache, with pickled tokenizers under its 'tokenizers' "
                "subdirectory (default: ~/.cache/jaxvllm/weights; 'none' disables both)."})
    token_buckets: Optional[tuple[int, ...]] = field(default=None, metadata={
        "help": "Compiled token-count buckets (default: powers of two up to the token budget, "
                "and on a GPU with quantized weights a one-token bucket first; a list given "
                "here replaces them all)."})
    disable_log_stats: bool = field(default=False, metadata={
        "help": "Do not log throughput, queue and KV-cache stats every few seconds."})
    scheduling_policy: str = field(default="fcfs", metadata={
        "help": "fcfs (arrival order) or priority (SamplingParams.priority, lower first; "
                "preemption takes the lowest priority).", "choices": ("fcfs", "priority")})
    step_timeout: float = field(default=300.0, metadata={
        "help": "Seconds a tensor-parallel step may take on the devices before the engine fails "
                "with an error naming the step (a collective waiting forever for a device)."})
    async_scheduling: bool = field(default=True, metadata={
        "help": "Schedule and dispatch the next step while the device runs the current one "
                "(not for a step that verifies speculative guesses: they need the tokens of the "
                "step before)."})
    speculative_config: Optional[dict] = field(default=None, metadata={
        "help": "Speculative decoding, vLLM's keys, as JSON on the command line: "
                '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, '
                '"prompt_lookup_min": 1} guesses a request\'s next tokens from its own context '
                '(prompt lookup); {"method": "draft_model", "model": PATH, '
                '"num_speculative_tokens": 4} has a smaller model of the same tokenizer guess '
                "them. Either way they are verified in one step: greedy output is unchanged, "
                "sampled output keeps its distribution. Requests with "
                "allowed_token_ids, bad_words or a grammar decode one token a step."})
    nnodes: int = field(default=1, metadata={
        "help": "Processes (hosts) that together run one engine: the model is sharded over all of "
                "their devices; run the same command on each with its own --node-rank."})
    node_rank: int = field(default=0, metadata={
        "help": "This process's rank among --nnodes: 0 runs the scheduler (and the HTTP server), "
                "the others follow its steps."})
    dist_init_addr: Optional[str] = field(default=None, metadata={
        "help": "HOST:PORT of rank 0, where the ranks meet (jax.distributed's coordinator; rank 0 "
                "also sends each step's schedule from PORT+1). Required with --nnodes > 1."})

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def pos_int(name: str, optional: bool = False) -> None:
            v = getattr(self, name)
            if optional and v is None:
                return
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")

        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.load_format not in LOAD_FORMATS:
            raise ValueError(f"load_format must be one of {LOAD_FORMATS}, got {self.load_format!r}")
        if self.quantization is not None and self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {QUANTIZATIONS} or None, got "
                             f"{self.quantization!r}")
        if self.logprobs_mode not in LOGPROBS_MODES:
            raise ValueError(f"logprobs_mode must be one of {LOGPROBS_MODES}, got "
                             f"{self.logprobs_mode!r}")
        if self.batch_invariant and (self.quantization is not None or self.tensor_parallel_size > 1
                                     or self.enable_lora):
            raise ValueError("batch_invariant is not supported with quantization, "
                             "tensor_parallel_size > 1 or enable_lora yet")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got "
                             f"{self.kv_cache_dtype!r}")
        for name in ("block_size", "tensor_parallel_size", "data_parallel_size",
                     "max_logprobs", "max_loras", "max_lora_rank"):
            pos_int(name)
        for name in ("max_num_seqs", "max_model_len", "max_num_batched_tokens",
                     "num_gpu_blocks_override"):
            pos_int(name, optional=True)
        if self.scheduling_policy not in ("fcfs", "priority"):
            raise ValueError(f"scheduling_policy must be 'fcfs' or 'priority', got {self.scheduling_policy!r}")
        if self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if not (isinstance(self.gpu_memory_utilization, (int, float))
                and 0.0 < self.gpu_memory_utilization <= 1.0):
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization!r}")
        if not (isinstance(self.step_timeout, (int, float)) and not isinstance(self.step_timeout, bool)
                and self.step_timeout > 0):
            raise ValueError(f"step_timeout must be a positive number of seconds, got {self.step_timeout!r}")
        self._validate_nodes()
        spec = SpeculativeConfig.from_dict(self.speculative_config)  # raises on a malformed one
        if spec is not None and spec.method == "draft_model" and self.nnodes > 1:
            raise ValueError("speculative_config with a draft model is not supported with "
                             "nnodes > 1 yet")
        if self.token_buckets is not None:
            v = tuple(self.token_buckets)
            if not v or any(not isinstance(x, int) or x < 1 for x in v):
                raise ValueError(f"token_buckets must be a non-empty list of positive ints, got {v!r}")
            self.token_buckets = tuple(sorted(set(v)))

    def _validate_nodes(self) -> None:
        if not isinstance(self.nnodes, int) or isinstance(self.nnodes, bool) or self.nnodes < 1:
            raise ValueError(f"nnodes must be a positive int, got {self.nnodes!r}")
        if (not isinstance(self.node_rank, int) or isinstance(self.node_rank, bool)
                or not 0 <= self.node_rank < self.nnodes):
            raise ValueError(f"node_rank must be in [0, nnodes={self.nnodes}), got {self.node_rank!r}")
        if self.nnodes > 1 or self.dist_init_addr is not None:
            split_host_port(self.dist_init_addr, "dist_init_addr")
        if self.nnodes > 1 and (self.data_parallel_size > 1 or self.engine_process):
            # one leader per process, for now
            raise ValueError("data_parallel_size > 1 and engine_process are not supported with "
                             "nnodes > 1")

    @property
    def speculative(self) -> Optional[SpeculativeConfig]:
        return SpeculativeConfig.from_dict(self.speculative_config)

    def compiles_at_start(self) -> bool:
        """Whether the engine compiles every bucket at start-up (see enforce_eager)."""
        if self.enforce_eager is not None:
            return not self.enforce_eager
        import jax
        return jax.default_backend() != "cpu"

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
        """One kebab-case flag per field, so `serve` and `LLM(...)` never drift."""
        hints = get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name in skip:
                continue
            flag = "--" + f.name.replace("_", "-")
            help_ = f.metadata.get("help", "")
            base = _base_type(hints[f.name])
            if base is bool:
                parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default,
                                    help=help_)
            elif base is tuple:
                parser.add_argument(flag, type=int, nargs="+", default=f.default, help=help_)
            elif base is dict:
                parser.add_argument(flag, type=_json_object, default=f.default, help=help_)
            else:
                parser.add_argument(flag, type=base, default=f.default, help=help_,
                                    choices=f.metadata.get("choices"))

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> "EngineArgs":
        return cls(**{k: v for k, v in vars(args).items() if k in cls.field_names()})


def split_host_port(addr: Any, name: str) -> tuple[str, int]:
    """(host, port) of "HOST:PORT" ("[v6]:PORT" too); ValueError naming `name` otherwise."""
    host, sep, port = addr.rpartition(":") if isinstance(addr, str) else ("", "", "")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65535:
        raise ValueError(f"{name} must be HOST:PORT (a port below 65535, since PORT+1 is used too), "
                         f"got {addr!r}")
    return host, int(port)


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def _base_type(tp: Any) -> type:
    if get_origin(tp) is not None and type(None) in get_args(tp):
        tp = next(a for a in get_args(tp) if a is not type(None))
    origin = get_origin(tp)
    if origin is not None:
        return origin if origin is tuple else _base_type(get_args(tp)[0])
    return tp
