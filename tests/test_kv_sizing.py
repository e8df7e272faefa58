"""KV-cache sizing on a GPU-like device (memory stats faked): the cache leaves room for the largest
bucket's step and for the larger of the sampler's most memory-hungry variant and a prompt-scoring
chunk, and the size depends only on the settings and the memory in use (the same at a cold and a
warm start)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from converters import init_dummy_params
from jaxvllm.models import llama
from jaxvllm.models.config import ModelConfig
from jaxvllm.worker import model_runner
from jaxvllm.worker.model_runner import ModelRunner, RunnerConfig

# A 128k vocabulary, as Llama 3's: there the sampler's full sort over 256 rows needs far more than
# the fixed 256 MiB margin (measured 878 MiB on H100), which is what this test is about.
CFG = ModelConfig(architecture="LlamaForCausalLM", vocab_size=128256, hidden_size=64,
                  intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                  rms_norm_eps=1e-5, rope_theta=1e4, max_position_embeddings=512)
LIMIT, IN_USE, MARGIN = 8 << 30, 1 << 30, 256 << 20


def _stats(peak: int):
    return lambda: {"bytes_limit": LIMIT, "bytes_in_use": IN_USE, "peak_bytes_in_use": peak}


@pytest.fixture(scope="module")
def runner():
    # A 2-block cache: the sizing is called directly, under faked stats, without allocating its result.
    rc = RunnerConfig(block_size=16, max_model_len=512, max_num_seqs=256, max_num_batched_tokens=256,
                      num_blocks=2, gpu_memory_utilization=0.9, kv_dtype=jnp.float32,
                      token_buckets=(256,))
    return ModelRunner(CFG, init_dummy_params(CFG, "float32"), rc)


def _bytes(mem) -> int:
    return mem.temp_size_in_bytes + mem.output_size_in_bytes


def test_cache_leaves_room_for_step_sampler_and_scoring(runner, monkeypatch):
    monkeypatch.setattr(model_runner, "_device_memory_stats", _stats(6 << 30))
    num_blocks = runner._profile_num_blocks()
    per_block = llama.kv_cache_bytes_per_block(CFG, 16, jnp.float32)
    left = 0.9 * LIMIT - IN_USE - num_blocks * per_block
    # Top-p without top-k (a full sort), 20 logprobs, every row of max_num_seqs sampling.
    batch = runner._dummy_batch(256)
    f32, i32, num_stop = runner.input_batch.sampling_arrays(batch)
    logits = jax.ShapeDtypeStruct((256, CFG.vocab_size), jnp.float32)
    sampler = runner._sample.lower(logits, f32, i32, num_stop=num_stop, mode="random_sort",
                                   num_logprobs=20, topk_bound=0).compile().memory_analysis()
    assert _bytes(sampler) > MARGIN  # the case where the margin alone would not do
    rows = jnp.zeros(runner.score_rows, jnp.int32)
    scoring = runner._prompt_logprobs.lower(runner.params, jnp.zeros((256, 64), jnp.float32), rows,
                                            rows, num_logprobs=20).compile().memory_analysis()
    step = runner._step_for(runner.token_buckets[-1]).lower(runner.params, runner.kv_cache, *runner._device_inputs(batch),
                              score=False).compile().memory_analysis()
    need = _bytes(step) - step.alias_size_in_bytes + max(_bytes(sampler), _bytes(scoring)) + MARGIN
    assert need <= left < need + 2 * per_block + (64 << 20)  # enough, and nothing much wasted


def test_size_ignores_the_allocator_peak(runner, monkeypatch):
    """A cold start's peak also holds compile-time buffers; the size must not follow it."""
    monkeypatch.setattr(model_runner, "_device_memory_stats", _stats(6 << 30))
    a = runner._profile_num_blocks()
    monkeypatch.setattr(model_runner, "_device_memory_stats", _stats(7 << 30))
    assert runner._profile_num_blocks() == a
