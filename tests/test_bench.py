"""Benchmarks (jaxvllm/benchmarks, bench/*.py, `jaxvllm bench`): each runs end to end on tiny shapes
and its --json output parses with the expected keys. CPU, small engine settings."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from jaxvllm.benchmarks import common as C

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--max-model-len", "256", "--max-num-seqs", "8", "--max-num-batched-tokens", "64",
         "--num-gpu-blocks-override", "64", "--enforce-eager", "--token-buckets", "16", "64"]
TINY = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 512, "max_position_embeddings": 512,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "torch_dtype": "bfloat16",
        "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2}


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    # Synthetic tokenizers and converted-weights caches go to a temporary directory.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "xdg-cache"))


@pytest.fixture(scope="module")
def tiny_dummy(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("tiny-dummy")
    (d / "config.json").write_text(json.dumps(TINY))
    return str(d)


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory) -> str:
    """A tiny random HF Llama saved with save_pretrained (safetensors, no tokenizer)."""
    pytest.importorskip("torch")
    from hf_builders import tiny_config, tiny_model
    cfg = tiny_config(**{k: v for k, v in TINY.items() if k not in ("architectures", "torch_dtype")})
    d = tmp_path_factory.mktemp("tiny-hf")
    tiny_model(cfg, dtype="bfloat16").save_pretrained(str(d))
    return str(d)


def _json_out(capsys) -> dict:
    return json.loads(capsys.readouterr().out)


# -------------------------------------------------------------------------------------------------
def test_helpers():
    assert C.LenSpec.parse("128") == C.LenSpec(128, 128)
    assert C.LenSpec.parse("128:1024") == C.LenSpec(128, 1024)
    for bad in ("0", "5:4", "x", "1:"):
        with pytest.raises(Exception):
            C.LenSpec.parse(bad)
    a = C.make_requests(50, C.LenSpec(4, 9), C.LenSpec(2, 3), 100, seed=7)
    b = C.make_requests(50, C.LenSpec(4, 9), C.LenSpec(2, 3), 100, seed=7)
    assert [r.prompt_token_ids for r in a] == [r.prompt_token_ids for r in b]
    assert {r.prompt_len for r in a} == set(range(4, 10)) and {r.output_len for r in a} == {2, 3}
    assert all(0 <= t < 100 for r in a for t in r.prompt_token_ids)
    assert C.percentile([1, 2, 3, 4], 50) == 2.5 and C.percentile([5], 99) == 5
    assert C.parse_rates("1, 2.5,inf") == [1.0, 2.5, float("inf")]
    assert "| a " in C.table([[1.5, "x"]], ["a", "b"])


def test_synthetic_tokenizer_roundtrip(tmp_path):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(C.synthetic_tokenizer_dir(300, str(tmp_path)))
    assert len(tok) == 300 and tok.encode("t5 t299", add_special_tokens=False) == [5, 299]
    assert tok.decode([5, 6]) == "t5 t6"


def test_cli_lists_benchmarks():
    out = subprocess.run([sys.executable, "-m", "jaxvllm.entrypoints.cli", "bench", "--help"],
                         capture_output=True, text=True, cwd=ROOT, env=C.child_env())
    assert out.returncode == 0, out.stderr
    for name in ("throughput", "latency", "serve", "startup"):
        assert name in out.stdout


def test_throughput_jaxvllm(tiny_dummy, capsys):
    from jaxvllm.benchmarks import throughput
    assert throughput.main(["--model", tiny_dummy, "--load-format", "dummy", "--dtype", "bfloat16",
                            "--num-prompts", "5", "--input-len", "8:40", "--output-len", "2:12",
                            "--json", *SMALL]) == 0
    res = _json_out(capsys)
    assert res["benchmark"] == "throughput" and len(res["runs"]) == 1
    r = res["runs"][0]
    for k in ("requests_per_s", "output_tokens_per_s", "total_tokens_per_s", "kv_cache_usage_peak",
              "elapsed_s", "num_preemptions"):
        assert k in r, k
    assert r["num_requests"] == 5 and r["output_tokens"] == r["expected_output_tokens"]
    assert 0 < r["kv_cache_usage_peak"] <= 1


def test_throughput_both_backends(tiny_hf, capsys):
    """--backend both: HF generate in a child process, then jaxvllm on the same requests."""
    from jaxvllm.benchmarks import throughput
    assert throughput.main(["--model", tiny_hf, "--backend", "both", "--num-prompts", "4",
                            "--hf-num-prompts", "3", "--hf-batch-size", "2", "--input-len", "4:20",
                            "--output-len", "3:6", "--json", *SMALL]) == 0
    res = _json_out(capsys)
    jx, hf = res["runs"]
    assert (jx["backend"], hf["backend"]) == ("jaxvllm", "hf")
    assert hf["num_requests"] == 3 and hf["output_tokens_per_s"] > 0
    assert res["speedup_output_tok_s"] > 0


def test_latency(tiny_dummy, capsys):
    from jaxvllm.benchmarks import latency
    assert latency.main(["--model", tiny_dummy, "--load-format", "dummy", "--dtype", "bfloat16",
                         "--batch-size", "2", "--input-len", "12", "--output-len", "4",
                         "--iters", "2", "--warmup-iters", "1", "--bandwidth-bytes", str(8 << 20),
                         "--json", *SMALL]) == 0
    res = _json_out(capsys)
    for k in ("ttft_ms", "tpot_ms", "latency_s", "output_tokens_per_s", "decode_tokens_per_s",
              "roofline_tokens_per_s", "bandwidth_tbs", "param_bytes"):
        assert res[k] is not None and res[k] > 0, k
    assert len(res["per_iter"]) == 2 and all(x["output_tokens"] == 8 for x in res["per_iter"])
    gemv = res["gemv_bandwidth_tbs"]
    assert set(gemv) == {"4096x6144", "4096x4096", "4096x28672", "14336x4096"}
    assert res["roofline_gemv_tokens_per_s"] == pytest.approx(
        2 * max(gemv.values()) * 1e12 / res["step_read_bytes"])
    # Given bandwidth: the roofline is batch / (bytes / bandwidth).
    assert latency.main(["--model", tiny_dummy, "--load-format", "dummy", "--batch-size", "1",
                         "--input-len", "8", "--output-len", "2", "--iters", "1",
                         "--warmup-iters", "0", "--bandwidth-tbs", "2", "--json", *SMALL]) == 0
    res = _json_out(capsys)
    assert res["roofline_tokens_per_s"] == pytest.approx(1 / (res["param_bytes"] / 2e12))


def test_startup_cold_and_warm(tiny_dummy, capsys):
    """Two fresh subprocesses through the bench/startup.py wrapper: cold, then warm."""
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "startup.py"),
                          "--model", tiny_dummy, "--load-format", "dummy", "--dtype", "bfloat16",
                          "--json", *SMALL], capture_output=True, text=True, env=C.child_env(),
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout)
    assert res["cold_s"] > 0 and res["warm_s"] > 0
    for k in ("wall_s", "engine_init_s", "first_token_s", "config_s", "params_s", "tokenizer_s"):
        assert res["cold"][k] > 0 and res["warm"][k] > 0
    assert res["warm"]["tokenizer_wait_s"] >= 0
    # The cold start loads the tokenizer in a child process; the warm one unpickles its cached copy.
    assert (res["cold"]["tokenizer_origin"], res["warm"]["tokenizer_origin"]) == ("child process", "cache")
    # A warm start compiles nothing: every executable comes from the persistent cache.
    assert res["cold"]["cache_misses"] > 0
    assert res["warm"]["cache_hits"] > 0 and res["warm"]["cache_misses"] == 0, res["warm"]


def test_startup_with_data_parallel_replicas(tiny_dummy):
    """bench startup at --data-parallel-size 2 (2 fake CPU devices) reports both replicas' caches."""
    env = {**C.child_env(), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2").strip()}
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "startup.py"),
                          "--model", tiny_dummy, "--load-format", "dummy", "--json",
                          "--data-parallel-size", "2", *SMALL],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout)
    assert res["cold"]["num_gpu_blocks"] == res["warm"]["num_gpu_blocks"] == 2 * 64


SERVE_LOAD = ["--num-prompts", "8", "--input-len", "4:16", "--output-len", "2:6", "--json"]


def _check_serve_run(r: dict, n: int) -> None:
    assert r["completed"] == n and r["failed"] == 0, r["errors"]
    for k in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        assert set(r[k]) == {"mean", "p50", "p90", "p99"}
    assert r["ttft_ms"]["p50"] > 0 and r["requests_per_s"] > 0 and r["output_tokens_per_s"] > 0
    assert 0 <= r["goodput_requests_per_s"] <= r["requests_per_s"]


def test_serve_against_fake_server(capsys):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from fake_engine import FakeEngine
    from jaxvllm.config import EngineArgs
    from jaxvllm.entrypoints.openai.launch import ServerThread
    from jaxvllm.benchmarks import serve
    with ServerThread(EngineArgs(max_model_len=256, max_num_seqs=8),
                      engine_factory=lambda a: FakeEngine(a, token_delay=0.002)) as srv:
        assert serve.main(["--base-url", srv.url, "--request-rates", "50,inf", "--vocab-size", "250",
                           *SERVE_LOAD]) == 0
        res = _json_out(capsys)
        assert [r["request_rate"] for r in res["runs"]] == [50.0, None]  # inf -> null in JSON
        for r in res["runs"]:
            _check_serve_run(r, 8)
            assert r["output_tokens"] >= 16
        # Text prompts, and a duration bound that stops sending early.
        assert serve.main(["--base-url", srv.url, "--prompt-type", "text", "--request-rate", "5",
                           "--duration", "0.5", "--num-prompts", "1000", "--input-len", "4",
                           "--output-len", "3", "--json"]) == 0
        r = _json_out(capsys)["runs"][0]
        assert 0 < r["num_sent"] < 1000 and r["failed"] == 0 and r["send_window_s"] < 1.0


def test_serve_launch_inprocess_real_engine(tiny_dummy, capsys):
    from jaxvllm.benchmarks import serve
    assert serve.main(["--launch", "inprocess", "--model", tiny_dummy, "--load-format", "dummy",
                       "--dtype", "bfloat16", "--request-rate", "inf", *SERVE_LOAD, *SMALL]) == 0
    res = _json_out(capsys)
    assert res["launch"] == "inprocess" and res["base_url"].startswith("http://127.0.0.1:")
    _check_serve_run(res["runs"][0], 8)


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="reads /proc")
def test_serve_reads_a_server_s_cpu_time_by_thread():
    """The launched server's CPU seconds, split into its main thread's (the event loop) and its
    other threads': work on another thread counts there, not in the main thread's."""
    import threading
    from jaxvllm.benchmarks import serve
    assert serve._server_cpu_s(None) is None
    burnt, release = threading.Event(), threading.Event()

    def burn() -> None:  # stays alive until read: an exited thread's time leaves /proc with it
        sum(i * i for i in range(3_000_000))
        burnt.set()
        release.wait()
    t = threading.Thread(target=burn)
    before = serve._server_cpu_s(os.getpid())
    t.start()
    burnt.wait()
    after = serve._server_cpu_s(os.getpid())
    release.set()
    t.join()
    assert after["other_threads"] - before["other_threads"] >= 0.05
    assert after["event_loop"] - before["event_loop"] < 0.05


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="reads /proc")
def test_serve_cpu_time_survives_a_thread_exiting_while_read(monkeypatch):
    """A thread listed in /proc/<pid>/task that exits before its stat is read is left out, not
    the whole reading (a busy server starts and ends threads)."""
    from jaxvllm.benchmarks import serve
    listdir = os.listdir
    monkeypatch.setattr(os, "listdir", lambda path: listdir(path) + ["999999999"])
    out = serve._server_cpu_s(os.getpid())
    assert out is not None and out["event_loop"] > 0


def test_serve_rejects_non_url():
    from jaxvllm.benchmarks import serve
    with pytest.raises(SystemExit):
        serve.main(["--base-url", "localhost:8000", "--no-warmup"])


def test_collectives_reports_each_flag_set():
    """bench/collectives.py on 2 fake CPU devices: a timing per token count for a working flag set,
    and an unknown flag set reported as a failure (not dropped)."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    env["PYTHONPATH"] = ROOT
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "collectives.py"), "--json",
                          "--tokens", "1", "4", "--chain", "4", "--reps", "2",
                          "--flag-sets", "default,no-such-set"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    assert [r["tokens"] for r in res["default"]["rows"]] == [1, 4]
    assert all(r["chain_us"] > 0 for r in res["default"]["rows"])
    assert "error" in res["no-such-set"]


def test_request_parsing_times_every_body():
    """bench/request_parsing.py: a time per body, the good bodies accepted and the bad refused (the
    script asserts which is which before timing)."""
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "request_parsing.py"), "--json",
                          "--iters", "5", "--repeats", "1"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    assert len(res) >= 7 and all(r["us_per_request"] > 0 for r in res.values())


def test_structured_outputs_bench_reports_both_ways():
    """bench/structured_outputs.py on the default model: TPOT with and without the constraint, and
    the constrained requests ran their full length (the schema cannot complete)."""
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "structured_outputs.py"),
                          "--json", "--batch-sizes", "4", "--input-len", "8", "--output-len", "6",
                          "--max-model-len", "128", "--max-num-seqs", "4",
                          "--max-num-batched-tokens", "32", "--token-buckets", "8", "32",
                          "--enforce-eager", "--dtype", "float32"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout)["4"]
    assert res["unconstrained"]["tpot_ms"] > 0 and res["constrained"]["tpot_ms"] > 0
    assert res["constrained"]["finish_reasons"] == ["length"]
    assert res["constrained"]["output_tokens"] == 4 * 6
    host = res["constrained"]["host_ms_per_step"]
    assert host["mask_fill"] > 0 and host["update"] > 0 and host["device_wait"] > 0


def test_research_bench_times_lora_and_a_sleep_cycle(tiny_dummy):
    """bench/research.py with LoRA on: TPOT with and without an adapter, then a sleep/wake cycle
    at both levels that gave the device memory back and took it again."""
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "research.py"),
                          "--model", tiny_dummy, "--load-format", "dummy", "--dtype", "float32",
                          "--enable-lora", "--max-lora-rank", "4", "--batch-sizes", "2",
                          "--input-len", "8", "--output-len", "4", "--json", *SMALL],
                         capture_output=True, text=True, env=C.child_env(), timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout)
    assert res["tpot"]["2"]["tpot_ms"] > 0 and res["tpot"]["2"]["tpot_ms_adapter"] > 0
    s = res["sleep"]
    assert s["gib_asleep1"] < s["gib_awake"] and s["gib_asleep2"] < s["gib_awake"]
    assert s["gib_woken"] == pytest.approx(s["gib_awake"])
    assert s["sleep1_s"] > 0 and s["wake1_s"] > 0 and s["tpot_ms_after_wake"] > 0


def test_spec_decode_bench_compares_with_plain_decoding(tiny_dummy, tmp_path):
    """bench/spec_decode.py: plain (async and synchronous) and speculative rows, each engine in a
    process of its own, with per-step phase times; greedy output the same in every row; nothing
    compiled while timed (the warm-up runs the prompts from the prefix cache too). With
    --grow-to the model runs grown to the config's shape, and speculative output is plain's in
    batch-invariant mode, which every engine of the run takes."""
    target = tmp_path / "grown"
    target.mkdir()
    (target / "config.json").write_text(json.dumps({**TINY, **GROWN}))
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "spec_decode.py"),
                          "--model", tiny_dummy, "--load-format", "dummy", "--dtype", "float32",
                          "--max-model-len", "512", "--output-len", "12", "--k", "2",
                          "--sync-baseline", "--phases", "--grow-to", str(target),
                          "--batch-invariant", "--output-json", str(tmp_path / "r.json")],
                         capture_output=True, text=True, env=C.child_env(), timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads((tmp_path / "r.json").read_text())
    assert [r["k"] for r in rows] == [0, -1, 2] and all(r["batch_invariant"] for r in rows)
    assert all(r["decode_tok_s"] > 0 and r["phases_ms"]["step"] > 0 for r in rows)
    assert all(r["compiled_while_timed"] == [] for r in rows), rows
    table = [line for line in out.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(table) == 4 and all(line.endswith("| True | - |") for line in table[1:]), out.stdout
    assert f"grown to {target}, batch-invariant" in out.stdout


def test_spec_decode_bench_says_where_outputs_first_differ():
    """Where a row's greedy output differs from plain decoding's: the prompt, the token, and plain
    decoding's gap between its two likeliest tokens there (a length difference counts too)."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import spec_decode
    plain = {"tokens": [[1, 2, 3], [4, 5], [6, 7]], "gaps": [[0.5, 0.01, 0.2], [1.0, 2.0], [3.0, 4.0]]}
    assert spec_decode._differences(plain, {"tokens": [[1, 2, 4], [4, 5], [6, 7, 8]]}) == (
        "0, 2, 0.200; 2, 2, nan")
    assert spec_decode._differences(plain, {"tokens": plain["tokens"]}) == "-"


GROWN = dict(hidden_size=128, intermediate_size=320, num_hidden_layers=3, num_attention_heads=8,
             num_key_value_heads=2, head_dim=32)


def test_a_grown_model_computes_what_the_small_one_does():
    """bench/grow.py: a random small Llama (norm weights away from 1, tied embeddings) grown to
    larger hidden and intermediate sizes, head size, heads per KV group, KV heads and layers gives
    the same greedy tokens and logprobs (float32); targets it cannot be grown to are refused."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import grow
    from converters import init_dummy_params
    from jaxvllm import LLM, SamplingParams
    from jaxvllm.models.config import ModelConfig
    small = {**TINY, "hidden_size": 48, "intermediate_size": 96, "num_attention_heads": 6,
             "num_key_value_heads": 2, "tie_word_embeddings": True, "vocab_size": 256}
    cfg = ModelConfig.from_hf(small)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda x: jnp.asarray(
        rng.normal(1.0, 0.3, x.shape) if x.ndim == 1 else rng.normal(0, 0.5, x.shape), jnp.float32),
        init_dummy_params(cfg, "float32"))
    grown, grown_cfg = grow.grow(params, cfg, GROWN, jnp.float32)
    assert grown["layers"][2]["q"].shape == (128, 256) and grown["lm_head"].shape == (128, 256)
    engine = dict(max_model_len=256, max_num_seqs=4, max_num_batched_tokens=64, dtype="float32",
                  enforce_eager=True, num_gpu_blocks_override=64)
    sp = SamplingParams(temperature=0.0, max_tokens=16, logprobs=1, ignore_eos=True)
    prompt = [{"prompt_token_ids": [5, 17, 33, 99, 4, 200, 7]}]
    a, b = (LLM.from_params(p, c, **engine).generate(prompt, sp, use_tqdm=False)[0].outputs[0]
            for p, c in ((params, small), (grown, grown_cfg)))
    assert a.token_ids == b.token_ids and len(set(a.token_ids)) > 4
    assert max(abs(x[t].logprob - y[t].logprob)
               for x, y, t in zip(a.logprobs, b.logprobs, a.token_ids)) < 1e-4
    for bad, match in (({"hidden_size": 32}, "hidden_size 32 is smaller"),
                       ({"head_dim": 20}, "head_dim 20 is not a multiple"),
                       ({"num_attention_heads": 4}, "query heads per KV head 2 is smaller")):
        with pytest.raises(ValueError, match=match):
            grow.grown_config(cfg, {**GROWN, **bad})


def test_quant_quality_bench(tiny_dummy, tmp_path):
    """bench/quant_quality.py on random weights: each scheme against the bf16 model, a row each
    (FP8 weights, the FP8 KV cache, and the weights written as AWQ, GPTQ with activation order and
    8-bit GPTQ and W8A8 INT8 checkpoints); the GGUF schemes want a GGUF model."""
    script = os.path.join(ROOT, "bench", "quant_quality.py")
    schemes = ["fp8", "fp8-kv", "awq", "gptq-act-order", "gptq8", "w8a8-int8"]
    out = subprocess.run([sys.executable, script, "--model", tiny_dummy, "--load-format", "dummy",
                          "--schemes", *schemes, "--output-len", "4",
                          "--output-json", str(tmp_path / "q.json")],
                         capture_output=True, text=True, env=C.child_env(), timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads((tmp_path / "q.json").read_text())
    assert list(rows) == schemes
    for r in rows.values():  # quantized: not the reference's logprobs, but close to them
        assert 0 < r["mean_abs_delta"] <= r["max_abs_delta"] < 1.0 and r["tokens_scored"] == 138
        assert 0 <= r["greedy_same"] <= r["prompts"] == 6
    assert rows["gptq8"]["mean_abs_delta"] < rows["gptq-act-order"]["mean_abs_delta"]  # 8 bits
    for s in ("awq", "gptq-act-order", "gptq8", "w8a8-int8"):  # the int paths hold what is stored
        assert rows[s]["own_values"]["mean_abs_delta"] < rows[s]["mean_abs_delta"] / 2
        assert rows[s]["own_values"]["greedy_same"] >= 5
    assert "own_values" not in rows["fp8"]
    refused = subprocess.run([sys.executable, script, "--model", tiny_dummy, "--load-format",
                              "dummy", "--schemes", "gguf-q8_0"],
                             capture_output=True, text=True, env=C.child_env(), timeout=300)
    assert refused.returncode == 2 and "take a GGUF model" in refused.stderr


def test_quant_quality_fp8_checkpoint_schemes(tiny_hf, tmp_path):
    """bench/quant_quality.py's FP8-checkpoint schemes: the model written as FP8 checkpoints (a
    scale per tensor, 128x128 blocks) and their dequantized twins, each loaded and scored against
    the model."""
    import math
    import shutil
    from hf_builders import save_word_tokenizer
    model = tmp_path / "model"
    shutil.copytree(tiny_hf, model)
    save_word_tokenizer(model, TINY["vocab_size"])
    schemes = ["fp8-tensor-checkpoint", "fp8-tensor-requantized", "fp8-block-checkpoint",
               "fp8-block-dequantized"]
    script = os.path.join(ROOT, "bench", "quant_quality.py")
    out = subprocess.run([sys.executable, script, "--model", str(model), "--schemes", *schemes,
                          "--output-len", "4", "--output-json", str(tmp_path / "q.json")],
                         capture_output=True, text=True, env=C.child_env(), timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads((tmp_path / "q.json").read_text())
    assert list(rows) == schemes
    for r in rows.values():  # each weights' rounding moves the logprobs, a little
        assert 0 < r["mean_abs_delta"] <= r["max_abs_delta"] < 1.0 and r["tokens_scored"] > 0
        assert math.isfinite(r["greedy_prefix_kept"])


def test_quant_quality_writes_checkpoints_of_the_model(tiny_hf, tmp_path, monkeypatch):
    """The checkpoints those schemes score: each FP8 twin holds the model's weights within e4m3's
    rounding under its scales, and each FP8 checkpoint loads to its twin's values (the per-tensor
    one as float8 bytes with a scale per output channel, the block one requantized per channel
    from its values); each integer checkpoint unpacks to the weights within a step of its group's
    scale, activation order's groups over a permutation of the inputs."""
    import shutil

    import numpy as np
    from safetensors.numpy import load_file

    from converters import load_model
    from converters.integer import dequantize, int_checkpoint, unpack
    from jaxvllm.models.quant import quantize_fp8
    from hf_builders import save_word_tokenizer
    monkeypatch.syspath_prepend(os.path.join(ROOT, "bench"))
    from quant_quality import _INT, write_checkpoints
    model = tmp_path / "model"
    shutil.copytree(tiny_hf, model)
    save_word_tokenizer(model, TINY["vocab_size"])
    kinds = {"tensor", "tensor/twin", "block", "block/twin", *_INT}
    dirs = write_checkpoints(str(model), str(tmp_path / "out"), kinds)
    load = lambda d: load_model(d, dtype="float32", cache_dir=None, load_tokenizer=False).params
    ref = load(str(model))["layers"]
    for layout in ("tensor", "block"):
        got, twin = load(dirs[layout])["layers"], load(dirs[layout + "/twin"])["layers"]
        for lg, lt, lr in zip(got, twin, ref):
            for k in ("q", "k", "v", "o", "gate", "up", "down"):
                w, t = np.asarray(lr[k]), np.asarray(lt[k])
                assert np.all(np.abs(t - w) <= np.abs(w) / 16 + np.abs(w).max() / 448 / 512), k
                if layout == "tensor":
                    q, scale = np.asarray(lg[k]).astype(np.float32), np.asarray(lg[k + "_scale"])
                    np.testing.assert_array_equal((q * scale[:, None]).T, t, err_msg=k)
                else:  # requantized per output channel from the values the blocks hold
                    q, scale = quantize_fp8(lt[k])
                    np.testing.assert_array_equal(np.asarray(lg[k]).view(np.uint8),
                                                  np.asarray(q).view(np.uint8), err_msg=k)
                    np.testing.assert_array_equal(np.asarray(lg[k + "_scale"]), np.asarray(scale))
    hf = load_file(os.path.join(tiny_hf, "model.safetensors"))
    for kind in _INT:
        with open(os.path.join(dirs[kind], "config.json")) as f:
            fmt = int_checkpoint(json.load(f))
        group = -1 if fmt.method == "compressed-tensors" else 64  # W8A8: per output channel
        assert (fmt.method, fmt.bits, fmt.group_size) == (*_INT[kind][:2], group)
        tensors = load_file(os.path.join(dirs[kind], "model.safetensors"))
        for prefix in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
            parts = {p: tensors[f"{prefix}.{p}"] for p in fmt.parts if f"{prefix}.{p}" in tensors}
            unpacked = unpack(fmt, f"{prefix}.{fmt.parts[0]}", parts, kind)
            if "down" in prefix:  # two groups (q_proj has one: no order to permute)
                assert (unpacked.perm is not None) == (kind == "gptq-act-order")
            w = hf[prefix + ".weight"].astype(np.float32)
            step = np.repeat(unpacked.scale, w.shape[1] // unpacked.scale.shape[1], axis=1)
            if unpacked.perm is not None:
                step = step[:, np.argsort(unpacked.perm)]
            assert np.all(np.abs(dequantize(unpacked) - w) <= step * 1.001), (kind, prefix)


def test_quant_quality_requantizes_a_gguf(tmp_path, monkeypatch):
    """The gguf-<type> schemes' file: the projections requantized to the type, within its rounding
    of the values they held; every other tensor's bytes and every metadata field as they were."""
    import gguf
    import numpy as np
    from test_gguf_quant import _tiny_gguf
    monkeypatch.syspath_prepend(os.path.join(ROOT, "bench"))
    from quant_quality import GGUF_PROJECTIONS, write_gguf
    src = _tiny_gguf(tmp_path, "qwen2", {"attn_q": gguf.GGMLQuantizationType.Q4_1}, inter=96)
    a = gguf.GGUFReader(src)
    b = gguf.GGUFReader(write_gguf(src, str(tmp_path / "q8.gguf"), "Q8_0"))
    fields = lambda r: {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    assert fields(a) == fields(b)
    projections = 0
    for x, y in zip(a.tensors, b.tensors, strict=True):
        assert x.name == y.name
        if x.name.endswith(".weight") and x.name.split(".")[-2] in GGUF_PROJECTIONS:
            projections += 1
            assert y.tensor_type == gguf.GGMLQuantizationType.Q8_0
            w = gguf.quants.dequantize(x.data, x.tensor_type)
            got = gguf.quants.dequantize(y.data, y.tensor_type)
            blocks = np.abs(w).reshape(-1, 32).max(1, keepdims=True) / 127
            assert np.all(np.abs(got - w).reshape(-1, 32) <= blocks * 0.57)  # d in float16
        else:
            assert y.tensor_type == x.tensor_type
            np.testing.assert_array_equal(np.asarray(y.data), np.asarray(x.data))
    assert projections == 14


def test_read_ceiling_bench(tmp_path):
    """bench/read_ceiling.py: JAX's copy, read and GEMM-chain rates, PyTorch's beside them where it
    runs on a GPU (not on a CPU: nan there)."""
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "read_ceiling.py"), "--gib", "0.02",
                          "--output-json", str(tmp_path / "r.json")],
                         capture_output=True, text=True, env=C.child_env(), timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads((tmp_path / "r.json").read_text())
    assert set(res["jax_tbs"]) == {"copy", "read", *(f"GEMM rows {r}, {k}x{n}" for r in (1, 8)
                                                     for k, n in C.GEMV_SHAPES)}
    assert all(v > 0 for v in res["jax_tbs"].values()) and res["torch_tbs"] == {}
    assert "| GEMM rows 8, 4096x28672 |" in out.stdout


def test_spec_decode_bench_with_a_draft_model(tiny_dummy, tmp_path):
    """--draft-model: the guesses come from it (the dummy model as its own draft: most kept)."""
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "spec_decode.py"),
                          "--model", tiny_dummy, "--load-format", "dummy", "--dtype", "float32",
                          "--max-model-len", "512", "--output-len", "12", "--k", "3",
                          "--draft-model", tiny_dummy, "--output-json", str(tmp_path / "r.json")],
                         capture_output=True, text=True, env=C.child_env(), timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads((tmp_path / "r.json").read_text())
    assert [r["k"] for r in rows] == [0, 3]
    assert rows[1]["kept"] > 0.8 * rows[1]["guesses"] > 0
    assert f"guesses from {tiny_dummy}" in out.stdout


def test_host_step_times_each_phase(tmp_path):
    """bench/host_step.py: per row count, each phase's ms per step, the engine thread's own time
    (its steps less the wait for the device) and the garbage collector's counts."""
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "host_step.py"),
                          "--rows", "4", "8", "--steps", "3", "--warmup-steps", "2",
                          "--output-json", str(tmp_path / "r.json")],
                         capture_output=True, text=True, env=C.child_env(), timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads((tmp_path / "r.json").read_text())
    assert [r["rows"] for r in rows] == [4, 8]
    for r in rows:
        ms = r["ms"]
        assert ms["step"] > ms["own"] > 0 and ms["fetch"] > 0
        assert ms["own"] >= ms["schedule"] + ms["dispatch"] + ms["update"] + ms["outputs"]
        assert len(r["gc_collections_per_step"]) == 3 and r["gc_objects"] > 0
    assert out.stdout.count("\n| ") == 4  # header, rule and a row per row count


def test_target_rows_runs_each_row_and_reads_its_figures(tiny_dummy, tmp_path):
    """bench/target_rows.py --quick: each chosen row is its benchmark's run, its figures read from
    that run's JSON and judged against the row's target; --work-dir keeps each row's JSON and the
    rows' compilation cache; a row whose run fails says so and the script exits non-zero."""
    def rows(*argv):
        out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "target_rows.py"),
                              "--model", tiny_dummy, "--load-format", "dummy", "--dtype",
                              "float32", "--quick", "--output-json", str(tmp_path / "r.json"),
                              *argv], capture_output=True, text=True, env=C.child_env(),
                             timeout=600)
        return out, json.loads((tmp_path / "r.json").read_text())["rows"]
    out, res = rows("--rows", "batch-1,fp8-batch-1,serve-16,spec", "--work-dir",
                    str(tmp_path / "w"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert list(res) == ["batch-1", "fp8-batch-1", "serve-16", "spec"]
    for name in res:
        assert json.loads((tmp_path / "w" / f"{name}.json").read_text()) == res[name]["result"]
    assert any((tmp_path / "w" / "jax").iterdir())
    batch1 = res["batch-1"]
    assert batch1["figures"][0] == ["decode tok/s", batch1["result"]["decode_tokens_per_s"]]
    assert batch1["met"] is (batch1["result"]["decode_tokens_per_s"] >= 250)
    fp8 = res["fp8-batch-1"]  # FP8 weights, judged against the bf16 row of the same run
    assert fp8["result"]["param_bytes"] < batch1["result"]["param_bytes"]  # its weights in FP8
    ratio = fp8["result"]["decode_tokens_per_s"] / batch1["result"]["decode_tokens_per_s"]
    assert fp8["figures"][1] == ["x bf16", ratio] and fp8["met"] is (ratio >= 1.6)
    ttft = res["serve-16"]["result"]["runs"][0]["ttft_ms"]["p50"]
    assert res["serve-16"]["figures"][0] == ["TTFT p50 ms", ttft] and ttft > 0
    runs = res["spec"]["result"]  # plain decoding, then k 2, batch-invariant
    assert [r["k"] for r in runs] == [0, 2] and all(r["batch_invariant"] for r in runs)
    speedup = runs[1]["decode_tok_s"] / runs[0]["decode_tok_s"]
    assert res["spec"]["figures"] == [["k 2 speed-up", speedup],
                                      ["runs with plain's output", int(runs[1]["same_output"])]]
    assert res["spec"]["met"] is (speedup >= 2 and runs[1]["same_output"])
    assert out.stdout.count("\n| ") == 5
    alone = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "target_rows.py"),
                            "--rows", "int4-batch-1", "--quick"], capture_output=True, text=True,
                           env=C.child_env(), timeout=60)
    assert alone.returncode != 0 and "compares with row batch-1" in alone.stderr
    out, res = rows("--rows", "batch-1", "--", "--max-num-seqs", "0")
    assert out.returncode == 1 and "error" in res["batch-1"] and "exit" in out.stdout


def test_step_profile_accounts_for_every_step(tiny_dummy, tmp_path):
    """bench/step_profile.py: every step lands in one kind and one bucket row, the kinds' seconds
    add up to the run, each step has a roofline, and the host profile covers its window."""
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "step_profile.py"),
                          "--model", tiny_dummy, "--load-format", "dummy", "--dtype", "float32",
                          "--num-prompts", "6", "--input-len", "8:40", "--output-len", "4:12",
                          "--peak-tflops", "1", "--bandwidth-tbs", "0.1", "--host-profile", "2:3",
                          "--output-json", str(tmp_path / "r.json"), *SMALL],
                         capture_output=True, text=True, env=C.child_env(), timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads((tmp_path / "r.json").read_text())
    kinds = {k["group"]: k for k in res["kinds"]}
    parts = [k for name, k in kinds.items() if name != "all"]
    assert sum(k["steps"] for k in parts) == kinds["all"]["steps"] == sum(
        b["steps"] for b in res["buckets"])
    assert abs(sum(k["seconds"] for k in parts) - kinds["all"]["seconds"]) < 1e-6
    assert kinds["all"]["seconds"] <= res["elapsed_s"] + 1e-6
    assert "decode only" in kinds and all(0 < k["of_roofline"] for k in parts)
    assert res["host_profile"].count("llm_engine.py") and res["output_tokens_per_s"] > 0


def test_quant_gemm_bench_times_every_format(tmp_path):
    """bench/quant_gemm.py on a tiny dense config: every format timed, each within its
    quantization error of bf16."""
    from hf_builders import tiny_config
    tiny_config("llama", hidden_size=64, intermediate_size=128, num_attention_heads=4,
                num_key_value_heads=2).save_pretrained(tmp_path)
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "quant_gemm.py"), "--json",
                          "--model", str(tmp_path), "--tokens", "24", "--group-size", "32"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout)["tokens"]
    for t in ("24",):
        assert all(res[t][w + "_us"] > 0 for w in ("bf16", "fp8", "int4", "int4_xla_dequant",
                                                   "q8_0", "q8_0_xla_dequant"))
        assert 0 < res[t]["fp8_max_rel_diff"] < 0.1
        assert 0 < res[t]["int4_max_rel_diff"] < 0.3
        assert 0 < res[t]["int4_xla_dequant_max_rel_diff"] < 0.3
        assert 0 < res[t]["q8_0_max_rel_diff"] < 0.02
        assert 0 < res[t]["q8_0_xla_dequant_max_rel_diff"] < 0.02
    # --mlp: the FP8 gated MLP with its Pallas activation pass (interpreted) and without; the
    # same program in the decode buckets, FP8's rounding apart past them.
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "quant_gemm.py"), "--json",
                          "--model", str(tmp_path), "--tokens", "8", "40", "--mlp"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout)
    assert res["8"]["max_rel_diff"] == 0 and 0 < res["40"]["max_rel_diff"] < 0.06
    assert all(res[t][k] > 0 for t in ("8", "40") for k in (
        "engine_us", "xla_us", "activation_kernel_us", "activation_reference_us"))
    # --sweep: the int8 GEMM's tilings (interpret mode here), the default among them.
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "quant_gemm.py"), "--json",
                          "--model", str(tmp_path), "--tokens", "1", "48", "--sweep", "--top", "3"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout)
    for t in ("1", "48"):
        best = res[t]["best"]
        assert len(best) == 3 and best[0]["us"] <= res[t]["default_us"]
        assert res[t]["xla_dequant_us"] > 0
        assert [b["us"] for b in best] == sorted(b["us"] for b in best)


def test_moe_bench_compares_the_ways(tmp_path):
    """bench/moe.py on a tiny mixture-of-experts config: the ways it times on the CPU (the engine's,
and XLA's ragged_dot as the reference) agree, over bf16, FP8 and int4 experts (the last in
activation order, which takes --int4)."""
    from hf_builders import tiny_config
    tiny_config("qwen3_moe", hidden_size=64, num_attention_heads=4, head_dim=16, num_experts=8,
                num_experts_per_tok=2, moe_intermediate_size=32).save_pretrained(tmp_path)
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "moe.py"), "--json",
                          "--model", str(tmp_path), "--tokens", "1", "16"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout)["tokens"]
    for t in ("1", "16"):
        assert res[t]["engine_us"] > 0 and res[t]["xla_ragged_dot_us"] > 0
        assert res[t]["engine_max_rel_diff"] < 1e-2
    for experts in (["--fp8"], ["--int4", "--act-order"]):
        quant = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "moe.py"), "--json",
                                *experts, "--model", str(tmp_path), "--tokens", "4"],
                               capture_output=True, text=True, timeout=600)
        assert quant.returncode == 0, quant.stderr[-3000:]
        got = json.loads(quant.stdout)["tokens"]["4"]
        assert got["engine_us"] > 0 and got["engine_max_rel_diff"] < 1e-2
    bad = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "moe.py"), "--act-order",
                          "--model", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert bad.returncode == 1 and "it takes --int4" in bad.stderr
