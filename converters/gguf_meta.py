"""A GGUF's metadata -> the HF config dict and a transformers tokenizer, with the `gguf` and `tokenizers`
packages only: transformers' own GGUF reader imports torch, which the runtime never needs.

The keys are llama.cpp's (`<arch>.block_count`, `tokenizer.ggml.tokens`, ...); Llama 3's rope scaling,
which llama.cpp stores as a `rope_freqs` tensor, is turned back into its parameters. The tokenizer is rebuilt
the way llama.cpp tokenizes the file:
- `tokenizer.ggml.model == "gpt2"`: byte-level BPE with the file's merges, text split by the regex
  llama.cpp uses for `tokenizer.ggml.pre` (Llama 3, Qwen2, SmolLM/StarCoder, GPT-2);
- `"llama"`: SentencePiece BPE with byte fallback, merges recovered from the tokens' scores (the file
  stores none), a "▁" prefix on the first word when `tokenizer.ggml.add_space_prefix` says so.
Control tokens (token type 3) become special tokens and user-defined ones (type 4) added tokens, so
`<|im_start|>` and the like are matched whole.
"""
from __future__ import annotations

import functools
import logging
import math
import struct
from typing import Any, Optional

import numpy as np

from converters.errors import WeightLoadError

logger = logging.getLogger(__name__)

# llama.cpp architecture -> (HF model_type, HF architecture). Mistral GGUFs use "llama".
GGUF_ARCHITECTURES = {
    "llama": ("llama", "LlamaForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
    "qwen2moe": ("qwen2_moe", "Qwen2MoeForCausalLM"),
    "qwen3moe": ("qwen3_moe", "Qwen3MoeForCausalLM"),
    "phi3": ("phi3", "Phi3ForCausalLM"),
    "gemma2": ("gemma2", "Gemma2ForCausalLM"),
    "gemma3": ("gemma3_text", "Gemma3ForCausalLM"),
}
# llama.cpp's layer count of the 27B Gemmas, whose queries it scales by hidden / heads (the others:
# by head_dim); the GGUF does not store query_pre_attn_scalar.
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}
# A `llama` GGUF with experts is Mixtral. llama.cpp renormalises the top-k routing weights of these
# (unless the file says otherwise in `<arch>.expert_weights_norm`), as their HF models do.
_MIXTRAL = ("mixtral", "MixtralForCausalLM")
_MOE_NORM_TOPK = {"llama": True, "qwen2moe": False, "qwen3moe": True}

# llama.cpp's token types (llama_token_type).
_CONTROL, _USER_DEFINED = 3, 4

# Pre-tokenizer splits per `tokenizer.ggml.pre`, as llama.cpp's llama-vocab.cpp applies them.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "smaug-bpe", "dbrx", "falcon3"), _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen"), _QWEN2_SPLIT),
}
# Each digit its own word, then GPT-2's split (llama.cpp's STARCODER/SMOLLM group).
_DIGITS_THEN_GPT2 = ("smollm", "starcoder", "refact", "codeshell", "command-r")
_GPT2 = ("gpt-2", "gpt2", "default")


def field(reader: Any, key: str, default: Any = None) -> Any:
    """A metadata value as a Python value (str, int, float, bool or list), or `default`."""
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def open_reader(path: str):
    try:
        return _reader_class()(path, "r")
    except Exception as e:  # the reader raises ValueError/struct errors/IndexError on corrupt files
        raise WeightLoadError(f"{path}: not a valid GGUF file, corrupt or truncated "
                              f"({type(e).__name__}: {e})") from e


@functools.cache
def _reader_class() -> type:
    import gguf
    from gguf import GGUFValueType

    class Reader(gguf.GGUFReader):
        """gguf's reader with a faster walk over metadata arrays (a vocabulary is ~100k strings
        and numbers): the same fields and parts, sliced from a plain view of the file. The memmap's
        own slicing runs Python code per item; opening SmolLM2's file took 5 s, now 0.4 s."""

        def _get_field_parts(self, orig_offs: int, raw_type: int) -> tuple:
            if raw_type != GGUFValueType.ARRAY or self.byte_order != "I":
                return super()._get_field_parts(orig_offs, raw_type)
            raw_itype = self._get(orig_offs, np.uint32)
            alen = self._get(orig_offs + 4, np.uint64)
            itype, n, offs = GGUFValueType(raw_itype[0]), int(alen[0]), orig_offs + 12
            parts, types = [raw_itype, alen], [GGUFValueType.ARRAY, itype]
            nptype = self.gguf_scalar_to_np.get(itype)
            if nptype is not None:
                values = self._get(offs, nptype, n).view(np.ndarray)
                parts += [values[i:i + 1] for i in range(n)]
                return 12 + values.nbytes, parts, list(range(2, n + 2)), types
            if itype != GGUFValueType.STRING:  # nested arrays: none in the models we read
                return super()._get_field_parts(orig_offs, raw_type)
            data = self.data.view(np.ndarray)
            unpack, buf = struct.Struct("<Q").unpack_from, memoryview(data)
            for _ in range(n):
                (slen,) = unpack(buf, offs)
                parts += [data[offs:offs + 8].view(np.uint64), data[offs + 8:offs + 8 + slen]]
                offs += 8 + slen
            return offs - orig_offs, parts, list(range(3, 2 * n + 3, 2)), types

    return Reader


def architecture(reader: Any, path: str) -> str:
    arch = field(reader, "general.architecture")
    if arch is None:
        raise WeightLoadError(f"{path}: GGUF metadata has no general.architecture")
    return str(arch)


def hf_config(reader: Any, path: str) -> dict:
    """The HF config dict (config.json's fields) the GGUF's metadata describes."""
    arch = architecture(reader, path)
    if arch not in GGUF_ARCHITECTURES:
        raise WeightLoadError(f"{path}: unsupported GGUF architecture {arch!r}; supported: "
                              f"{', '.join(GGUF_ARCHITECTURES)}")
    model_type, hf_arch = GGUF_ARCHITECTURES[arch]
    experts = field(reader, f"{arch}.expert_count")
    if arch == "llama" and experts:
        model_type, hf_arch = _MIXTRAL

    def need(key: str) -> Any:
        value = field(reader, f"{arch}.{key}")
        if value is None:
            raise WeightLoadError(f"{path}: GGUF metadata has no {arch}.{key}")
        return value

    tensors = {t.name: t for t in reader.tensors}
    embed = tensors.get("token_embd.weight")
    if embed is None:
        raise WeightLoadError(f"{path}: GGUF has no token_embd.weight tensor")
    heads = int(need("attention.head_count"))
    cfg: dict[str, Any] = {
        "model_type": model_type,
        "architectures": [hf_arch],
        # The embedding's rows, not the tokenizer's length: a file may pad its vocabulary.
        "vocab_size": int(embed.shape[-1]),
        "hidden_size": int(need("embedding_length")),
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(field(reader, f"{arch}.attention.head_count_kv", heads)),
        "max_position_embeddings": int(need("context_length")),
        "rms_norm_eps": float(need("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(field(reader, f"{arch}.rope.freq_base", 10000.0)),
        "tie_word_embeddings": "output.weight" not in tensors,
    }
    if experts:
        used = int(need("expert_used_count"))
        norm = bool(field(reader, f"{arch}.expert_weights_norm", _MOE_NORM_TOPK[arch]))
        if hf_arch == "MixtralForCausalLM":
            if not norm:
                raise WeightLoadError(f"{path}: a Mixtral GGUF without renormalised routing "
                                      f"weights is not supported")
            cfg.update(num_local_experts=int(experts), num_experts_per_tok=used)
        else:
            cfg.update(num_experts=int(experts), num_experts_per_tok=used, norm_topk_prob=norm,
                       moe_intermediate_size=int(need("expert_feed_forward_length")))
            shared = field(reader, f"{arch}.expert_shared_feed_forward_length")
            if shared:
                cfg["shared_expert_intermediate_size"] = int(shared)
    head_dim = field(reader, f"{arch}.attention.key_length")
    if head_dim is not None:
        cfg["head_dim"] = int(head_dim)
    scaling = field(reader, f"{arch}.rope.scaling.type")
    if scaling not in (None, "none"):
        cfg["rope_scaling"] = {"rope_type": str(scaling),
                               "factor": float(field(reader, f"{arch}.rope.scaling.factor", 1.0))}
        original = field(reader, f"{arch}.rope.scaling.original_context_length")
        if original is not None:
            cfg["rope_scaling"]["original_max_position_embeddings"] = int(original)
    if arch == "phi3":
        _phi3_fields(reader, cfg, tensors, heads)
    if arch in _GEMMA_27B_LAYERS:
        _gemma_fields(reader, cfg, arch, heads)
    if "rope_freqs.weight" in tensors and "rope_scaling" not in cfg:
        divisors = np.asarray(tensors["rope_freqs.weight"].data, np.float64).reshape(-1)
        cfg["rope_scaling"] = llama3_rope_scaling(
            divisors, cfg["rope_theta"], cfg.get("head_dim") or cfg["hidden_size"] // heads,
            int(field(reader, f"{arch}.rope.scaling.original_context_length", 8192)))
        if cfg["rope_scaling"] is None:
            raise WeightLoadError(f"{path}: the rope_freqs tensor is not Llama 3's rope scaling; "
                                  f"cannot apply it")
    for key, name in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id")):
        value = field(reader, f"tokenizer.ggml.{key}")
        if value is not None:
            cfg[name] = int(value)
    return cfg


def _phi3_fields(reader: Any, cfg: dict, tensors: dict, heads: int) -> None:
    """Phi-3 as llama.cpp's converter writes it: the rotary dimensions (partial rotary), the
    sliding window, and LongRoPE as two factor tensors with the original context and the attention
    factor in the metadata."""
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    rotary = field(reader, "phi3.rope.dimension_count")
    if rotary is not None:
        cfg["partial_rotary_factor"] = int(rotary) / head_dim
    window = field(reader, "phi3.attention.sliding_window")
    cfg["sliding_window"] = int(window) if window else None
    if "rope_factors_long.weight" in tensors:
        def factors(name: str) -> list:
            return np.asarray(tensors[name].data, np.float32).reshape(-1).tolist()

        original = int(field(reader, "phi3.rope.scaling.original_context_length",
                             cfg["max_position_embeddings"]))
        cfg["rope_scaling"] = {"rope_type": "longrope", "original_max_position_embeddings": original,
                               "long_factor": factors("rope_factors_long.weight"),
                               "short_factor": factors("rope_factors_short.weight")}
        attention = field(reader, "phi3.rope.scaling.attn_factor")
        if attention is not None:
            cfg["rope_scaling"]["attention_factor"] = float(attention)


def _gemma_fields(reader: Any, cfg: dict, arch: str, heads: int) -> None:
    """Gemma 2/3 as llama.cpp reads them: soft caps and the window from the metadata, the layer
    pattern from it or llama.cpp's fixed one, the query scale by llama.cpp's 27B rule, and Gemma 3's
    local RoPE base (llama.cpp's fixed 10000)."""
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    big = cfg["num_hidden_layers"] == _GEMMA_27B_LAYERS[arch]
    cfg["query_pre_attn_scalar"] = cfg["hidden_size"] // heads if big else head_dim
    window = field(reader, f"{arch}.attention.sliding_window")
    if window:
        cfg["sliding_window"] = int(window)
    pattern = field(reader, f"{arch}.attention.sliding_window_pattern")
    if isinstance(pattern, list):
        cfg["layer_types"] = ["sliding_attention" if p else "full_attention" for p in pattern]
    elif pattern:
        cfg["sliding_window_pattern"] = int(pattern)
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        value = field(reader, f"{arch}.{key}")
        if value is not None:
            cfg[key] = float(value)
    if arch == "gemma3":
        cfg["rope_local_base_freq"] = 10000.0


def load_tokenizer(path: str) -> Any:
    """The tokenizer of the GGUF at `path` (see `tokenizer`); every failure is a WeightLoadError."""
    try:
        return tokenizer(open_reader(path), path)
    except WeightLoadError:
        raise
    except Exception as e:  # tokenizers rejects a malformed vocabulary/merges with its own errors
        raise WeightLoadError(f"{path}: cannot build the tokenizer from the GGUF metadata "
                              f"({type(e).__name__}: {e})") from e


def llama3_rope_scaling(divisors: np.ndarray, theta: float, head_dim: int,
                        original: int) -> Optional[dict]:
    """Llama 3's rope_scaling recovered from llama.cpp's rope_freqs tensor (None if it is not one).

    llama.cpp stores the scaling as a divisor per frequency: 1 for wavelengths below
    original/high_freq_factor, `factor` above original/low_freq_factor, and 1/((1 - s)/factor + s)
    between, where s = (original/wavelength - low)/(high - low) is linear in 1/wavelength. The line
    fitted through the middle divisors gives original/(high - low) and low/(high - low): every
    (original, low, high) on it yields the same frequencies, so `original` is taken as given.
    """
    if divisors.shape != (head_dim // 2,):
        return None
    factor = float(divisors.max())
    inv_wavelen = theta ** (-np.arange(0, head_dim, 2) / head_dim) / (2 * math.pi)
    mid = (divisors > 1 + 1e-6) & (divisors < factor * (1 - 1e-6))
    if factor <= 1 or mid.sum() < 2:
        return None
    smooth = (1 / divisors[mid] - 1 / factor) / (1 - 1 / factor)
    slope, intercept = np.polyfit(inv_wavelen[mid], smooth, 1)
    low = -intercept * original / slope
    scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": float(low),
               "high_freq_factor": float(low + original / slope),
               "original_max_position_embeddings": original}
    s = np.clip(slope * inv_wavelen + intercept, 0.0, 1.0)
    if not np.allclose(1 / ((1 - s) / factor + s), divisors, rtol=1e-4):
        return None
    return scaling


def tokenizer(reader: Any, path: str) -> Any:
    """A transformers fast tokenizer (encode/decode/apply_chat_template) built from the metadata."""
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast

    tokens = field(reader, "tokenizer.ggml.tokens")
    if not tokens:
        raise WeightLoadError(f"{path}: the GGUF has no tokenizer (no tokenizer.ggml.tokens)")
    kind = field(reader, "tokenizer.ggml.model")
    if kind == "gpt2":
        backend, add_bos_default = _byte_level_bpe(reader, tokens), False
    elif kind == "llama":
        backend, add_bos_default = _sentencepiece_bpe(reader, tokens, path), True
    else:
        raise WeightLoadError(f"{path}: cannot build a tokenizer of type {kind!r} from a GGUF; "
                              f"supported: 'gpt2' (byte-level BPE), 'llama' (SentencePiece BPE)")
    types = field(reader, "tokenizer.ggml.token_type") or []
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, k in zip(tokens, types) if k == _CONTROL])
    backend.add_tokens([AddedToken(t, special=False, normalized=False)
                        for t, k in zip(tokens, types) if k == _USER_DEFINED])

    def token(key: str) -> Optional[str]:
        i = field(reader, f"tokenizer.ggml.{key}")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    bos = token("bos_token_id")
    add_bos = bool(field(reader, "tokenizer.ggml.add_bos_token", add_bos_default)) and bos is not None
    add_eos = bool(field(reader, "tokenizer.ggml.add_eos_token", False)) and token("eos_token_id") is not None
    _set_post_processor(backend, bos if add_bos else None, token("eos_token_id") if add_eos else None)
    special = {name: t for name, t in (("bos_token", bos), ("eos_token", token("eos_token_id")),
                                       ("unk_token", token("unknown_token_id")),
                                       ("pad_token", token("padding_token_id"))) if t is not None}
    return PreTrainedTokenizerFast(tokenizer_object=backend,
                                   chat_template=field(reader, "tokenizer.chat_template"), **special)


def _byte_level_bpe(reader: Any, tokens: list[str]) -> Any:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    merges = [tuple(m.split(" ", 1)) for m in field(reader, "tokenizer.ggml.merges") or []]
    pre = str(field(reader, "tokenizer.ggml.pre", "default"))
    backend = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges,
                                   ignore_merges=_PRE_SPLITS.get(pre) is _LLAMA3_SPLIT))
    if pre in _PRE_SPLITS:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_PRE_SPLITS[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    elif pre in _DIGITS_THEN_GPT2:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    else:
        if pre not in _GPT2:
            logger.warning("GGUF tokenizer.ggml.pre=%r is not known here; splitting words as GPT-2 does", pre)
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece_bpe(reader: Any, tokens: list[str], path: str) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    scores = field(reader, "tokenizer.ggml.scores")
    if scores is None or len(scores) != len(tokens):
        raise WeightLoadError(f"{path}: a SentencePiece GGUF tokenizer needs tokenizer.ggml.scores, "
                              f"one per token")
    vocab = {t: i for i, t in enumerate(tokens)}
    unk_id = field(reader, "tokenizer.ggml.unknown_token_id")
    backend = Tokenizer(models.BPE(vocab, _merges_from_scores(tokens, scores),
                                   unk_token=tokens[unk_id] if unk_id is not None else None,
                                   fuse_unk=True, byte_fallback=True))
    prefix = bool(field(reader, "tokenizer.ggml.add_space_prefix", True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", split=False,
                                                     prepend_scheme="first" if prefix else "never")
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    backend.decoder = decoders.Sequence(steps + ([decoders.Strip(content=" ", left=1)] if prefix else []))
    return backend


def _merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """SentencePiece BPE merges: every split of a token into two tokens, best merged score first (the
    order SentencePiece applies them; ties by the pieces' ids, as transformers' converter does)."""
    ids = {t: i for i, t in enumerate(tokens)}
    found = [(-scores[i], ids[t[:k]], ids[t[k:]], t[:k], t[k:])
             for i, t in enumerate(tokens) for k in range(1, len(t)) if t[:k] in ids and t[k:] in ids]
    return [(left, right) for *_, left, right in sorted(found)]


def _set_post_processor(backend: Any, bos: Optional[str], eos: Optional[str]) -> None:
    from tokenizers import processors

    if bos is None and eos is None:
        return
    ids = dict(backend.get_vocab(with_added_tokens=True))
    single = " ".join(([f"{bos}:0"] if bos else []) + ["$A:0"] + ([f"{eos}:0"] if eos else []))
    pair = " ".join([single] + ([f"{bos}:1"] if bos else []) + ["$B:1"] + ([f"{eos}:1"] if eos else []))
    backend.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=[(t, ids[t]) for t in (bos, eos) if t])
