"""Batch limits left unset (max_num_seqs, max_num_batched_tokens): on a GPU of >= 70 GiB vLLM V1's
1024 sequences and 16384 tokens offline, 384 and 1024 for a server (measured better for our
server, engine/setup.py); elsewhere 256 and 2048; what the user gives is kept. Checked on the resolution,
through build_runner, and through the engines a user builds (LLM offline, AsyncLLMEngine for
serving) with a GPU's memory faked."""
from __future__ import annotations

import types

import jax
import pytest

from converters import init_dummy_params
from jaxvllm import LLM
from jaxvllm.config import EngineArgs
from jaxvllm.engine import setup
from jaxvllm.engine.async_llm_engine import AsyncLLMEngine
from jaxvllm.models.config import ModelConfig
from jaxvllm.sampling_params import SamplingParams

GIB = 1 << 30
H100, A10 = 80 * 10**9, 24 * GIB  # H100 80GB: 74.5 GiB


@pytest.mark.parametrize("device_bytes, server, limits", [
    (None, False, (256, 2048)), (None, True, (256, 2048)), (A10, False, (256, 2048)),
    (A10, True, (256, 2048)), (H100, False, (1024, 16384)), (141 * GIB, False, (1024, 16384)),
    (H100, True, (384, 1024)), (141 * GIB, True, (384, 1024)),
])
def test_defaults_by_device_and_use(monkeypatch, device_bytes, server, limits):
    _probe_finds(monkeypatch, device_bytes)
    args = EngineArgs()
    if server:
        setup.use_server_defaults(args)  # the server's entry points, before the engine's own
    setup.resolve_batch_limits(args, device_bytes)
    assert (args.max_num_seqs, args.max_num_batched_tokens) == limits


@pytest.mark.parametrize("given, device_bytes, limits", [
    (dict(max_num_seqs=64), H100, (64, 16384)),
    (dict(max_num_batched_tokens=512), H100, (512, 512)),  # sequences within a budget given alone
    (dict(max_num_batched_tokens=4096), H100, (1024, 4096)),
    (dict(max_num_seqs=4096), None, (4096, 4096)),         # a budget of at least max_num_seqs
    (dict(max_num_seqs=8, max_num_batched_tokens=64), H100, (8, 64)),
])
def test_given_limits_kept(given, device_bytes, limits):
    args = EngineArgs(**given)
    setup.resolve_batch_limits(args, device_bytes)
    assert (args.max_num_seqs, args.max_num_batched_tokens) == limits


def test_server_given_everything_probes_no_device(monkeypatch):
    """A server given its limits and where its engine runs starts no device probe (a process that
    initializes JAX): there is nothing left to choose."""
    from jaxvllm.engine import dp_replica

    def probe():
        raise AssertionError("devices probed")
    monkeypatch.setattr(dp_replica, "probe_devices", probe)
    args = EngineArgs(max_num_seqs=32, max_num_batched_tokens=512, engine_process=False)
    setup.use_server_defaults(args)
    assert (args.max_num_seqs, args.max_num_batched_tokens, args.engine_process) == (32, 512, False)


def test_server_on_several_hosts_keeps_the_small_limits(monkeypatch):
    """Every host of a multi-host server resolves its limits alone: without a probe of its own
    device they are the same on all (a rank whose limits differed would run other programs)."""
    from jaxvllm.engine import dp_replica

    def probe():
        raise AssertionError("devices probed")
    monkeypatch.setattr(dp_replica, "probe_devices", probe)
    args = EngineArgs(nnodes=2, node_rank=1, dist_init_addr="h:1")
    setup.use_server_defaults(args)
    assert (args.max_num_seqs, args.max_num_batched_tokens, args.engine_process) == (256, 2048, False)


def test_device_memory_from_allocator_limit(monkeypatch):
    assert setup.device_memory_bytes(jax.devices("cpu")[0]) is None
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")
    gpu = types.SimpleNamespace(platform="gpu", memory_stats=lambda: {"bytes_limit": int(0.9 * H100)})
    assert abs(setup.device_memory_bytes(gpu) - H100) < 16
    quiet = types.SimpleNamespace(platform="gpu", memory_stats=lambda: None)
    assert setup.device_memory_bytes(quiet) is None


CFG = ModelConfig(architecture="LlamaForCausalLM", vocab_size=512, hidden_size=64,
                  intermediate_size=128, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=16,
                  rms_norm_eps=1e-5, rope_theta=1e4, max_position_embeddings=512)


def _probe_finds(monkeypatch, device_bytes):
    """The server's device probe finds a GPU of `device_bytes` (None: a CPU)."""
    from jaxvllm.engine import dp_replica
    backend = "cpu" if device_bytes is None else "gpu"
    monkeypatch.setattr(dp_replica, "probe_devices", lambda: (backend, 1, device_bytes))


@pytest.mark.parametrize("server, seqs, budget", [(False, 1024, 16384), (True, 384, 1024)])
def test_build_runner_on_a_big_gpu(monkeypatch, server, seqs, budget):
    monkeypatch.setattr(setup, "device_memory_bytes", lambda device: H100)
    _probe_finds(monkeypatch, H100)
    loaded = types.SimpleNamespace(config=CFG, params=init_dummy_params(CFG, "float32"),
                                   load_format="dummy")
    args = EngineArgs(max_model_len=512, num_gpu_blocks_override=64, engine_process=False)
    if server:
        setup.use_server_defaults(args)
    runner, _, sched = setup.build_runner(args, loaded)
    assert (sched.max_num_seqs, sched.max_num_batched_tokens) == (seqs, budget)
    assert runner.token_buckets[-1] == budget and runner.input_batch.max_num_seqs == seqs
    assert (args.max_num_seqs, args.max_num_batched_tokens) == (seqs, budget)  # what the server reads


def test_engines_take_offline_and_server_defaults(monkeypatch):
    monkeypatch.setattr(setup, "device_memory_bytes", lambda device: H100)
    kw = dict(dtype="float32", max_model_len=128, num_gpu_blocks_override=64)
    llm = LLM(**kw)
    sched = llm.llm_engine.scheduler.config
    assert (sched.max_num_seqs, sched.max_num_batched_tokens) == (1024, 16384)
    out = llm.generate("The capital of France is", SamplingParams(max_tokens=4, temperature=0))
    assert len(out[0].outputs[0].token_ids) == 4
    del llm
    _probe_finds(monkeypatch, H100)
    engine = AsyncLLMEngine.from_engine_args(EngineArgs(**kw, engine_process=False))
    sched = engine.engine.scheduler.config
    assert (sched.max_num_seqs, sched.max_num_batched_tokens) == (384, 1024)


@pytest.mark.parametrize("given, platform, expected", [
    (dict(), "gpu", True), (dict(), "cpu", False),
    (dict(nnodes=2, dist_init_addr="h:1"), "gpu", False),  # refused with several hosts
    (dict(data_parallel_size=2), "gpu", False),            # replicas are processes already
    (dict(engine_process=False), "gpu", False), (dict(engine_process=True), "cpu", True),
])
def test_server_engine_in_its_own_process_on_a_gpu(monkeypatch, given, platform, expected):
    """engine_process left unset: a server on a GPU of one host runs its engine in a process of
    its own; offline (no server defaults) it stays unset, which create_engine reads as off."""
    from jaxvllm.engine import dp_replica
    monkeypatch.setattr(dp_replica, "probe_devices", lambda: (platform, 8, H100))
    args = EngineArgs(**given)
    assert args.engine_process == given.get("engine_process")
    setup.use_server_defaults(args)
    assert args.engine_process is expected
