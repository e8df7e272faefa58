"""Executables stored between starts (worker/executables.py): a second engine of the same model and
configuration loads every program the first one compiled instead of tracing and lowering it again,
and computes the same tokens; another configuration is another fingerprint; a damaged file is
compiled again; the KV-cache sizing's memory figure is stored too."""
from __future__ import annotations

import logging
import os
import shutil
import types
import uuid

import jax
import jax.numpy as jnp
import pytest

from converters import init_dummy_params, load_model
from jaxvllm import LLM, SamplingParams
from jaxvllm.config import EngineArgs
from jaxvllm.engine.setup import build_runner
from jaxvllm.models.config import ModelConfig
from jaxvllm.worker import compile_watch, executables, model_runner

CONFIG = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128,
              hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
              num_key_value_heads=1, max_position_embeddings=128)
ENGINE = dict(max_model_len=128, max_num_seqs=8, max_num_batched_tokens=16, token_buckets=(8, 16),
              num_gpu_blocks_override=32, max_logprobs=2, enforce_eager=False)
# The programs the store holds, by the name JAX lowers them under.
STORED = ("_step_impl", "_sample_impl", "_prompt_logprobs_impl", "_apply_token_bits_impl",
          "apply_token_bitmask", "apply_logit_bias", "record")
KINDS = [SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True),
         SamplingParams(temperature=0.8, top_p=0.9, seed=3, max_tokens=6, ignore_eos=True,
                        logprobs=2, prompt_logprobs=1),
         SamplingParams(temperature=0.0, repetition_penalty=1.5, max_tokens=6, ignore_eos=True,
                        logit_bias={7: 2.0})]
PROMPTS = [{"prompt_token_ids": [5, 6, 7]}, {"prompt_token_ids": list(range(3, 40))},
           {"prompt_token_ids": [9] * 12}]


@pytest.fixture(scope="module")
def params():
    return load_model(CONFIG, load_format="dummy", dtype="float32", load_tokenizer=False).params


@pytest.fixture
def store_root(tmp_path):
    """JAX's cache directory pointed at an empty one for the test (the store lives under it)."""
    old = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", str(tmp_path))
    yield tmp_path / executables.STORE_DIR
    jax.config.update("jax_compilation_cache_dir", old)


def _start(params, **kw) -> tuple[LLM, list[str]]:
    """An engine, and the programs JAX lowered while it started."""
    mark = compile_watch.mark()
    llm = LLM.from_params(params, CONFIG, **{**ENGINE, **kw})
    return llm, compile_watch.since(mark)


def _outputs(llm: LLM) -> list:
    mark = compile_watch.mark()
    outs = llm.generate(PROMPTS, KINDS, use_tqdm=False)
    assert compile_watch.since(mark) == []  # served by the warm-up's programs only
    return [(o.outputs[0].token_ids, o.outputs[0].logprobs, o.prompt_logprobs) for o in outs]


def _stored_lowered(names: list[str]) -> list[str]:
    return [n for n in names if any(s in n for s in STORED)]


def test_a_second_start_loads_every_program_and_lowers_none(params, store_root):
    first, lowered = _start(params)
    assert _stored_lowered(lowered)  # the first start built them
    (fp,) = os.listdir(store_root)
    files = sorted(os.listdir(store_root / fp))
    assert "step-8-kv32.exe" in files and "step-16-kv32.exe" in files
    assert "sample-8-random_sort-0.exe" in files and "logprobs-8.exe" in files
    assert "record.exe" in files
    expected = _outputs(first)
    second, lowered = _start(params)
    assert _stored_lowered(lowered) == []
    assert len(second.llm_engine.runner._executables) == len([f for f in files if f.endswith(".exe")])
    assert _outputs(second) == expected


def test_another_configuration_is_another_fingerprint(params, store_root):
    _start(params)
    _, lowered = _start(params, max_logprobs=3)  # the logprobs programs change
    assert _stored_lowered(lowered)
    assert len(os.listdir(store_root)) == 2


def test_a_damaged_file_is_compiled_again(params, store_root, caplog):
    first, _ = _start(params)
    expected = _outputs(first)
    (fp,) = os.listdir(store_root)
    path = store_root / fp / "step-16-kv32.exe"
    path.write_bytes(b"not an executable")
    with caplog.at_level(logging.WARNING, logger="jaxvllm.worker.executables"):
        second, lowered = _start(params)
    assert any("step-16-kv32" in r.getMessage() for r in caplog.records)
    assert [n for n in lowered if "_step_impl" in n] == ["jit(_step_impl)"]  # that one only
    assert _outputs(second) == expected
    # Stored again; on the CPU removed instead (JAX's persistent cache compiled it: see below).
    again = executables.ExecutableStore(str(store_root), fp).load("step-16-kv32")
    assert (again is None) == (jax.default_backend() == "cpu")
    assert (store_root / fp / "step-16-kv32.exe").exists() == (again is not None)


def test_programs_from_the_persistent_cache_run_when_loaded_again(params, store_root):
    """A start with a new fingerprint whose programs JAX's persistent cache already holds (an
    upgrade that changes none of them): on the CPU those executables are not stored, since
    XLA:CPU serializes a cache-loaded executable without some of its functions (the next start
    would load them and fail when running them); on the GPU they are."""
    expected = _outputs(_start(params)[0])
    shutil.rmtree(store_root)  # the store emptied, JAX's persistent cache kept
    assert _outputs(_start(params)[0]) == expected
    third, lowered = _start(params)
    assert bool(_stored_lowered(lowered)) == (jax.default_backend() == "cpu")
    assert _outputs(third) == expected


@pytest.fixture
def gpu_like(monkeypatch):
    """A small model's weights, on a device whose memory stats are faked (so the cache is sized)."""
    cfg = ModelConfig(architecture="LlamaForCausalLM", vocab_size=512, hidden_size=64,
                      intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                      head_dim=16, rms_norm_eps=1e-5, rope_theta=1e4, max_position_embeddings=256)
    monkeypatch.setattr(model_runner, "_device_memory_stats",
                        lambda d: {"bytes_limit": 1 << 30, "bytes_in_use": 1 << 28})
    return types.SimpleNamespace(config=cfg, params=init_dummy_params(cfg, "float32"),
                                 load_format="dummy")


def test_the_kv_sizing_figure_is_stored(store_root, gpu_like, monkeypatch):
    """On a device with memory stats the sizing compiles its probe programs once; a later start
    reads their figure and sizes the cache the same without them."""
    args = EngineArgs(max_model_len=256, max_num_seqs=8, max_num_batched_tokens=64,
                      token_buckets=(64,))
    first = build_runner(args, gpu_like)[0]
    (fp,) = os.listdir(store_root)
    assert os.path.exists(store_root / fp / "kv-reserved-bytes.json")

    def no_probe(self):
        raise AssertionError("the probe programs were compiled again")
    monkeypatch.setattr(model_runner.ModelRunner, "_step_bytes", no_probe)
    assert build_runner(args, gpu_like)[0].num_blocks == first.num_blocks


def test_the_cache_is_sized_the_same_while_its_programs_compile(gpu_like):
    """With a warm-up to follow (compile_at_start), the programs that do not read the cache start
    compiling before it is sized, and the sizing reads its figures from them: the same cache as
    when the sizing compiles its probes itself."""
    args = dict(max_model_len=256, max_num_seqs=8, max_num_batched_tokens=64, token_buckets=(64,))
    alone = build_runner(EngineArgs(**args, enforce_eager=True), gpu_like)[0]
    assert alone.config.compile_at_start is False
    early = build_runner(EngineArgs(**args, enforce_eager=False), gpu_like)[0]
    assert early.config.compile_at_start is True
    assert early.num_blocks == alone.num_blocks
    for figure in ("_sampler_bytes", "_prompt_scoring_bytes"):
        assert getattr(early, figure)() == getattr(alone, figure)() > 0, figure
    early.warmup(progress=False)
    assert "sample-8-random_sort-0" in early.program_seconds


@pytest.mark.parametrize("keeps_every_program", [True, False])
def test_a_stored_program_is_not_written_to_the_persistent_cache_too(store_root, monkeypatch,
                                                                     keeps_every_program):
    """Where the store keeps every program a build compiles (the GPU), a program goes there only,
    not serialized a second time into JAX's persistent cache; where it does not (the CPU, see
    executables._storable), the persistent cache is written as before. Either way it is stored."""
    from jax._src import compilation_cache
    written = []
    put = compilation_cache.put_executable_and_time
    monkeypatch.setattr(compilation_cache, "put_executable_and_time",
                        lambda key, name, *a, **k: (written.append(name), put(key, name, *a, **k)))
    monkeypatch.setattr(executables, "_store_keeps_every_program", lambda: keeps_every_program)
    scale = float(uuid.uuid4().int % 10**6) + 0.5  # a program no cache has seen
    store = executables.ExecutableStore(str(store_root), "fp")
    seconds = {}
    build = executables.Build({"scaled": lambda: jax.jit(lambda x: x * scale).lower(
        jax.ShapeDtypeStruct((8,), jnp.float32))}, store, workers=1, seconds=seconds)
    assert float(build.get("scaled")(jnp.ones(8, jnp.float32))[0]) == scale
    assert ("jit__lambda" in written) is not keeps_every_program, written
    assert (store_root / "fp" / "scaled.exe").exists()
    lower_s, compile_s, store_s = seconds["scaled"]  # the time storing it counted apart
    assert lower_s > 0 and compile_s > 0 and store_s > 0


def test_program_summary_by_kind():
    """Warm-up's programs summed by kind (bucket and cache size dropped): count, lowering,
    compile (and the slowest), storing."""
    runner = types.SimpleNamespace(program_seconds={
        "step-8-kv32": (1.0, 2.0, 0.5), "step-16-kv32": (1.5, 3.0, 0.25),
        "sample-8-greedy-0": (0.25, 0.5, 0.125)})
    summary = model_runner.ModelRunner.program_summary(runner)
    assert summary == {"step": [2, 2.5, 5.0, 3.0, 0.75],
                       "sample-greedy-0": [1, 0.25, 0.5, 0.5, 0.125]}


def test_an_unwritable_cache_directory_only_costs_the_store(params, tmp_path, caplog):
    """A cache directory the store cannot create its folder in: the engine starts and serves."""
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    old = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", str(blocked))
    try:
        with caplog.at_level(logging.WARNING, logger="jaxvllm.worker.executables"):
            llm, _ = _start(params)
        assert any("No stored executables" in r.getMessage() for r in caplog.records)
        assert llm.llm_engine.runner._store is None and _outputs(llm)
    finally:
        jax.config.update("jax_compilation_cache_dir", old)
