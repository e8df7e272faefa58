"""GGUF metadata -> config and tokenizer without torch (converters/gguf_meta.py), against transformers'
own GGUF reader (which needs torch: a test-only reference) and against the tokenizers the GGUFs were
written from."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402

from converters import WeightLoadError, gguf_meta, load_model  # noqa: E402
from jaxvllm.default_model import default_model_path  # noqa: E402
from jaxvllm.models.config import ModelConfig  # noqa: E402

TEXTS = [
    "Hello, world!",
    "In 2024, 12345 apples cost $3.50; that's 7%.",
    "  leading spaces,  double  spaces\n\nand newlines\r\n\ttabs",
    "Unicode: é, ü, 日本語, emoji 🙂, Ωμέγα",
    "def f(x):\n    return x ** 2  # I'm done, we'll see, they've",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "",
]
PARIS = "Paris is the capital of France; Berlin is the capital of Germany."
CORPUS = [t for t in TEXTS if t] + [
    "The quick brown fox jumps over the lazy dog. " * 3,
    PARIS,
    "numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000 and words in between",
] * 20


def _finish(w) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _write_bare(path, arch: str) -> None:
    """A GGUF with an embedding tensor and no other metadata than its architecture."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    _finish(w)


def _reference(path: str):
    return transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))


# ---------------------------------------------------------------------------------------------------------
# The embedded default model (a llama-architecture GGUF with a byte-level BPE tokenizer)


def test_default_config_matches_transformers():
    path = default_model_path()
    ours = gguf_meta.hf_config(gguf_meta.open_reader(path), path)
    ref = transformers.AutoConfig.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    assert ModelConfig.from_hf(ours) == ModelConfig.from_hf(ref)
    assert ours["tie_word_embeddings"] and ours["num_key_value_heads"] == 3


def test_default_tokenizer_matches_transformers():
    path = default_model_path()
    ours, ref = gguf_meta.load_tokenizer(path), _reference(path)
    for text in TEXTS:
        for special in (True, False):
            assert ours.encode(text, add_special_tokens=special) == ref.encode(text, add_special_tokens=special)
        ids = ours.encode(text, add_special_tokens=False)
        assert ours.decode(ids) == text
        assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)
    assert len(ours) == len(ref)
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        assert getattr(ours, name) == getattr(ref, name), name
    assert ours.convert_tokens_to_ids("<|im_start|>") == 1  # a control token stays whole
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert (ours.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            == ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))


def _same_reading(path) -> None:
    ours, ref = gguf_meta.open_reader(str(path)), gguf.GGUFReader(str(path), "r")
    assert list(ours.fields) == list(ref.fields)
    for key, f in ours.fields.items():
        g = ref.fields[key]
        assert (f.offset, f.name, f.types, f.data) == (g.offset, g.name, g.types, g.data), key
        assert f.contents() == g.contents(), key
        assert len(f.parts) == len(g.parts), key
        assert all(a.dtype == b.dtype and np.array_equal(a, b) for a, b in zip(f.parts, g.parts)), key
    assert ours.data_offset == ref.data_offset
    assert [(t.name, t.data_offset, t.shape.tolist()) for t in ours.tensors] == \
        [(t.name, t.data_offset, t.shape.tolist()) for t in ref.tensors]


def test_reader_reads_the_fields_as_gguf_does(tmp_path):
    """open_reader walks metadata arrays its own (faster) way: the fields, parts and tensors are
    gguf's own, for the default model's vocabulary and for arrays of every item type."""
    _same_reading(default_model_path())
    w = gguf.GGUFWriter(str(tmp_path / "arrays.gguf"), "llama")
    w.add_array("t.strings", ["", "a", "ünï", "x" * 300])
    w.add_array("t.empty", [])
    w.add_array("t.ints", [3, -1, 7])
    w.add_array("t.floats", [0.5, -2.0])
    w.add_array("t.bools", [True, False, True])
    w.add_array("t.nested", [[1, 2], [3]])
    w.add_string("t.after", "still aligned")
    w.add_tensor("token_embd.weight", np.arange(32, dtype=np.float32).reshape(4, 8))
    _finish(w)
    _same_reading(tmp_path / "arrays.gguf")


def test_runtime_gguf_path_imports_no_torch():
    """Config, tokenizer and weights of the default model load without importing torch (even where it is
    installed, as here)."""
    code = ("import sys\n"
            "from converters import load_model\n"
            "m = load_model(None, cache_dir=None)\n"
            "assert m.tokenizer.encode('Hello') and m.config.num_layers == 30\n"
            "print('torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------------------------------------------------
# Synthetic GGUFs written from tokenizers trained here, the way llama.cpp's converter writes them


_LLAMA3 = gguf_meta._LLAMA3_SPLIT
_QWEN2 = gguf_meta._QWEN2_SPLIT


def _byte_level_source(pre: str) -> Tokenizer:
    tok = Tokenizer(models.BPE(ignore_merges=pre == "llama-bpe"))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pre not in ("llama-bpe", "qwen2"))
    if pre == "llama-bpe":
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_LLAMA3), "isolated"), byte_level])
    elif pre == "qwen2":
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_QWEN2), "isolated"), byte_level])
    elif pre == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return tok


def _spm_source() -> Tokenizer:
    """A Llama-2-style SentencePiece BPE: <unk> <s> </s>, 256 byte tokens, then the learned pieces."""
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(content=" ", left=1)])
    # Without splitting on spaces the trainer merges across words; SentencePiece does not: train on words.
    words = [w for line in CORPUS for w in line.split()]
    tok.train_from_iterator(["▁" + w for w in words], trainers.BpeTrainer(
        vocab_size=600, special_tokens=specials, show_progress=False))
    return tok


def _write(path, tok: Tokenizer, kind: str, pre: str = "", *, add_bos=None, drop=()) -> None:
    import json

    vocab = tok.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_tokenizer_model(kind)
    if pre:
        w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    if kind == "gpt2":
        special = {"<|endoftext|>", "<|im_start|>", "<|im_end|>"}
        w.add_token_types([3 if t in special else 1 for t in tokens])
        merges = json.loads(tok.to_str())["model"]["merges"]
        w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
        w.add_bos_token_id(0)
        w.add_eos_token_id(2)
    else:
        types = [2 if t == "<unk>" else 3 if t in ("<s>", "</s>") else 6 if t.startswith("<0x") else 1
                 for t in tokens]
        w.add_token_types(types)
        if "scores" not in drop:
            w.add_token_scores([-float(i) if k == 1 else 0.0 for i, k in enumerate(types)])
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_unk_token_id(0)
    if add_bos is not None:
        w.add_add_bos_token(add_bos)
    w.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    w.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), np.float32))
    _finish(w)


@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2", "smollm", "gpt-2"])
def test_byte_level_gguf_tokenizer_matches_its_source(tmp_path, pre):
    src = _byte_level_source(pre)
    path = tmp_path / f"{pre}.gguf"
    _write(path, src, "gpt2", pre)
    ours, ref = gguf_meta.load_tokenizer(str(path)), _reference(str(path))
    for text in TEXTS:
        expect = src.encode(text, add_special_tokens=False).ids
        assert ours.encode(text, add_special_tokens=False) == expect, text
        assert ours.decode(expect) == text
        if pre != "smollm":  # transformers splits `smollm` words as GPT-2 does, digits not one by one
            assert ref.encode(text, add_special_tokens=False) == expect, text
    assert ours.encode("x", add_special_tokens=True) == src.encode("x").ids  # no BOS unless asked


def test_sentencepiece_gguf_tokenizer_matches_transformers(tmp_path):
    src = _spm_source()
    path = tmp_path / "spm.gguf"
    _write(path, src, "llama")
    ours, ref = gguf_meta.load_tokenizer(str(path)), _reference(str(path))
    texts = [t for t in TEXTS if "<|" not in t] + [PARIS, "word▁with▁metaspace", "ünïcödé bytes ☃"]
    for text in texts:
        for special in (True, False):
            assert ours.encode(text, add_special_tokens=special) == ref.encode(text, add_special_tokens=special)
        ids = ours.encode(text, add_special_tokens=False)
        assert ours.decode(ids) == ref.decode(ids)
        if not text.startswith(" ") and "▁" not in text:  # SentencePiece decodes "▁" as a space, strips the one it prefixed
            assert ours.decode(ids) == text
        # Words seen in training come out as the trained tokenizer splits them.
        if text == PARIS:
            assert ids == src.encode(text).ids
    assert ours.encode("hi")[0] == 1 and ours.bos_token == "<s>"  # SentencePiece GGUFs add BOS by default
    assert "<0x" in "".join(ours.convert_ids_to_tokens(ours.encode("☃", add_special_tokens=False)))
    # the file's add_bos_token wins
    off = tmp_path / "spm_nobos.gguf"
    _write(off, src, "llama", add_bos=False)
    assert gguf_meta.load_tokenizer(str(off)).encode("hi")[0] != 1


def test_gguf_tokenizer_errors_name_the_file(tmp_path):
    src = _spm_source()
    no_scores = tmp_path / "noscores.gguf"
    _write(no_scores, src, "llama", drop=("scores",))
    with pytest.raises(WeightLoadError, match="noscores.gguf.*tokenizer.ggml.scores"):
        gguf_meta.load_tokenizer(str(no_scores))
    bert = tmp_path / "bert.gguf"
    _write(bert, _byte_level_source("gpt-2"), "bert")
    with pytest.raises(WeightLoadError, match="bert.gguf.*'bert'.*supported"):
        gguf_meta.load_tokenizer(str(bert))
    bare = tmp_path / "bare.gguf"
    _write_bare(bare, "llama")
    with pytest.raises(WeightLoadError, match="bare.gguf.*no tokenizer"):
        gguf_meta.load_tokenizer(str(bare))
    with pytest.raises(WeightLoadError, match="bare.gguf.*llama.attention.head_count"):
        load_model(str(bare), cache_dir=None, load_tokenizer=False)


def test_unsupported_gguf_architecture(tmp_path):
    path = tmp_path / "gemma.gguf"
    _write_bare(path, "gemma")
    with pytest.raises(WeightLoadError, match="unsupported GGUF architecture 'gemma'.*llama, qwen2, qwen3"):
        load_model(str(path), cache_dir=None)


# ---------------------------------------------------------------------------------------------------------
# Llama 3 rope scaling, which llama.cpp stores as a rope_freqs tensor


def _llama_cpp_rope_freqs(scaling: dict, theta: float, head_dim: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf (LlamaModel.generate_extra_tensors) for rope_type llama3."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old = scaling["original_max_position_embeddings"]
    out = []
    for freq in 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim):
        wavelen = 2 * np.pi / freq
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, np.float32)


def _write_model_gguf(path, head_dim: int, theta: float, rope_freqs=None) -> None:
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_context_length(131072)
    w.add_embedding_length(4 * head_dim)
    w.add_feed_forward_length(64)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_rope_freq_base(theta)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tensor("token_embd.weight", np.zeros((32, 4 * head_dim), np.float32))
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs)
    _finish(w)


@pytest.mark.parametrize("head_dim,theta,scaling", [
    (128, 500000.0, dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                         original_max_position_embeddings=8192)),    # Llama 3.1
    (64, 500000.0, dict(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                        original_max_position_embeddings=8192)),     # Llama 3.2
    (128, 500000.0, dict(factor=4.0, low_freq_factor=2.0, high_freq_factor=8.0,
                         original_max_position_embeddings=16384)),
])
def test_llama3_rope_scaling_from_rope_freqs(tmp_path, head_dim, theta, scaling):
    from jaxvllm.models.layers import rope_inv_freq

    path = tmp_path / "llama3.gguf"
    _write_model_gguf(path, head_dim, theta, _llama_cpp_rope_freqs(scaling, theta, head_dim))
    cfg = ModelConfig.from_hf(gguf_meta.hf_config(gguf_meta.open_reader(str(path)), str(path)))
    hf = ModelConfig.from_hf(dict(model_type="llama", hidden_size=4 * head_dim, num_attention_heads=4,
                                  num_key_value_heads=2, intermediate_size=64, num_hidden_layers=1,
                                  vocab_size=32, rope_theta=theta,
                                  rope_scaling=dict(rope_type="llama3", **scaling)))
    assert cfg.rope_scaling["rope_type"] == "llama3" and cfg.rope_scaling["factor"] == scaling["factor"]
    np.testing.assert_allclose(rope_inv_freq(cfg), rope_inv_freq(hf), rtol=1e-5)
    plain = tmp_path / "plain.gguf"
    _write_model_gguf(plain, head_dim, theta)
    assert not np.allclose(rope_inv_freq(ModelConfig.from_hf(gguf_meta.hf_config(
        gguf_meta.open_reader(str(plain)), str(plain)))), rope_inv_freq(hf), rtol=1e-3)


def test_unknown_rope_freqs_is_refused(tmp_path):
    path = tmp_path / "odd.gguf"
    _write_model_gguf(path, 64, 10000.0, np.linspace(1.0, 3.0, 32).astype(np.float32) ** 2)
    with pytest.raises(WeightLoadError, match="odd.gguf.*rope_freqs"):
        gguf_meta.hf_config(gguf_meta.open_reader(str(path)), str(path))
