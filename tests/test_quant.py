"""FP8 weights (W8A8, models/quant.py): the quantizer and the FP8 linear layer against float64
references, the engine arguments, and the default model quantized on load against itself in bf16."""
import collections
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvllm.config import TRITON_GEMM_MAX_TOKENS
from jaxvllm.models.quant import fp8_linear, quantize_fp8, quantize_params
from pallas_kernels import fp8_matmul_reference
from pallas_kernels.fp8_gemm import Tiles, fp8_matmul, one_row_tiles
from pallas_kernels.reference import FP8_MAX


def _f64(a):
    return np.asarray(jnp.asarray(a).astype(jnp.float32), np.float64)


def test_quantize_round_trip_per_output_channel():
    w = jax.random.normal(jax.random.key(0), (96, 40)) * jnp.linspace(0.01, 30.0, 40)
    w = w.at[:, 7].set(0.0)  # an all-zero channel
    q, scale = quantize_fp8(w)
    assert q.dtype == jnp.float8_e4m3fn and q.shape == (40, 96)  # [out, in]
    assert scale.shape == (40,) and scale.dtype == jnp.float32
    qf = _f64(q).T
    # Each channel's largest magnitude lands on the format's largest value.
    np.testing.assert_array_equal(np.abs(qf).max(0)[np.arange(40) != 7], FP8_MAX)
    assert not qf[:, 7].any()
    deq, ref = qf * _f64(scale), _f64(w)
    # e4m3: 3 mantissa bits (relative error <= 2^-4), subnormal spacing 2^-9 of the scale.
    assert (np.abs(deq - ref) <= 2.0 ** -4 * np.abs(ref) + 2.0 ** -9 * _f64(scale) + 1e-30).all()


def test_fp8_linear_against_float64():
    """Past TRITON_GEMM_MAX_TOKENS: W8A8, each row of x quantized with its own scale."""
    rows = TRITON_GEMM_MAX_TOKENS + 7
    w = jax.random.normal(jax.random.key(1), (128, 48)) * 0.05
    x = jax.random.normal(jax.random.key(2), (rows, 128), jnp.bfloat16) * 3.0
    x = x.at[3].set(0.0)  # a padding row: zeros in, zeros out
    q, scale = quantize_fp8(w)
    y = fp8_linear(x, q, scale)
    assert y.dtype == jnp.bfloat16 and y.shape == (rows, 48)
    # Exactly the quantized operands' product (float64), up to the bf16 output rounding.
    xs = np.abs(_f64(x)).max(-1, keepdims=True) / FP8_MAX
    xs = np.where(xs > 0, xs, 1e-12 / FP8_MAX)
    xq = _f64(jnp.clip(jnp.asarray(_f64(x) / xs, jnp.float32), -FP8_MAX, FP8_MAX)
              .astype(jnp.float8_e4m3fn))
    exact = (xq * xs) @ (_f64(q).T * _f64(scale))
    np.testing.assert_allclose(_f64(y), exact, rtol=2 ** -7, atol=1e-3 * np.abs(exact).max())
    assert not _f64(y)[3].any()
    # And close to the unquantized product (FP8's error, a few percent).
    full = _f64(x) @ _f64(w)
    assert np.abs(_f64(y) - full).max() < 0.06 * np.abs(full).max()


@pytest.mark.parametrize("lead", [(1,), (TRITON_GEMM_MAX_TOKENS,), (2, 3)])
def test_fp8_linear_small_batches_are_weight_only(lead):
    """Up to TRITON_GEMM_MAX_TOKENS rows x is not quantized: exactly x times the dequantized weight."""
    w = jax.random.normal(jax.random.key(5), (128, 48)) * 0.05
    x = jax.random.normal(jax.random.key(6), (*lead, 128), jnp.bfloat16) * 3.0
    q, scale = quantize_fp8(w)
    y = fp8_linear(x, q, scale)
    assert y.dtype == jnp.bfloat16 and y.shape == (*lead, 48)
    exact = _f64(x) @ (_f64(q).T * _f64(scale))
    np.testing.assert_allclose(_f64(y), exact, rtol=2 ** -7, atol=1e-3 * np.abs(exact).max())


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 8, 16, 32, 64, 512])
def test_gpu_fp8_linear_reads_the_fp8_weight_where_it_lies(tokens):
    """Compiled as the engine compiles each bucket (Triton GEMMs up to TRITON_GEMM_MAX_TOKENS,
    cuBLAS beyond): the GEMM reads the FP8 weight as it is stored, never a transposed or upcast
    copy made first (an [in, out] weight was transposed on every call; a weight-only GEMM on cuBLAS
    would upcast it to bf16 in memory); past the weight-only rows the GEMM is cuBLASLt's FP8 GEMM.
    The result matches the unquantized product."""
    import re
    w = jax.random.normal(jax.random.key(3), (4096, 1024)) * 0.02
    x = jax.random.normal(jax.random.key(4), (tokens, 4096), jnp.bfloat16)
    q, scale = quantize_fp8(w)
    triton = tokens <= TRITON_GEMM_MAX_TOKENS
    fn = jax.jit(fp8_linear, compiler_options={"xla_gpu_enable_triton_gemm": triton})
    hlo = fn.lower(x, q, scale).compile().as_text()
    entry = hlo[hlo.index("\nENTRY"):]
    entry = entry[:entry.index("\n}")]  # the top-level program: what each kernel reads and writes
    copies = [ln for ln in entry.splitlines()
              if re.search(r" = \w+\[(1024,4096|4096,1024)\]", ln) and "parameter(" not in ln]
    assert not copies, copies
    if tokens > TRITON_GEMM_MAX_TOKENS and not triton:
        gemms = [ln for ln in entry.splitlines() if "custom_call_target=\"__cublas" in ln]
        assert gemms and all("__cublas$lt$matmul$f8" in ln for ln in gemms), entry
    y = _f64(fn(x, q, scale))
    full = _f64(x) @ _f64(w)
    assert np.abs(y - full).max() < 0.06 * np.abs(full).max()


def test_quantize_params_keeps_norms_embeddings_and_routers():
    experts = jax.random.normal(jax.random.key(0), (2, 4, 3))
    params = {"embed": jnp.ones((8, 4)), "final_norm": jnp.ones(4),
              "layers": [{"q": jnp.ones((4, 4)), "q_bias": jnp.ones(4), "input_norm": jnp.ones(4),
                          "router": jnp.ones((4, 2)), "experts_gate": experts,
                          "shared_down": jnp.ones((3, 4))}]}
    out = quantize_params(params, "fp8")
    lp = out["layers"][0]
    assert lp["q"].dtype == jnp.float8_e4m3fn and lp["q_scale"].shape == (4,)
    assert lp["shared_down"].dtype == jnp.float8_e4m3fn and lp["shared_down"].shape == (4, 3)
    assert lp["shared_down_scale"].shape == (4,)
    for name in ("q_bias", "input_norm", "router"):
        assert lp[name].dtype == jnp.float32 and name + "_scale" not in lp
    # experts keep their [experts, in, out] layout, a scale per expert and output channel
    assert lp["experts_gate"].dtype == jnp.float8_e4m3fn and lp["experts_gate"].shape == (2, 4, 3)
    want = np.abs(np.asarray(experts)).max(axis=1) / 448
    np.testing.assert_allclose(np.asarray(lp["experts_gate_scale"]), want, rtol=1e-6)
    deq = np.asarray(lp["experts_gate"], np.float32) * want[:, None, :]
    np.testing.assert_allclose(deq, np.asarray(experts), rtol=2 ** -4, atol=1e-6)
    assert out["embed"].dtype == jnp.float32 and params["layers"][0]["q"].dtype == jnp.float32
    with pytest.raises(ValueError, match="quantization"):
        quantize_params(params, "int3")


def test_quantizing_with_consume_frees_each_weight_replaced():
    from jaxvllm.models import int4
    from jaxvllm.models.fused import fuse_projections
    layer = {"q": jnp.full((64, 64), 0.1), "down": jnp.full((128, 64), -0.3),
             "k": jnp.ones((64, 64), jnp.float8_e4m3fn), "input_norm": jnp.ones(64)}
    params = {"layers": [layer]}
    kept = quantize_params(params, "fp8")
    out = quantize_params(params, "fp8", consume=True)
    assert layer["q"].is_deleted() and layer["down"].is_deleted()
    # a weight already in FP8 is its own replacement, and what is not quantized is shared
    assert not layer["k"].is_deleted() and out["layers"][0]["k"] is layer["k"]
    assert not layer["input_norm"].is_deleted()
    for name, a in kept["layers"][0].items():
        np.testing.assert_array_equal(np.asarray(a, np.float32),
                                      np.asarray(out["layers"][0][name], np.float32))
    q = int4.quantize_params({"layers": [{n: jnp.full((128, 32), 0.01 * i) for i, n in
                                          enumerate(("q", "k", "v"), 1)}]}, consume=True)
    apart = dict(q["layers"][0])
    fused = fuse_projections(q, consume=True)["layers"][0]
    assert sorted(fused) == ["q+k+v", "q+k+v_scale", "q+k+v_zero"]
    assert all(a.is_deleted() for a in apart.values())


@pytest.mark.parametrize("bad", ["awq_marlin", "FP8", 8])
def test_engine_args_name_the_quantization(bad):
    from jaxvllm.config import EngineArgs
    with pytest.raises(ValueError, match="quantization"):
        EngineArgs(quantization=bad)


_PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ",
            "Water boils at a temperature of", "Once upon a time, in a small village,"]


def _compare(refs, gots) -> tuple[list[float], int]:
    """|delta| of every scored prompt token's logprob, and how many prompts kept their first three
    greedy tokens."""
    deltas, agree = [], 0
    for ref, got in zip(refs, gots):
        assert ref.prompt_token_ids == got.prompt_token_ids
        for a, b, tok in zip(ref.prompt_logprobs[1:], got.prompt_logprobs[1:],
                             ref.prompt_token_ids[1:]):
            deltas.append(abs(a[tok].logprob - b[tok].logprob))
        agree += ref.outputs[0].token_ids[:3] == got.outputs[0].token_ids[:3]
    return deltas, agree


def _default_run(**engine_kw) -> dict:
    """The default model in bf16 (with engine_kw) on _PROMPTS: its outputs (greedy, prompt
    logprobs), its first layer's weight dtypes, its KV cache's dtype and bytes per block."""
    from jaxvllm import LLM, SamplingParams
    from jaxvllm.models.llama import kv_cache_bytes_per_block
    llm = LLM(dtype="bfloat16", max_model_len=128, max_num_seqs=4, max_num_batched_tokens=64,
              num_gpu_blocks_override=64, enforce_eager=True, token_buckets=(8, 64), **engine_kw)
    runner = llm.llm_engine.runner
    outs = llm.generate(_PROMPTS, SamplingParams(temperature=0, max_tokens=8, prompt_logprobs=0),
                        use_tqdm=False)
    return {"outputs": outs,
            "dtypes": {k: w.dtype for k, w in runner.params["layers"][0].items()},
            "kv_dtype": runner.kv_cache[0][0].dtype,
            "kv_block_bytes": kv_cache_bytes_per_block(runner.cfg, 16, runner.config.kv_dtype)}


@pytest.fixture(scope="module")
def bf16_run() -> dict:
    """The unquantized reference both default-model tests compare with (one engine)."""
    return _default_run()


def test_default_model_in_fp8_stays_close_to_bf16(bf16_run):
    """The default model (SmolLM2-135M-Instruct) quantized to FP8 on load against itself in bf16:
    prompt logprobs within a mean |delta| of 0.35 and the same first greedy tokens for most
    prompts. Measured (bench/RESULTS.md, "FP8 weights"): 0.27, where bf16 against float32 is
    already 0.065 for this model; the issue's 0.05 is not met by per-channel FP8 here."""
    fp8 = _default_run(quantization="fp8")
    # q/k/v and gate/up fused at load (models/fused.py), down alone
    assert {fp8["dtypes"][n] for n in ("q+k+v", "gate+up", "down")} == {jnp.dtype(jnp.float8_e4m3fn)}
    assert "q" not in fp8["dtypes"] and fp8["dtypes"]["q+k+v_scale"] == jnp.float32
    assert bf16_run["dtypes"]["q"] == jnp.bfloat16
    deltas, agree = _compare(bf16_run["outputs"], fp8["outputs"])
    assert 0 < np.mean(deltas) <= 0.35, np.mean(deltas)
    assert agree >= 3, agree


def test_fp8_kv_cache_on_the_default_model(bf16_run):
    """kv_cache_dtype="fp8": K/V cached as float8 (half the bytes per block), the default model's
    prompt logprobs within 0.2 on average of the bf16 cache's and the first greedy tokens the same
    for most prompts (measured: 0.125 mean, 0.52 max, bench/RESULTS.md); bad values name the
    field."""
    from jaxvllm.config import EngineArgs
    fp8 = _default_run(kv_cache_dtype="fp8")
    assert fp8["kv_dtype"] == jnp.float8_e4m3fn and bf16_run["kv_dtype"] == jnp.bfloat16
    assert fp8["kv_block_bytes"] * 2 == bf16_run["kv_block_bytes"]
    deltas, agree = _compare(bf16_run["outputs"], fp8["outputs"])
    assert 0 < np.mean(deltas) <= 0.2, np.mean(deltas)
    assert agree >= 3, agree
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        EngineArgs(kv_cache_dtype="int8")


@pytest.mark.parametrize("rows, tiles", [
    (1, Tiles(block_n=32, block_k=64)), (5, Tiles(block_n=32, block_k=64, splits=2)),
    (16, Tiles(block_n=96, block_k=128, splits=1)),
    (1, Tiles(block_n=32, block_k=64, splits=4, mode="fma"))])
def test_fp8_gemm_kernel_against_float64(rows, tiles):
    """The Pallas FP8 GEMM (interpret mode) and its jnp reference are x times the dequantized
    weight, float32 sums."""
    w = jax.random.normal(jax.random.key(7), (256, 96)) * 0.05
    x = jax.random.normal(jax.random.key(8), (rows, 256), jnp.bfloat16)
    q, scale = quantize_fp8(w)
    y = fp8_matmul(x, q, scale, tiles=tiles, interpret=True)
    assert y.dtype == jnp.bfloat16 and y.shape == (rows, 96)
    exact = _f64(x) @ (_f64(q).T * _f64(scale))
    for got in (y, fp8_matmul_reference(x, q, scale)):
        np.testing.assert_allclose(_f64(got), exact, rtol=2 ** -7, atol=1e-3 * np.abs(exact).max())


def test_fp8_gemm_kernel_refuses_what_it_cannot_tile():
    q, scale = quantize_fp8(jnp.ones((256, 96)))
    for rows, tiles in [(17, Tiles(block_n=32)), (1, Tiles(block_n=64)),
                        (2, Tiles(block_n=32, block_k=64, mode="fma")),
                        (1, Tiles(block_n=32, block_k=64, splits=3))]:
        with pytest.raises(ValueError, match="fp8_matmul"):
            fp8_matmul(jnp.ones((rows, 256), jnp.bfloat16), q, scale, tiles=tiles, interpret=True)


@pytest.mark.parametrize("lead", [(1,), (1, 1), (2,)])
def test_fp8_linear_one_row_kernel(lead):
    """With the engine's pallas_gemms, one row goes through the Pallas GEMM (interpret mode here)
    and more rows through XLA, all exactly x times the dequantized weight."""
    w = jax.random.normal(jax.random.key(9), (512, 64)) * 0.05
    x = jax.random.normal(jax.random.key(10), (*lead, 512), jnp.bfloat16)
    q, scale = quantize_fp8(w)
    y = fp8_linear(x, q, scale, kernel=True)
    program = str(jax.make_jaxpr(lambda *a: fp8_linear(*a, kernel=True))(x, q, scale))
    assert ("pallas_call" in program) == (np.prod(lead) == 1)
    exact = _f64(x) @ (_f64(q).T * _f64(scale))
    np.testing.assert_allclose(_f64(y), exact, rtol=2 ** -7, atol=1e-3 * np.abs(exact).max())


@pytest.mark.parametrize("rows", [1, 3])
def test_fp8_projections_fused_at_load(rows):
    """FP8 q/k/v fuse into one weight, their scales side by side, and project as they did apart
    (one row on the Pallas GEMM, more on XLA's); a bf16 projection or one in another format keeps
    the others apart."""
    from jaxvllm.models.fused import fuse_projections
    from jaxvllm.models.int8 import quantize_int8
    from jaxvllm.models.layers import projections
    ws = {n: jax.random.normal(jax.random.key(i), (256, out)) * 0.05
          for i, (n, out) in enumerate((("q", 128), ("k", 64), ("v", 64)))}
    lp = quantize_params({"layers": [ws]}, "fp8")["layers"][0]
    fused = fuse_projections({"layers": [lp]})["layers"][0]
    assert sorted(fused) == ["q+k+v", "q+k+v_scale"] and fused["q+k+v"].shape == (256, 256)
    np.testing.assert_array_equal(fused["q+k+v_scale"],
                                  np.concatenate([lp[n + "_scale"] for n in "qkv"]))
    x = jax.random.normal(jax.random.key(5), (rows, 256), jnp.bfloat16)
    for a, b, n in zip(projections(x, fused, ("q", "k", "v"), (128, 64, 64), pallas=True),
                       projections(x, lp, ("q", "k", "v"), pallas=True), "qkv"):
        np.testing.assert_allclose(_f64(a), _f64(b), rtol=1e-2, atol=1e-4, err_msg=n)
    for other in ({"k": ws["k"]}, dict(zip(("k", "k_scale"), quantize_int8(ws["k"], 64)[:2]))):
        assert "q+k+v" not in fuse_projections({"layers": [{**lp, **other}]})["layers"][0]


def test_one_row_tiles_fit_the_8b_shapes():
    for n, k in [(14336, 4096), (4096, 14336), (4096, 4096), (1024, 4096), (64, 512),
                 (28672, 4096), (6144, 4096)]:  # the last two: gate+up and q+k+v fused
        tiles = one_row_tiles(n, k)
        assert tiles.mode == "fma" and n % tiles.block_n == 0
        assert (k // tiles.block_k) % tiles.splits == 0
    assert one_row_tiles(100, 4096) is None and one_row_tiles(64, 96) is None


@pytest.mark.gpu
@pytest.mark.parametrize("n, k", [(14336, 4096), (4096, 14336), (1024, 4096)])
def test_gpu_fp8_one_row_kernel_against_reference(n, k):
    w = jax.random.normal(jax.random.key(11), (k, n)) * k ** -0.5
    x = jax.random.normal(jax.random.key(12), (1, k), jnp.bfloat16)
    q, scale = quantize_fp8(w)
    got = _f64(jax.jit(fp8_linear, static_argnums=3)(x, q, scale, True))
    exact = _f64(x) @ (_f64(q).T * _f64(scale))
    np.testing.assert_allclose(got, exact, rtol=2 ** -7, atol=1e-3 * np.abs(exact).max())


def _one_request(model: str, quantization: Optional[str] = "fp8") -> tuple[Any, Any]:
    from jaxvllm import LLM, SamplingParams
    llm = LLM(model=model, dtype="float32", quantization=quantization, max_model_len=128,
              max_num_seqs=4, max_num_batched_tokens=64, num_gpu_blocks_override=64,
              enforce_eager=True)
    out = llm.generate([{"prompt_token_ids": [5, 9, 2, 7, 31]}],
                       SamplingParams(temperature=0, max_tokens=6, logprobs=0),
                       use_tqdm=False)[0].outputs[0]
    return llm.llm_engine.runner, out


@pytest.mark.parametrize("on_gpu", [True, False])  # not "gpu": that keyword marks GPU-only tests
def test_one_row_bucket_where_a_quantized_gemm_runs(monkeypatch, on_gpu):
    """The engine adds a bucket of one token for FP8 and for int4 weights (AWQ, GPTQ, GGUF's kept
    types: packed uint8 weights, zero points or mins beside them) on GPUs (one or several: their
    Pallas GEMMs run per device): never for bf16, a CPU, or a GGUF load that kept no packed
    weight."""
    import jax
    from jaxvllm.config import EngineArgs
    from jaxvllm.engine import setup
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu" if on_gpu else "cpu")
    f32, u8 = jnp.zeros(2, jnp.float32), jnp.zeros(2, jnp.uint8)
    dense = {"layers": [{"q": f32, "q_scale": f32}]}
    fits = lambda q, params=dense: setup.one_row_bucket(  # noqa: E731
        EngineArgs(model="m", quantization=q), params)
    assert fits("fp8") is on_gpu
    for offset in ("q_zero", "q+k+v_min"):
        off = u8 if offset.endswith("_zero") else f32
        int4 = {"layers": [{"q": u8, "q_scale": f32, offset: off}]}
        assert fits("awq", int4) is on_gpu
    assert not fits("gguf") and not fits(None)


@pytest.mark.parametrize("quantization", ["fp8", "gptq", "none"])
def test_decode_buckets_run_the_pallas_kernels(monkeypatch, tmp_path, quantization):
    """Where the engine picks its Pallas kernels (on a GPU; forced here, interpreted) a request's
    prompt (5 tokens in the bucket of 8) and its decoding (quantized: a bucket of one token through
    the FP8 or int4 GEMM) run with the tokens and logprobs of XLA's path (float32 activations:
    only the sums' order differs), the decode buckets' GEMM outputs (or, at one row, their slices)
    added up by the epilogue kernels: the rotation and cache write after a fused q+k+v (padding
    rows' slots not written), the residual add and norm after o and down (FP8 at one row: in o's
    and down's GEMMs, the norm finished by the next GEMM, llama._fp8_row_layers). FP8: a tiny
    random Llama quantized on load; int4: a GPTQ checkpoint with q/k/v and gate/up in one
    activation order each (their inputs gathered); none: the same Llama unquantized (q, k and v
    apart: no rotation kernel). The interpreted kernels take seconds a layer."""
    from hf_builders import FAR_FROM_FLAT, tiny_config, tiny_model
    from jaxvllm.engine import setup
    from jaxvllm.models import llama
    from pallas_kernels import decode_epilogue
    if quantization == "gptq":
        from test_int4 import write_int_checkpoint
        # Groups of 32: the kernel's smallest (a reduction step of 16 bytes).
        write_int_checkpoint(str(tmp_path), "llama_gptq_act_order_shared", group=32)
    else:
        tiny_model(tiny_config("llama", vocab_size=256, hidden_size=64, intermediate_size=128,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
                   **FAR_FROM_FLAT).save_pretrained(tmp_path)
    method = "fp8" if quantization == "fp8" else None  # GPTQ: the checkpoint's own
    plain_runner, plain = _one_request(str(tmp_path), method)
    monkeypatch.setattr(setup, "pallas_gemms_fit", lambda: True)
    traced = collections.Counter()
    for module, name in ((decode_epilogue, "rope_write_kv"), (decode_epilogue, "add_rms_norm"),
                         (llama, "fp8_row_add_norm")):
        def counted(*a, _fn=getattr(module, name), _name=name, **kw):
            traced[_name] += 1
            return _fn(*a, **kw)
        monkeypatch.setattr(module, name, counted)
    runner, got = _one_request(str(tmp_path), method)
    assert not plain_runner.cfg.pallas_gemms and plain_runner.token_buckets[0] == 8
    quantized = quantization != "none"
    assert runner.cfg.pallas_gemms and runner.token_buckets[0] == (1 if quantized else 8)
    # Each bucket run (8; quantized also 1) traces the first layer and the others (whose input
    # comes from the kernels) once: a rotation each, a norm after the first layer's attention
    # and two in the others'. FP8's one-row bucket traces one layer for all (the same inputs):
    # a rotation and two GEMM tails.
    fp8 = quantization == "fp8"
    buckets = 2 if quantized and not fp8 else 1
    assert traced["rope_write_kv"] == 2 * buckets * quantized + fp8
    assert traced["add_rms_norm"] == 3 * buckets
    assert traced["fp8_row_add_norm"] == 2 * fp8
    assert got.token_ids == plain.token_ids
    lp = lambda o: [e[t].logprob for e, t in zip(o.logprobs, o.token_ids)]  # noqa: E731
    np.testing.assert_allclose(lp(got), lp(plain), atol=1e-3)
