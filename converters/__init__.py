"""Model sources -> the engine's params pytree (jaxvllm/models/params.py), config and tokenizer.

    from converters import load_model
    m = load_model(None)                        # the embedded default model (SmolLM2-135M-Instruct GGUF)
    m = load_model("/models/Qwen3-0.6B", dtype="bfloat16")   # HF directory: config.json + *.safetensors
    m = load_model("/models/x.Q4_K_M.gguf")     # GGUF file (dequantized)
    m = load_model("/models/Llama-3-8B", load_format="dummy")   # random weights, only config.json read
    m.params, m.config, m.hf_config, m.tokenizer, m.generation_config, m.source

Every failure to locate, read or convert a source raises `WeightLoadError` (a ValueError) whose message
names the file and, where there is one, the tensor.

dtype="auto": an HF checkpoint keeps its dtype (config.json's torch_dtype/dtype, else the stored tensors');
a GGUF whose matrices are all F16 (BF16) loads as float16 (bfloat16); a GGUF with any quantized matrix
dequantizes to bfloat16 (pass dtype="float32" for the exact dequantized values); an F32 GGUF loads as float32.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Optional, Union

from converters.errors import WeightLoadError

logger = logging.getLogger(__name__)


class _NoTorchAdvice(logging.Filter):
    """transformers logs "PyTorch was not found..." when imported without torch; this runtime needs
    only its tokenizers and chat templates, so the advice is noise in every run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "PyTorch was not found" not in record.getMessage()


logging.getLogger("transformers").addFilter(_NoTorchAdvice())

LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")

__all__ = ["LoadedModel", "WeightLoadError", "load_model", "load_model_tokenizer", "convert_hf_state_dict",
           "init_dummy_params", "resolve_source", "LOAD_FORMATS"]


@dataclass
class LoadedModel:
    params: Any                      # pytree of jax arrays on the default device (layout: models/params.py)
    config: Any                      # jaxvllm.models.config.ModelConfig; config.dtype = the params' dtype
    hf_config: dict                  # the HF config as a dict (config.json; what a GGUF's metadata describes)
    tokenizer: Any                   # a transformers tokenizer, or None (no tokenizer files / not asked)
    generation_config: Optional[dict]  # generation_config.json as a dict (extra eos ids, ...), or None
    source: str                      # a display name (directory/file name; the default model's name)
    path: Optional[str] = None       # the resolved directory or .gguf file (None for a config dict)
    load_format: str = "safetensors"  # "safetensors" | "gguf" | "dummy" (what was actually done)
    from_cache: bool = False         # params restored from the converted-weights cache
    seconds: dict = dataclasses.field(default_factory=dict)  # "config", "params", "tokenizer"

    @property
    def dtype(self) -> str:
        return self.config.dtype


def __getattr__(name: str) -> Any:  # lazy: `converters.errors` stays importable without JAX
    if name == "convert_hf_state_dict":
        from converters.hf import convert_hf_state_dict
        return convert_hf_state_dict
    if name == "init_dummy_params":
        from converters.dummy import init_dummy_params
        return init_dummy_params
    raise AttributeError(f"module 'converters' has no attribute {name!r}")


# ---------------------------------------------------------------------------------------------------------
# Locating the source


@dataclass
class _Resolved:
    kind: str                        # "hf" | "gguf" | "config"
    path: Optional[str]              # directory (hf), .gguf file (gguf), None (config dict)
    display: str
    config_dict: Optional[dict] = None


def _is_gguf_file(path: str) -> bool:
    if path.lower().endswith(".gguf"):
        return True
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def resolve_source(source: Any, load_format: str = "auto") -> _Resolved:
    """Where a model comes from: the default GGUF, an HF directory, a .gguf file, or a config dict."""
    if source is None:
        from jaxvllm import default_model

        try:
            path = default_model.default_model_path()
        except default_model.DefaultModelNotFoundError as e:
            raise WeightLoadError(str(e)) from e
        return _Resolved("gguf", path, default_model.DEFAULT_MODEL_NAME)
    if isinstance(source, dict):
        if load_format != "dummy":
            raise WeightLoadError("a config dict has no weights: pass load_format='dummy' with it")
        return _Resolved("config", None, str(source.get("_name_or_path") or source.get("model_type")
                                             or "config"), dict(source))
    if not isinstance(source, (str, os.PathLike)):
        raise WeightLoadError(f"model source must be a path, a config dict or None; got {type(source).__name__}")
    path = os.path.abspath(os.path.expanduser(os.fspath(source)))
    if not os.path.exists(path):
        hub = _local_hub_snapshot(os.fspath(source))
        if hub is None:
            raise WeightLoadError(f"{path}: model path does not exist (pass an HF model directory, a "
                                  f".gguf file, or nothing for the default model; nothing is downloaded)")
        path = hub
    if os.path.isfile(path):
        if os.path.basename(path) == "config.json":
            if load_format != "dummy":
                raise WeightLoadError(f"{path}: pass the model directory, not its config.json "
                                      f"(or load_format='dummy')")
            return _Resolved("hf", os.path.dirname(path), _display(os.path.dirname(path)))
        if _is_gguf_file(path) or load_format == "gguf":
            if load_format == "safetensors":
                raise WeightLoadError(f"{path}: a GGUF file cannot be loaded with load_format='safetensors'")
            return _Resolved("gguf", path, os.path.basename(path))
        raise WeightLoadError(f"{path}: not a model directory or a .gguf file")
    has_config = os.path.isfile(os.path.join(path, "config.json"))
    ggufs = sorted(glob.glob(os.path.join(path, "*.gguf")))
    if load_format == "gguf" or (not has_config and ggufs):
        if len(ggufs) == 1:
            return _Resolved("gguf", ggufs[0], os.path.basename(ggufs[0]))
        if not ggufs:
            raise WeightLoadError(f"{path}: no .gguf file in the directory")
        raise WeightLoadError(f"{path}: several .gguf files ({', '.join(map(os.path.basename, ggufs))}); "
                              f"pass the one to load")
    if not has_config:
        raise WeightLoadError(f"{os.path.join(path, 'config.json')}: missing config.json "
                              f"(an HF model directory needs one)")
    return _Resolved("hf", path, _display(path))


def _display(path: str) -> str:
    return os.path.basename(os.path.normpath(path)) or path


def _local_hub_snapshot(repo_id: str) -> Optional[str]:
    """An 'org/name' model id already in the local HF hub cache (never downloads)."""
    if repo_id.count("/") != 1 or repo_id.startswith((".", "/", "~")):
        return None
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(repo_id, local_files_only=True)
    except Exception:
        return None


# ---------------------------------------------------------------------------------------------------------
# Config, tokenizer, generation config


def _model_config(hf_config: Any, where: str):
    from jaxvllm.models.config import ModelConfig

    try:
        return ModelConfig.from_hf(hf_config)
    except (ValueError, KeyError, TypeError) as e:
        raise WeightLoadError(f"{where}: {e}") from e


def _generation_config(model_dir: Optional[str]) -> Optional[dict]:
    if model_dir is None:
        return None
    path = os.path.join(model_dir, "generation_config.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            d = json.load(f)
        return d if isinstance(d, dict) else None
    except (OSError, ValueError) as e:
        logger.warning("%s: ignored, cannot read it (%s)", path, e)
        return None


def _load_tokenizer(tokenizer: Optional[str], res: _Resolved) -> Any:
    # A GGUF's tokenizer is built from its metadata (converters/gguf_meta.py). AutoTokenizer is imported
    # only for HF directories: its module imports torch wherever torch is installed.
    from converters import gguf_meta

    if tokenizer is not None:
        tok_path = os.path.abspath(os.path.expanduser(tokenizer))
        if os.path.isfile(tok_path) and _is_gguf_file(tok_path):
            return gguf_meta.load_tokenizer(tok_path)
        from transformers import AutoTokenizer
        try:
            # A hub name is looked up in the local HF cache only: nothing is downloaded at run time.
            return AutoTokenizer.from_pretrained(tok_path if os.path.exists(tok_path) else tokenizer,
                                                 local_files_only=True)
        except Exception as e:
            raise WeightLoadError(f"{tokenizer}: cannot load the tokenizer ({type(e).__name__}: {e})") from e
    if res.kind == "gguf":
        return gguf_meta.load_tokenizer(res.path)
    if res.kind == "hf" and any(os.path.exists(os.path.join(res.path, n)) for n in _TOKENIZER_FILES):
        from transformers import AutoTokenizer
        try:
            return AutoTokenizer.from_pretrained(res.path)
        except Exception as e:
            raise WeightLoadError(f"{res.path}: cannot load the tokenizer ({type(e).__name__}: {e})") from e
    logger.info("%s: no tokenizer files; the model takes token ids only", res.display)
    return None


def load_model_tokenizer(source: Union[str, os.PathLike, dict, None] = None, *,
                         tokenizer: Optional[str] = None, load_format: str = "auto") -> Any:
    """The tokenizer `load_model(source, tokenizer=..., load_format=...)` would load (or None)."""
    return _load_tokenizer(tokenizer, resolve_source(source, _canonical_load_format(load_format)))


def _canonical_load_format(load_format: str) -> str:
    load_format = "safetensors" if load_format == "hf" else load_format
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format must be one of {LOAD_FORMATS}; got {load_format!r}")
    return load_format


# ---------------------------------------------------------------------------------------------------------
# The entry point


def load_model(source: Union[str, os.PathLike, dict, None] = None, *, dtype: str = "auto",
               load_format: str = "auto", seed: int = 0, cache_dir: Any = "auto",
               tokenizer: Optional[str] = None, load_tokenizer: bool = True,
               cache_min_bytes: Optional[int] = None, keep_gguf_quantized: bool = False) -> LoadedModel:
    """Load a model's params (on the default device), config and tokenizer.

    source: None (the embedded default model), an HF directory (config.json + *.safetensors, sharded or
      not), a .gguf file (or a directory holding exactly one and no config.json), an 'org/name' already in
      the local HF hub cache, or (load_format="dummy" only) a config.json path or an HF config dict.
    dtype: "auto" | "float32" | "bfloat16" | "float16" ("auto": see the module docstring).
    load_format: "auto" (by source), "safetensors", "gguf", or "dummy" (seeded random weights made on the
      device; only the config is read).
    cache_dir: converted-params cache root; "auto" = $XDG_CACHE_HOME/jaxvllm/weights (~/.cache/...);
      None or "none" disables it. What is cached (converters/cache.py): by default GGUF sources of at
      least 256 MiB; with `cache_min_bytes=N` (or env JAXVLLM_WEIGHT_CACHE_MIN_BYTES) any source whose
      weight files total at least N bytes (0: every source).
    tokenizer: another tokenizer path (HF directory or .gguf); load_tokenizer=False skips the tokenizer
      (load it later with `load_model_tokenizer`).
    keep_gguf_quantized: a GGUF's attention and MLP projections (and MoE experts) stored as
      Q4_0/Q4_1/Q4_K stay at 4 bits, in the int4 layout (models/int4.py), and Q5_0/Q5_1/Q5_K/Q6_K/
      Q8_0 projections at 8, in the int8 layout (models/int8.py) (the engine's
      quantization="gguf"); a ValueError for other sources.
    """
    from converters import cache as wcache
    from converters.hf import canonical_dtype

    dtype = canonical_dtype(dtype)
    load_format = _canonical_load_format(load_format)
    res = resolve_source(source, load_format)
    if load_format == "safetensors" and res.kind == "gguf":
        raise WeightLoadError(f"{res.path}: a GGUF file cannot be loaded with load_format='safetensors'")
    if keep_gguf_quantized and (res.kind != "gguf" or load_format == "dummy"):
        raise ValueError(f"quantization='gguf' keeps the quantized tensors of a GGUF file; "
                         f"{res.display} is not one (load_format {load_format!r})")

    # Config and checkpoint dtype.
    t0 = time.perf_counter()
    reader = None
    files: list[str] = []
    # HF directories and config dicts are read without transformers (ModelConfig.from_hf applies its
    # defaults): importing it was a third of a warm start, and the tokenizer thread imports it anyway.
    if res.kind == "config":
        hf_config = dict(res.config_dict)
        cfg = _model_config(hf_config, "config dict")
        ckpt_dtype = cfg.dtype
    elif res.kind == "hf":
        from converters.hf import read_config_dict

        hf_config = read_config_dict(res.path)
        cfg = _model_config(hf_config, os.path.join(res.path, "config.json"))
        if load_format == "dummy":
            ckpt_dtype = cfg.dtype
        else:
            from converters.hf import checkpoint_dtype, weight_files

            files = weight_files(res.path)[0]
            ckpt_dtype = checkpoint_dtype(hf_config, files)
    else:
        from converters import gguf_loader, gguf_meta

        reader = gguf_meta.open_reader(res.path)
        hf_config = gguf_meta.hf_config(reader, res.path)
        cfg = _model_config(hf_config, res.path)
        files = [res.path]
        ckpt_dtype = gguf_loader.checkpoint_dtype(reader, res.path)
    target = ckpt_dtype if dtype == "auto" else dtype
    cfg = dataclasses.replace(cfg, dtype=target)

    # Params.
    t1 = time.perf_counter()
    from_cache = False
    if load_format == "dummy":
        from converters.dummy import init_dummy_params

        params = init_dummy_params(cfg, target, seed)
        done_format = "dummy"
    else:
        done_format = "gguf" if res.kind == "gguf" else "safetensors"
        root = wcache.resolve_cache_dir(cache_dir)
        from converters.integer import int_checkpoint
        if keep_gguf_quantized or int_checkpoint(hf_config) is not None:
            root = None  # the int4 and int8 layouts are not the cache's (param_shapes)
        if root is not None and not wcache.should_cache(done_format, sum(os.path.getsize(f) for f in files),
                                                         cache_min_bytes):
            root = None
        params = None
        key = None
        if root is not None:
            from jaxvllm.models.params import param_shapes

            key = wcache.cache_key(res.path, files, target, done_format)
            params = wcache.WeightCache(root).load(key, wcache.abstract_params(param_shapes(cfg), target))
            from_cache = params is not None
        if params is None:
            params = _convert(res, cfg, target, reader, keep_gguf_quantized)
            from jaxvllm.models.params import KV_CACHE_SCALES
            from jaxvllm.models.quant import FP8
            if KV_CACHE_SCALES[0] in params["layers"][0] or any(
                    a.dtype == FP8 for a in params["layers"][0].values()):
                root = None  # FP8 KV-cache scales and FP8 linears are not in the cache's layout
            if root is not None:
                wcache.WeightCache(root).save(key, params, {"source": res.display, "dtype": target,
                                                             "format": done_format})
    del reader
    # Device work is asynchronous: wait for it so that "params" is the time the weights took.
    import jax
    jax.block_until_ready(params)
    t2 = time.perf_counter()
    tok = _load_tokenizer(tokenizer, res) if load_tokenizer else None
    seconds = {"config": t1 - t0, "params": t2 - t1}
    if load_tokenizer:
        seconds["tokenizer"] = time.perf_counter() - t2
    return LoadedModel(params=params, config=cfg, hf_config=hf_config, tokenizer=tok,
                       generation_config=_generation_config(res.path if res.kind == "hf" else None),
                       source=res.display, path=res.path, load_format=done_format, from_cache=from_cache,
                       seconds=seconds)


def _convert(res: _Resolved, cfg: Any, dtype: str, reader: Any = None,
             keep_gguf_quantized: bool = False) -> Any:
    """Read and convert the weights (the expensive step the cache skips)."""
    if res.kind == "gguf":
        from converters.gguf_loader import load_gguf_params

        return load_gguf_params(res.path, cfg, dtype, reader=reader, keep_quantized=keep_gguf_quantized)
    from converters.hf import load_hf_params

    return load_hf_params(res.path, cfg, dtype)
