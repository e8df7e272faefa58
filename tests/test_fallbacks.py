"""Fallbacks say why: a weight-cache entry that cannot be restored, the dtype a quantized GGUF
dequantizes to, a token id the tokenizer cannot decode, the vocabulary bound of request token ids,
and a model without a tokenizer (a 400 naming what to send instead, never a 500)."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from converters import cache as wcache
from converters import load_model
from jaxvllm.config import EngineArgs
from jaxvllm.entrypoints.openai.launch import ServerThread
from jaxvllm.entrypoints.openai.logprobs import decode_token
from fake_engine import FakeEngine
from test_bench import TINY
from test_server_helpers import assert_error, http, real_engine_args


# ---------------------------------------------------------------------------------------------------------
# 1. A weight-cache entry that cannot be restored is logged (entry path and exception), then replaced


def _cached_entry(tmp_path) -> tuple[wcache.WeightCache, str, dict, object]:
    params = {"embed": jnp.arange(12, dtype=jnp.float32).reshape(3, 4), "norm": jnp.ones(4)}
    cache = wcache.WeightCache(str(tmp_path / "weights"))
    assert cache.save("k", params)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                            params)
    return cache, cache.entry("k"), params, abstract


def _drop_leaves(entry: str) -> None:
    meta_path = os.path.join(entry, "meta.json")
    with open(meta_path) as f:
        meta = json.load(f)
    del meta["leaves"]
    with open(meta_path, "w") as f:
        json.dump(meta, f)


def test_cache_restore_failure_names_entry_and_cause(tmp_path, caplog):
    cache, entry, params, abstract = _cached_entry(tmp_path)
    _drop_leaves(entry)  # a KeyError whose text alone ("'leaves'") does not say what failed
    with caplog.at_level(logging.WARNING, logger="converters.cache"):
        assert cache.load("k", abstract) is None
    (rec,) = [r for r in caplog.records if r.name == "converters.cache"]
    assert rec.levelno == logging.WARNING
    assert entry in rec.getMessage() and "KeyError: 'leaves'" in rec.getMessage()
    assert not os.path.exists(entry)
    # the fallback still works: the caller rewrites the entry and the next load restores it
    assert cache.save("k", params)
    restored = cache.load("k", abstract)
    np.testing.assert_array_equal(np.asarray(restored["embed"]), np.asarray(params["embed"]))


def test_cache_entry_that_cannot_be_deleted_is_logged(tmp_path, caplog, monkeypatch):
    cache, entry, _, abstract = _cached_entry(tmp_path)
    _drop_leaves(entry)

    def rmtree(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(wcache.shutil, "rmtree", rmtree)
    with caplog.at_level(logging.WARNING, logger="converters.cache"):
        assert cache.load("k", abstract) is None
    msgs = [r.getMessage() for r in caplog.records if r.name == "converters.cache"]
    assert any("Could not delete" in m and entry in m and "Permission denied" in m for m in msgs), msgs


# ---------------------------------------------------------------------------------------------------------
# 2. dtype "auto" for a GGUF: quantized -> bfloat16 (logged); unquantized keeps its float type


def _tiny_gguf(path, matrix_type) -> str:
    """A one-block llama GGUF whose matrices are `matrix_type`, except ffn_down, stored as F16."""
    import gguf

    T = gguf.GGMLQuantizationType
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_context_length(128)
    w.add_embedding_length(64)
    w.add_feed_forward_length(128)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    rng = np.random.default_rng(0)
    shapes = {"token_embd.weight": (64, 64), "blk.0.attn_q.weight": (64, 64),
              "blk.0.attn_k.weight": (32, 64), "blk.0.attn_v.weight": (32, 64),
              "blk.0.attn_output.weight": (64, 64), "blk.0.ffn_gate.weight": (128, 64),
              "blk.0.ffn_up.weight": (128, 64), "blk.0.ffn_down.weight": (64, 128),
              "output.weight": (64, 64)}
    for name, shape in shapes.items():
        m = (0.02 * rng.standard_normal(shape)).astype(np.float32)
        if name == "blk.0.ffn_down.weight" or matrix_type == T.F16:
            w.add_tensor(name, m.astype(np.float16))
        elif matrix_type == T.F32:
            w.add_tensor(name, m)
        else:
            w.add_tensor(name, gguf.quants.quantize(m, matrix_type), raw_dtype=matrix_type)
    for name in ("blk.0.attn_norm.weight", "blk.0.ffn_norm.weight", "output_norm.weight"):
        w.add_tensor(name, np.ones(64, np.float32))  # vectors do not count towards the dtype
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def _load(path: str, dtype: str = "auto"):
    return load_model(path, dtype=dtype, cache_dir=None, load_tokenizer=False)


def test_quantized_gguf_auto_is_bfloat16(tmp_path, caplog):
    import gguf

    q = _tiny_gguf(tmp_path / "q8.gguf", gguf.GGMLQuantizationType.Q8_0)
    with caplog.at_level(logging.INFO, logger="converters.gguf_loader"):
        m = _load(q)
    assert m.config.dtype == "bfloat16"
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(m.params))
    (rec,) = [r for r in caplog.records if r.name == "converters.gguf_loader"]
    assert rec.levelno == logging.INFO
    msg = rec.getMessage()
    assert q in msg and "Q8_0" in msg and "bfloat16" in msg and "--dtype float32" in msg
    # an explicit dtype is honoured
    m = _load(q, "float32")
    assert m.config.dtype == "float32"
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(m.params))


def test_unquantized_gguf_auto_keeps_its_float_type(tmp_path, caplog):
    import gguf

    T = gguf.GGMLQuantizationType
    with caplog.at_level(logging.INFO, logger="converters.gguf_loader"):
        assert _load(_tiny_gguf(tmp_path / "f16.gguf", T.F16)).config.dtype == "float16"
        # F32 and F16 matrices: the stored values, exactly
        assert _load(_tiny_gguf(tmp_path / "mixed.gguf", T.F32)).config.dtype == "float32"
    assert not [r for r in caplog.records if r.name == "converters.gguf_loader"]


# ---------------------------------------------------------------------------------------------------------
# 3. decode_token: an id the tokenizer has no entry for is logged once; other errors propagate


def test_undecodable_token_id_is_logged_once(caplog):
    from tokenizers import Tokenizer, models

    tok = Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    bad = 1 << 40  # past the u32 ids of the Rust tokenizer: OverflowError
    with caplog.at_level(logging.WARNING, logger="jaxvllm.entrypoints.openai.logprobs"):
        assert decode_token(tok, 1) == "b"
        assert decode_token(tok, bad) == ""
        assert decode_token(tok, bad) == ""
    recs = [r for r in caplog.records if r.name == "jaxvllm.entrypoints.openai.logprobs"]
    assert len(recs) == 1 and recs[0].levelno == logging.WARNING
    assert str(bad) in recs[0].getMessage() and "OverflowError" in recs[0].getMessage()


def test_decode_token_does_not_hide_other_errors():
    class Broken:
        def decode(self, ids):
            raise RuntimeError("tokenizer state lost")

    with pytest.raises(RuntimeError, match="tokenizer state lost"):
        decode_token(Broken(), 1)


# ---------------------------------------------------------------------------------------------------------
# 4. The token-id bound is the model config's vocab_size, never a made-up one


def test_vocab_size_comes_from_the_model_config():
    def factory(args: EngineArgs) -> FakeEngine:
        e = FakeEngine(args)
        e.model_config = types.SimpleNamespace(max_position_embeddings=512)  # no vocab_size
        return e

    # Before: the tokenizer's size, else 2**31, was used silently.
    with pytest.raises(ValueError, match="vocab_size"):
        ServerThread(EngineArgs(max_model_len=128), engine_factory=factory).start()


# ---------------------------------------------------------------------------------------------------------
# 5. A model without a tokenizer: text in or out is a 400 saying so; token-id prompts work


@pytest.fixture(scope="module")
def notok_srv(tmp_path_factory):
    d = tmp_path_factory.mktemp("config-only")
    (d / "config.json").write_text(json.dumps(TINY))
    args = dataclasses.replace(real_engine_args(), model=str(d), load_format="dummy")
    with ServerThread(args, ready_timeout=600) as s:
        assert s.engine.tokenizer is None
        yield s


def _assert_no_tokenizer(status: int, body, param: str) -> None:
    assert_error(status, body, 400, param)
    err = body["error"]
    assert err["type"] == "BadRequestError" and err["code"] == 400
    assert "no tokenizer" in err["message"] and "token ids" in err["message"]


@pytest.mark.parametrize("path,body,param", [
    ("/tokenize", {"prompt": "hello"}, "prompt"),
    ("/tokenize", {"messages": [{"role": "user", "content": "hi"}]}, "messages"),
    ("/detokenize", {"tokens": [1, 2, 3]}, "tokens"),
    ("/v1/completions", {"prompt": "hello", "max_tokens": 2}, "prompt"),
    ("/v1/completions", {"prompt": ["a", "b"], "max_tokens": 2}, "prompt"),
    ("/v1/completions", {"prompt": [5, 6, 7], "max_tokens": 2, "echo": True}, "echo"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
     "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                              "stream": True}, "messages"),
])
def test_no_tokenizer_text_requests_are_400(notok_srv, path, body, param):
    status, _, resp = http("POST", notok_srv.url + path, body)
    _assert_no_tokenizer(status, resp, param)


def test_no_tokenizer_token_id_prompts_work(notok_srv):
    status, _, resp = http("POST", notok_srv.url + "/v1/completions",
                           {"prompt": [5, 6, 7], "max_tokens": 3, "logprobs": 2})
    assert status == 200, resp
    (choice,) = resp["choices"]
    assert resp["usage"]["completion_tokens"] == 3
    # no token text exists: tokens are named by id, so top_logprobs keeps one key per token
    lps = choice["logprobs"]
    assert len(lps["tokens"]) == 3 and all(t.startswith("token_id:") for t in lps["tokens"])
    assert all(len(top) >= 2 for top in lps["top_logprobs"])


# ---------------------------------------------------------------------------------------------------------
# A checkpoint dtype the engine does not compute in falls back to float32, saying so


def test_unknown_config_dtype_loads_float32_with_a_warning(caplog):
    cfg = {**TINY, "torch_dtype": "float8_e4m3fn"}
    with caplog.at_level(logging.WARNING):
        loaded = load_model(cfg, load_format="dummy", cache_dir=None, load_tokenizer=False)
    assert loaded.params["final_norm"].dtype == jnp.float32
    assert "dtype 'float8_e4m3fn' is not one of float32, bfloat16, float16" in caplog.text


def test_checkpoint_dtype_says_why_it_reads_the_files(tmp_path, caplog):
    from safetensors.numpy import save_file

    from converters.hf import checkpoint_dtype
    good = str(tmp_path / "model.safetensors")
    save_file({"w": np.zeros((2, 2), np.float16)}, good)
    bad = str(tmp_path / "broken.safetensors")
    with open(bad, "wb") as f:
        f.write(b"\x05\x00\x00\x00\x00\x00\x00\x00{oops")
    with caplog.at_level(logging.WARNING):
        assert checkpoint_dtype({"torch_dtype": "int8"}, [bad, good]) == "float16"
        assert "config.json's torch_dtype 'int8' is not one of" in caplog.text
        assert f"{bad}: could not read the safetensors header" in caplog.text
        assert checkpoint_dtype({}, [bad]) == "float32"
        assert "no float32/bfloat16/float16 tensor found" in caplog.text
