"""KV-cache sizing on a GPU-like device (memory stats faked), through the engine's start-up path
(EngineArgs -> build_runner): the cache takes what gpu_memory_utilization leaves after the memory in
use, the largest programs the engine runs (the largest bucket's step, then the larger of the
sampler's most memory-hungry variant and a prompt-scoring chunk) and the documented 256 MiB of
headroom, to the block; num_gpu_blocks_override wins; too little memory is a clear error."""
from __future__ import annotations

import types

import jax
import numpy as np
import jax.numpy as jnp
import pytest

from converters import init_dummy_params
from jaxvllm.config import EngineArgs
from jaxvllm.engine.setup import build_runner
from jaxvllm.models.config import ModelConfig
from jaxvllm.worker import model_runner
from jaxvllm.worker.input_batch import sampling_shapes

# A 128k vocabulary, as Llama 3's: there the sampler's full sort over 256 rows needs far more than
# the 256 MiB headroom (measured 878 MiB on H100), so leaving it out would be seen.
CFG = ModelConfig(architecture="LlamaForCausalLM", vocab_size=128256, hidden_size=64,
                  intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                  rms_norm_eps=1e-5, rope_theta=1e4, max_position_embeddings=512)
LIMIT, IN_USE, HEADROOM, UTIL = 8 << 30, 1 << 30, 256 << 20, 0.9
MAX_MODEL_LEN, BLOCK = 512, 16  # a sequence of max_model_len needs 32 blocks besides block 0


def _stats(in_use: int):
    return lambda device: {"bytes_limit": LIMIT, "bytes_in_use": in_use}


def _no_stats(device):
    raise AssertionError("device memory was read although num_gpu_blocks_override is set")


@pytest.fixture(scope="module")
def loaded():
    return types.SimpleNamespace(config=CFG, params=init_dummy_params(CFG, "float32"),
                                 load_format="dummy")


def _args(**kw) -> EngineArgs:
    return EngineArgs(max_model_len=MAX_MODEL_LEN, max_num_seqs=256, max_num_batched_tokens=256,
                      block_size=BLOCK, gpu_memory_utilization=UTIL, token_buckets=(256,), **kw)


@pytest.fixture(scope="module")
def runner(loaded):
    """A 33-block runner (nothing large allocated); its sizing is then called directly."""
    mp = pytest.MonkeyPatch()
    mp.setattr(model_runner, "_device_memory_stats", _no_stats)
    try:
        return build_runner(_args(num_gpu_blocks_override=33), loaded)[0]
    finally:
        mp.undo()


def _cache_bytes(runner) -> int:
    return sum(x.nbytes for x in jax.tree_util.tree_leaves(runner.kv_cache))


@pytest.fixture(scope="module")
def per_block(runner):
    return _cache_bytes(runner) // runner.num_blocks


def _running_bytes(mem) -> int:
    return mem.temp_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes


@pytest.fixture(scope="module")
def programs(runner):
    """Device memory the engine's largest programs take while they run, from their compiled memory
    analysis: the largest bucket's step (on the donated cache), then the larger of the sampler with
    top-p and no top-k (a full sort) for every one of max_num_seqs rows, plus the outputs of the
    grammar-mask, logit-bias and token-bit programs before it and the 20 logprobs after it, and
    one prompt-scoring chunk with 20 logprobs."""
    batch = runner._dummy_batch(256)
    step = runner._step_for(256).lower(runner.params, runner.kv_cache,
                                       *runner._device_inputs(batch)).compile().memory_analysis()
    sd = jax.ShapeDtypeStruct
    sampling = model_runner.SamplingInputs(*(sd(s, d) for s, d in zip(
        sampling_shapes(256), (jnp.float32, jnp.int32))))
    logits = sd((256, CFG.vocab_size), jnp.float32)
    bits = runner._apply_token_bits.lower(sd((256, CFG.vocab_size), jnp.int32), logits,
                                          sampling).compile().memory_analysis()
    mask = runner._apply_token_bitmask.lower(logits, sd((256, (CFG.vocab_size + 31) // 32),
                                                        jnp.int32)).compile().memory_analysis()
    bias = runner._apply_logit_bias.lower(logits, sd((256, 300), jnp.int32),
                                          sd((256, 300), jnp.float32)).compile().memory_analysis()
    sampler = runner._sample.lower(logits, logits, sampling, mode="random_sort",
                                   topk_bound=0).compile().memory_analysis()
    assert _running_bytes(sampler) > HEADROOM  # the case where the headroom alone would not do
    logprobs = runner._token_logprobs.lower(logits, sd((runner.sample_rows,), jnp.int32)
                                            ).compile().memory_analysis()
    rows = jnp.zeros(runner.score_rows, jnp.int32)
    scoring = runner._prompt_logprobs.lower(runner.params, jnp.zeros((256, 64), jnp.float32), rows,
                                            rows, num_logprobs=20).compile().memory_analysis()
    processing = sum(_running_bytes(m) for m in (mask, bias, bits, sampler, logprobs))
    return _running_bytes(step) + max(processing, _running_bytes(scoring))


@pytest.fixture(scope="module")
def blocks_at(runner):
    """num_blocks the sizing picks with `in_use` bytes of the device already in use."""
    def at(in_use: int) -> int:
        mp = pytest.MonkeyPatch()
        mp.setattr(model_runner, "_device_memory_stats", _stats(in_use))
        try:
            return runner._profile_num_blocks()
        finally:
            mp.undo()
    return at


@pytest.mark.parametrize("in_use", [IN_USE, 3 * IN_USE + 12345])
def test_blocks_fit_the_budget_and_one_more_would_not(blocks_at, programs, per_block, in_use):
    n = blocks_at(in_use)
    free = UTIL * LIMIT - in_use - programs - HEADROOM
    assert n * per_block <= free < (n + 1) * per_block, (n, free / per_block)


@pytest.mark.parametrize("prealloc", [True, False])
def test_the_cache_shrinks_until_the_programs_fit_in_one_free_piece(runner, per_block, monkeypatch,
                                                                    prealloc):
    """Free memory in pieces (holes a model quantized on load left between its weights): the sizing
    counted them, but the cache's layers went above them, and what the cache left above was less
    than the programs need in one piece. Faked: the largest free piece is 100 blocks less the
    cache. A pool that grows on demand has no fixed pieces and is left alone."""
    monkeypatch.setattr(model_runner, "_device_memory_stats", lambda device: {
        "bytes_limit": LIMIT, "bytes_in_use": IN_USE,
        "largest_free_block_bytes": 100 * per_block - _cache_bytes(runner)})
    monkeypatch.setenv("XLA_PYTHON_CLIENT_PREALLOCATE", "true" if prealloc else "false")
    monkeypatch.setattr(runner, "_reserved_bytes", 30 * per_block + 5)
    try:
        for blocks, fitted in ((60, 60), (80, 69)):   # 80 leave a piece of 20 blocks: 11 fewer
            runner.num_blocks = blocks
            runner._make_caches()
            runner._fit_free_pieces()
            assert runner.num_blocks == (fitted if prealloc else blocks)
            assert _cache_bytes(runner) == runner.num_blocks * per_block
        runner._reserved_bytes = 101 * per_block
        if prealloc:
            with pytest.raises(ValueError, match="one piece"):
                runner._fit_free_pieces()
    finally:
        runner.num_blocks = 33
        runner._make_caches()


def test_a_cache_whose_layers_find_no_free_piece_shrinks(runner, per_block, monkeypatch):
    """The sizing counted holes between weights that no cache layer fits in (an 8B model quantized
    to int4 on load, on an 80 GB card): making the cache runs out of device memory, and the
    runner tries a tenth fewer blocks until every layer finds a piece (faked: an allocation past
    70 blocks fails as XLA's allocator does). Another failure, or too few blocks left, is raised."""
    from jaxvllm.models import llama
    make = llama.make_kv_cache
    tries = []

    def allocator(cfg, num_blocks, *a, **kw):
        tries.append(num_blocks)
        if num_blocks > limit:
            raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to "
                                             "allocate 919.81MiB with allocator GPU_0_bfc")
        return make(cfg, num_blocks, *a, **kw)

    monkeypatch.setattr(llama, "make_kv_cache", allocator)
    try:
        limit, runner.num_blocks = 70, 100
        runner._make_sized_caches()
        assert tries == [100, 90, 81, 73, 66] and runner.num_blocks == 66
        assert _cache_bytes(runner) == 66 * per_block
        limit, runner.num_blocks = 1, 10
        with pytest.raises(ValueError, match="free pieces"):
            runner._make_sized_caches()
        monkeypatch.setattr(llama, "make_kv_cache", lambda *a, **kw: (_ for _ in ()).throw(
            jax.errors.JaxRuntimeError("INTERNAL: something else")))
        with pytest.raises(jax.errors.JaxRuntimeError, match="INTERNAL"):
            runner._make_sized_caches()
    finally:
        monkeypatch.setattr(llama, "make_kv_cache", make)
        runner.num_blocks = 33
        runner._make_caches()


def test_a_pool_smaller_than_the_limit_bounds_the_cache(runner, blocks_at, per_block, monkeypatch):
    """Another process holds part of the card: XLA's preallocation backed off to a smaller pool
    than its limit, and the cache is sized from that pool (sized from the limit it ran out of memory
    at warm-up on the GPU). Growing on demand instead, the pool says nothing of what is left."""
    n = blocks_at(IN_USE)
    pool = int(0.5 * LIMIT)

    def with_pool(device):
        return {"bytes_limit": LIMIT, "bytes_in_use": IN_USE, "pool_bytes": pool}

    monkeypatch.setattr(model_runner, "_device_memory_stats", with_pool)
    monkeypatch.delenv("XLA_PYTHON_CLIENT_PREALLOCATE", raising=False)
    assert runner._profile_num_blocks() == n - int(np.ceil((UTIL * LIMIT - pool) / per_block))
    monkeypatch.setenv("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    assert runner._profile_num_blocks() == n


def test_token_table_is_in_use_when_the_cache_is_sized(loaded, monkeypatch):
    """The per-request token table (max_num_seqs x vocabulary int32, for penalties) exists when the
    sizing reads the memory in use, so the KV cache leaves room for it."""
    seen = []

    def stats(device):
        seen.append(any(a.shape == (256, CFG.vocab_size) and a.dtype == jnp.int32
                        for a in jax.live_arrays()))
        return {"bytes_limit": LIMIT, "bytes_in_use": IN_USE}

    monkeypatch.setattr(model_runner, "_device_memory_stats", stats)
    runner = build_runner(_args(), loaded)[0]
    assert seen and all(seen)
    assert runner.token_table.array.shape == (256, CFG.vocab_size)


def test_memory_in_use_costs_its_blocks(blocks_at, per_block):
    n = blocks_at(IN_USE)
    for k in (1, 7, 1000):
        assert blocks_at(IN_USE + k * per_block) == n - k
    assert blocks_at(IN_USE + per_block // 2) in (n - 1, n)


def test_engine_start_sizes_the_cache_and_refuses_too_little_memory(loaded, blocks_at, per_block,
                                                                    monkeypatch):
    """Through build_runner: memory for 33 blocks gives a 33-block cache (block 0 and 32 for one
    sequence of max_model_len); one block less cannot hold max_model_len; memory for less than 2
    blocks is refused before any cache is made."""
    n = blocks_at(IN_USE)

    def in_use_for(k):  # bytes in use that leave room for exactly k blocks
        return IN_USE + (n - k) * per_block

    monkeypatch.setattr(model_runner, "_device_memory_stats", _stats(in_use_for(33)))
    runner, max_model_len, sched = build_runner(_args(), loaded)
    assert runner.num_blocks == sched.num_blocks == 33 and max_model_len == MAX_MODEL_LEN
    assert _cache_bytes(runner) == 33 * per_block
    del runner
    monkeypatch.setattr(model_runner, "_device_memory_stats", _stats(in_use_for(32)))
    with pytest.raises(ValueError, match=r"^max_model_len \(512\) needs 32 KV-cache blocks of 16 "
                                         r"tokens, but the cache has only 31: lower max_model_len"):
        build_runner(_args(), loaded)
    monkeypatch.setattr(model_runner, "_device_memory_stats", _stats(in_use_for(1)))
    with pytest.raises(ValueError, match=r"^No device memory left for the KV cache \(budget 0\.00 "
                                         r"GiB\): lower max_num_batched_tokens or raise "
                                         r"gpu_memory_utilization"):
        build_runner(_args(), loaded)


def test_num_gpu_blocks_override_wins(loaded, monkeypatch):
    """The override is the cache size: device memory is not even read (here it is all in use)."""
    monkeypatch.setattr(model_runner, "_device_memory_stats", _no_stats)
    runner, _, sched = build_runner(_args(num_gpu_blocks_override=40), loaded)
    assert runner.num_blocks == sched.num_blocks == 40
    assert all(x.shape[0] == 40 for x in jax.tree_util.tree_leaves(runner.kv_cache))


def test_tensor_parallel_sizing_takes_the_fullest_device(runner, blocks_at, per_block, monkeypatch):
    """Under tensor parallelism each device holds the same share of the cache, so the device with
    the least free memory decides (sizing from the first device alone overfilled the second)."""
    fuller = IN_USE + 5 * per_block
    expect = blocks_at(fuller)
    class Dev(str):
        process_index = 0  # this process's (multi-host: only local devices are measured)

    devices = np.array([Dev("dev0"), Dev("dev1")], dtype=object)
    in_use = {"dev0": IN_USE, "dev1": fuller}
    monkeypatch.setattr(runner, "shardings", types.SimpleNamespace(
        mesh=types.SimpleNamespace(devices=devices), kv_split=1, kv_cache=None))
    monkeypatch.setattr(model_runner, "_device_memory_stats",
                        lambda device: {"bytes_limit": LIMIT, "bytes_in_use": in_use[device]})
    assert runner._profile_num_blocks() == expect
    in_use.update(dev0=fuller, dev1=IN_USE)
    assert runner._profile_num_blocks() == expect


def test_a_byte_cache_stays_within_the_kernels_offsets(loaded, monkeypatch):
    """An FP8 cache layer holds at most max_cache_elements (the attention kernels' 32-bit offsets;
    on the GPU the wrapped offsets read wrong K/V): sized from memory, the cache keeps the most
    blocks within it; num_gpu_blocks_override past it is refused. A 2-byte cache is not bounded.
    The bound is lowered here to 100 blocks of this model's (16 tokens x 2 KV heads x 16)."""
    assert model_runner.max_cache_elements(jnp.float8_e4m3fn) == 2 ** 31
    assert model_runner.max_cache_elements(jnp.bfloat16) is None
    real = model_runner.max_cache_elements
    monkeypatch.setattr(model_runner, "max_cache_elements",
                        lambda dtype: None if real(dtype) is None else 100 * BLOCK * 32)
    monkeypatch.setattr(model_runner, "_device_memory_stats", _stats(IN_USE))
    runner, _, sched = build_runner(_args(kv_cache_dtype="fp8"), loaded)
    assert runner.num_blocks == sched.num_blocks == 100
    assert all(x.shape == (100, BLOCK, 2, 16) for x in jax.tree_util.tree_leaves(runner.kv_cache))
    del runner
    monkeypatch.setattr(model_runner, "_device_memory_stats", _no_stats)
    assert build_runner(_args(kv_cache_dtype="fp8", num_gpu_blocks_override=100),
                        loaded)[0].num_blocks == 100
    with pytest.raises(ValueError, match=r"^num_gpu_blocks_override \(101\) exceeds the 100 blocks "
                                         r"of 16 tokens whose float8_e4m3fn cache layers"):
        build_runner(_args(kv_cache_dtype="fp8", num_gpu_blocks_override=101), loaded)
    assert build_runner(_args(num_gpu_blocks_override=101), loaded)[0].num_blocks == 101
