"""The engine's tokenizer loads in a child process and comes back pickled (converters/tokenizer_child.py)."""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys

import pytest

from converters import WeightLoadError, load_model_tokenizer
from converters import tokenizer_child

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = "Paris is the capital of France. ¿Qué tal? 1234"
CHAT = [{"role": "user", "content": "hi"}]


def test_child_process_tokenizer_matches_in_process(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "tokenizer.json").write_text("{not json")
    code = f"""
import json, sys
from converters import WeightLoadError
from converters.tokenizer_child import PendingTokenizer
pending = PendingTokenizer(None, cache_dir={str(tmp_path / "cache")!r})
assert pending._proc is not None  # loading in a child
tok = pending.result()
again = PendingTokenizer(None, cache_dir={str(tmp_path / "cache")!r})
assert again._proc is None  # from the cache the child filled
assert again.result().encode({TEXT!r}) == tok.encode({TEXT!r})
out = dict(encode=tok.encode({TEXT!r}), decode=tok.decode(tok.encode({TEXT!r})),
           chat=tok.apply_chat_template({CHAT!r}, tokenize=False, add_generation_prompt=True),
           eos=tok.eos_token_id, cls=type(tok).__name__,
           heavy=[m for m in ("torch", {tokenizer_child._HEAVY_MODULE!r}) if m in sys.modules])
try:
    PendingTokenizer(None, tokenizer={str(bad)!r}).result()
except WeightLoadError as e:
    out["error"] = str(e)
print(json.dumps(out))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    ref = load_model_tokenizer(None)
    assert got["encode"] == ref.encode(TEXT) and got["decode"] == ref.decode(ref.encode(TEXT))
    assert got["chat"] == ref.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert got["eos"] == ref.eos_token_id and got["cls"] == type(ref).__name__
    assert got["heavy"] == []  # the parent never imported torch or AutoTokenizer
    assert str(bad) in got["error"] and "cannot load the tokenizer" in got["error"]


def test_child_ignores_a_converters_package_in_the_working_directory(tmp_path):
    shadow = tmp_path / "converters"
    shadow.mkdir()
    (shadow / "__init__.py").write_text("raise ImportError('the wrong converters')")
    code = ("from converters.tokenizer_child import PendingTokenizer\n"
            "p = PendingTokenizer(None)\n"
            "p.result()\n"
            "print(p.origin)")
    # The parent finds the real package (safe path: no working directory on sys.path); the child
    # must too, although it runs in the same working directory.
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          cwd=tmp_path, env=dict(os.environ, PYTHONPATH=ROOT, PYTHONSAFEPATH="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("child process"), proc.stderr[-3000:]


def test_failed_child_falls_back_to_loading_here(monkeypatch, caplog):
    # A process that imported AutoTokenizer already (this one) loads in-process; pretend it did not,
    # and make the child fail to run at all.
    monkeypatch.setattr(tokenizer_child, "_HEAVY_MODULE", "not.imported.module")
    monkeypatch.setattr(sys, "executable", "/bin/false")
    pending = tokenizer_child.PendingTokenizer(None)
    tok = pending.result()
    assert tok.encode(TEXT) == load_model_tokenizer(None).encode(TEXT)
    # Whether it died before or after reading its request, the child's failure was noticed.
    assert "loading in this one" in caplog.text


def test_cancel_stops_the_child(monkeypatch):
    monkeypatch.setattr(tokenizer_child, "_HEAVY_MODULE", "not.imported.module")
    pending = tokenizer_child.PendingTokenizer(None)
    proc = pending._proc
    pending.cancel()
    assert proc.poll() is not None and proc.returncode < 0
    assert pending.result() is None  # nothing loads after a cancel


def test_cancel_while_waiting(monkeypatch):
    # The engine's thread waits in result() while the main thread fails and cancels.
    import threading
    import time
    monkeypatch.setattr(tokenizer_child, "_HEAVY_MODULE", "not.imported.module")
    pending = tokenizer_child.PendingTokenizer(None)
    got = []
    waiter = threading.Thread(target=lambda: got.append(pending.result()))
    waiter.start()
    time.sleep(0.3)
    proc = pending._proc
    pending.cancel()
    waiter.join(timeout=60)
    assert got == [None] and proc.returncode < 0  # killed, not waited for


def test_failed_engine_start_stops_the_child(monkeypatch, tmp_path):
    from jaxvllm import LLM

    started = []
    real = tokenizer_child.PendingTokenizer.__init__

    def spy(self, *a, **k):
        real(self, *a, **k)
        started.append(self)
    monkeypatch.setattr(tokenizer_child, "_HEAVY_MODULE", "not.imported.module")
    monkeypatch.setattr(tokenizer_child.PendingTokenizer, "__init__", spy)
    with pytest.raises(WeightLoadError):
        LLM(str(tmp_path / "missing"))
    assert len(started) == 1 and started[0]._cancelled


def test_tokenizer_cache_hit_miss_and_garbled_entry(tmp_path, monkeypatch):
    import converters
    cache = tmp_path / "cache"
    tok = tokenizer_child.PendingTokenizer(None, cache_dir=str(cache)).result()  # in-process here
    (entry,) = cache.glob("*.pkl")
    real = converters.load_model_tokenizer
    calls = []
    monkeypatch.setattr(converters, "load_model_tokenizer", lambda *a, **k: calls.append(1) or real(*a, **k))
    hit = tokenizer_child.PendingTokenizer(None, cache_dir=str(cache)).result()
    assert hit.encode(TEXT) == tok.encode(TEXT) and calls == []
    entry.write_bytes(b"garbled")
    again = tokenizer_child.PendingTokenizer(None, cache_dir=str(cache)).result()
    assert again.encode(TEXT) == tok.encode(TEXT) and calls == [1]
    assert pickle.loads(entry.read_bytes())[0] == "ok"  # rewritten


def test_tokenizer_cache_key_follows_the_files(tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    load_model_tokenizer(None).save_pretrained(str(d))
    (d / "config.json").write_text("{}")
    key = tokenizer_child.cache_key(None, str(d), "auto")
    assert key == tokenizer_child.cache_key(None, str(d), "auto")
    f = d / "tokenizer_config.json"
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert tokenizer_child.cache_key(None, str(d), "auto") != key  # an edited tokenizer file misses
    assert tokenizer_child.cache_key(None, "org/not-a-local-path", "auto") is None  # hub ids: no key
    assert tokenizer_child.cache_key({"model_type": "llama"}, None, "dummy") is None  # no files
