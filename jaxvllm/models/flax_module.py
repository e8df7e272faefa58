"""The engine's models as Flax NNX modules, for training: one model definition and one set of arrays
for a JAX stack that trains and samples.

`CausalLM` holds the engine's own params layout (models/params.py) as `nnx.Param`s and runs the
engine's own forward (the family's module from models/registry.py) with the KV cache left out: the
batch's tokens attend among themselves in a plain causal attention, so the forward is dense and
differentiable. `LLM.from_params(nnx.state(model), config)` serves the same arrays (no copy where
their placement fits), and `llm.update_weights(nnx.state(model))` takes them after a training step.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from jaxvllm.models.config import ModelConfig
from jaxvllm.models.params import KV_CACHE_SCALES
from jaxvllm.models.llama import ModelInputs
from jaxvllm.models.registry import get_model_module
from jaxvllm.worker.sampler import prompt_logprobs
from jaxvllm.worker.weight_swap import weight_chunks
from pallas_kernels import ragged_paged_attention
from pallas_kernels.ragged_paged_attention import uses_kernel
from pallas_kernels.reference import INVARIANT_CHUNK_KEYS, chunked_attention

_MASK = -1e30
_PAGE = 16  # the paged layout's block size in the GPU's invariant forward (any divisor of a row)


@dataclass(frozen=True)
class DenseAttention:
    """Causal attention among a [batch, length] block of new tokens (flattened to [T, ...] as the
    engine's are), in float32 as the engine's reference attention: a token sees the tokens of its
    row at positions up to its own (within the sliding window); a position of -1 marks padding,
    which nothing attends to. `invariant`: the batch-invariant engine's computation instead of one
    softmax over the whole row, so the sums run in the engine's order: on a GPU its attention
    kernel's invariant launch (`_paged`), elsewhere each token over fixed chunks of its context
    (pallas_kernels/reference.chunked_attention)."""
    batch: int
    invariant: bool = False

    def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array, inp: ModelInputs, *,
                 sm_scale: float, sliding_window: Optional[int] = None,
                 logits_soft_cap: Optional[float] = None) -> jax.Array:
        if self.invariant:
            kw = dict(sm_scale=sm_scale, sliding_window=sliding_window,
                      logits_soft_cap=logits_soft_cap)
            if uses_kernel(q.shape[-1]):
                return _paged_invariant(q, k, v, inp.positions, self, tuple(kw.items()))
            return self._chunked(q, k, v, inp.positions, **kw)
        t, hq, d = q.shape
        b, hkv = self.batch, k.shape[1]
        length, g = t // b, hq // hkv
        qf = q.astype(jnp.float32).reshape(b, length, hkv, g, d) * sm_scale
        kf = k.astype(jnp.float32).reshape(b, length, hkv, d)
        vf = v.astype(jnp.float32).reshape(b, length, hkv, d)
        s = jnp.einsum("bqkgd,bskd->bkgqs", qf, kf, precision=jax.lax.Precision.HIGHEST)
        if logits_soft_cap is not None:
            s = logits_soft_cap * jnp.tanh(s / logits_soft_cap)
        pos = inp.positions.reshape(b, length)
        qpos, kpos = pos[:, :, None], pos[:, None, :]
        mask = (kpos <= qpos) & (kpos >= 0)
        if sliding_window is not None:
            mask &= qpos - kpos < sliding_window
        s = jnp.where(mask[:, None, None], s, _MASK)
        p = jax.nn.softmax(s, axis=-1)
        out = jnp.einsum("bkgqs,bskd->bqkgd", p, vf, precision=jax.lax.Precision.HIGHEST)
        return out.reshape(t, hq, d).astype(q.dtype)

    def _by_position(self, k: jax.Array, v: jax.Array, positions: jax.Array
                     ) -> tuple[jax.Array, jax.Array, jax.Array, int]:
        """Each row's keys and values by position, as the engine's cache holds a sequence's
        (padding dropped): ([batch * width, Hkv, D] twice, each token's row, width)."""
        t, hkv, d = k.shape
        length = t // self.batch
        width = -(-length // INVARIANT_CHUNK_KEYS) * INVARIANT_CHUNK_KEYS
        row = jnp.arange(t, dtype=jnp.int32) // length
        slot = jnp.where(positions >= 0, row * width + positions, self.batch * width)
        rows_k = jnp.zeros((self.batch * width, hkv, d), k.dtype).at[slot].set(k, mode="drop")
        rows_v = jnp.zeros((self.batch * width, hkv, d), v.dtype).at[slot].set(v, mode="drop")
        return rows_k, rows_v, row, width

    def _paged(self, q: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array,
               **kw: Any) -> jax.Array:
        """The engine's invariant attention kernel over the rows laid out as a paged cache, each
        token a sequence of its own (its context the keys at positions up to its own): a token's
        arithmetic in that kernel does not depend on the tokens beside it."""
        rows_k, rows_v, row, width = self._by_position(k, v, positions)
        t, hkv, d = k.shape
        pages = width // _PAGE
        tables = row[:, None] * pages + jnp.arange(pages, dtype=jnp.int32)[None, :]
        cache = lambda x: x.reshape(-1, _PAGE, hkv, d)  # noqa: E731
        out = ragged_paged_attention(q, cache(rows_k), cache(rows_v),
                                     jnp.where(positions >= 0, positions + 1, 0), tables,
                                     jnp.arange(t + 1, dtype=jnp.int32), jnp.array([t], jnp.int32),
                                     impl="kernel", invariant=True, **kw)
        return jnp.where((positions >= 0)[:, None, None], out, 0).astype(q.dtype)

    def _chunked(self, q: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array,
                 **kw: Any) -> jax.Array:
        t, hq, d = q.shape
        hkv = k.shape[1]
        chunk = INVARIANT_CHUNK_KEYS
        rows_k, rows_v, row, width = self._by_position(k, v, positions)
        n_chunks = width // chunk  # a static trip count: a differentiable loop

        def key_chunk(c: jax.Array) -> tuple[jax.Array, jax.Array]:
            idx = row[:, None] * width + c * chunk + jnp.arange(chunk, dtype=jnp.int32)[None, :]
            return rows_k[idx].astype(jnp.float32), rows_v[idx].astype(jnp.float32)

        qf = q.astype(jnp.float32).reshape(t, hkv, hq // hkv, d) * kw.pop("sm_scale")
        out = chunked_attention(qf, key_chunk, positions, jnp.full((t,), width, jnp.int32),
                                n_chunks, chunk, invariant=True, **kw)
        out = jnp.where((positions >= 0)[:, None, None, None], out, 0.0)
        return out.reshape(t, hq, d).astype(q.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _paged_invariant(q: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array,
                     attn: DenseAttention, kw: tuple) -> jax.Array:
    """Batch-invariant attention on a GPU: forward by the engine's kernel (bitwise the engine's),
    gradients by the reference's chunks (the same function up to rounding; the kernel has no
    derivative of its own)."""
    return attn._paged(q, k, v, positions, **dict(kw))


def _paged_invariant_fwd(q, k, v, positions, attn, kw):
    return _paged_invariant(q, k, v, positions, attn, kw), (q, k, v, positions)


def _paged_invariant_bwd(attn, kw, res, g):
    q, k, v, positions = res
    _, vjp = jax.vjp(lambda q, k, v: attn._chunked(q, k, v, positions, **dict(kw)), q, k, v)
    return (*vjp(g), None)


_paged_invariant.defvjp(_paged_invariant_fwd, _paged_invariant_bwd)


def dense_inputs(token_ids: jax.Array, positions: jax.Array) -> ModelInputs:
    """A [B, L] block as the engine's flat batch of B sequences with no cache behind them."""
    b, length = token_ids.shape
    lengths = jnp.sum(positions >= 0, axis=1).astype(jnp.int32)
    return ModelInputs(token_ids=token_ids.reshape(-1).astype(jnp.int32),
                       positions=positions.reshape(-1).astype(jnp.int32),
                       slot_mapping=jnp.full((b * length,), -1, jnp.int32),
                       query_start_loc=jnp.arange(b + 1, dtype=jnp.int32) * length,
                       seq_lens=lengths, block_tables=jnp.zeros((b, 1), jnp.int32),
                       num_seqs=jnp.array([b], jnp.int32))


def _quantized(path: tuple, leaf: jax.Array) -> bool:
    """A leaf of a quantized serving form: scales/zero points/permutations beside packed weights,
    integer weights, or 8-bit floats. An FP8 KV cache's scales (`k_cache_scale`, from a
    checkpoint) are none: a forward without a cache leaves them unused."""
    names = [str(getattr(k, "key", "")) for k in path]
    if any(n.endswith(("_scale", "_zero", "_min", "_perm")) and n not in KV_CACHE_SCALES
           for n in names):
        return True
    return not jnp.issubdtype(leaf.dtype, jnp.floating) or jnp.dtype(leaf.dtype).itemsize < 2


class CausalLM(nnx.Module):
    """A model family's forward over the engine's params layout, as an NNX module.

    `CausalLM(params, config)`: params in the engine's layout (e.g. `converters.load_model(...)
    .params`, or `LLM.llm_engine.runner.params`), config an HF config (object or dict) or a
    ModelConfig. `CausalLM.load(model)` loads as `LLM(model)` would. Quantized params (FP8, int4)
    are refused: they are the engine's serving forms, not trainable ones. `batch_invariant`: the
    forward of an engine in batch-invariant mode (`LLM(..., batch_invariant=True)`), bitwise: the
    same GEMM row tiles, ordered sums and attention chunks; in bfloat16 compile it as the engine
    compiles its programs, `jax.jit(..., compiler_options=layers.INVARIANT_COMPILER_OPTIONS)` (or
    with XLA_FLAGS=--xla_allow_excess_precision=false), or XLA may skip a bf16 rounding."""

    def __init__(self, params: dict, config: Any, batch_invariant: bool = False) -> None:
        cfg = config if isinstance(config, ModelConfig) else ModelConfig.from_hf(
            config if isinstance(config, dict) else config.to_dict())
        if batch_invariant and cfg.num_experts:
            raise ValueError("batch_invariant is not supported for mixture-of-experts models yet")
        for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
            if _quantized(path, leaf):
                raise ValueError(f"params{jax.tree_util.keystr(path)}: a quantized weight "
                                 f"({leaf.dtype}); CausalLM trains unquantized params")
        # pallas_gemms off whatever the config says (an engine's has it on GPUs): the dense
        # forward is differentiated, and the decode step's Pallas kernels have no gradients.
        self.config = dataclasses.replace(cfg, dtype=str(params["final_norm"].dtype),
                                          batch_invariant=batch_invariant, pallas_gemms=False)
        self._model = get_model_module(cfg.architecture)
        self.embed = nnx.Param(params["embed"])
        self.final_norm = nnx.Param(params["final_norm"])
        if "lm_head" in params:
            self.lm_head = nnx.Param(params["lm_head"])
        self.layers = nnx.List([nnx.Dict({k: nnx.Param(v) for k, v in lp.items()})
                                for lp in params["layers"]])

    @classmethod
    def load(cls, model: Optional[str] = None, dtype: str = "auto", batch_invariant: bool = False,
             **load_kw: Any) -> "CausalLM":
        """The weights `LLM(model, dtype=dtype)` serves (None: the embedded default model);
        `load_kw` as converters.load_model's."""
        from converters import load_model
        loaded = load_model(model, dtype=dtype, load_tokenizer=False, **load_kw)
        return cls(loaded.params, loaded.config, batch_invariant)

    def params(self) -> dict:
        """The engine's layout: the same arrays (this module's, traced under nnx.grad or jit)."""
        out = {"embed": self.embed[...], "final_norm": self.final_norm[...],
               "layers": [{k: p[...] for k, p in lp.items()} for lp in self.layers]}
        if hasattr(self, "lm_head"):
            out["lm_head"] = self.lm_head[...]
        return out

    def weight_chunks(self) -> Iterator[dict[str, jax.Array]]:
        """The weights by the engine's names, a layer per dict ("layers.3.q", ...), then the rest:
        for LLM.update_weights between start_weight_update() and finish_weight_update()."""
        return weight_chunks(self.params())

    def __call__(self, token_ids: jax.Array, positions: Optional[jax.Array] = None) -> jax.Array:
        """float32 logits [B, L, vocab] of int token_ids [B, L]. positions [B, L] default to
        0..L-1; a position of -1 marks padding (its logits are meaningless), so a left-padded
        batch counts each row's positions from its first real token."""
        b, length = token_ids.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
        params = self.params()
        inp = dense_inputs(token_ids, positions)
        hidden, _ = self._model.forward(params, None, inp, self.config,
                                        DenseAttention(b, self.config.batch_invariant))
        logits = self._model.compute_logits(params, hidden, self.config)
        return logits.reshape(b, length, -1)


def token_logprobs(logits: jax.Array, token_ids: jax.Array, batch_invariant: bool = False
                   ) -> jax.Array:
    """log p(token_ids[:, i + 1] | tokens up to i): float32 [B, L - 1], what LLM.score returns for
    the same tokens, computed as it computes them (`batch_invariant`: as an engine in that mode)."""
    b, length, vocab = logits.shape
    rows = logits[:, :-1].reshape(-1, vocab)
    logprob = prompt_logprobs(rows, token_ids[:, 1:].reshape(-1), invariant=batch_invariant)[0]
    return logprob.reshape(b, length - 1)
