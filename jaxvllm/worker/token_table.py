"""Token bits on the device (see sampler.py): one int32 row per request that needs them (it has
penalties, or stop ids that min_tokens masks), in a table of max_num_seqs rows x vocabulary.

A row is written once, when its request (re)enters the batch, from the tokens the host holds, in
chunks of a fixed size (one small program for any prompt length); from then on each token sampled
for it is counted in it, on the device (`record`, after the sampler). So a step with penalties neither waits for the host nor sends
a history: its inputs stay one value per row, and the table is allocated before the KV cache is
sized, so its memory is reserved.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxvllm.worker.sampler import COUNT_UNIT, token_bit_entries

# (vocabulary id, value) pairs per write call: a 128k-token prompt takes 32 calls of 96 KiB each.
WRITE_CHUNK = 4096


class TokenTable:
    def __init__(self, num_slots: int, vocab_size: int,
                 sharding: Optional[jax.sharding.Sharding] = None,
                 write_chunk: int = WRITE_CHUNK) -> None:
        self.num_slots = num_slots
        self.vocab_size = vocab_size
        self.write_chunk = write_chunk
        shape = (num_slots, vocab_size)
        self.array = jax.jit(lambda: jnp.zeros(shape, jnp.int32), out_shardings=sharding)()
        self._free = list(range(num_slots - 1, -1, -1))
        self._zero: list[int] = []
        self._slots: list[np.ndarray] = []
        self._ids: list[np.ndarray] = []
        self._vals: list[np.ndarray] = []
        self._write = jax.jit(self._write_impl, donate_argnums=(0,))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def assign(self, prompt_ids: Sequence[int], output_ids: Sequence[int],
               stop_ids: Sequence[int]) -> int:
        """A free row for a request, queued to be zeroed and written (`take_writes`, then `write`)."""
        if not self._free:
            raise RuntimeError(f"all {self.num_slots} token-table rows are taken: more live "
                               f"requests than max_num_seqs")
        slot = self._free.pop()
        self._zero.append(slot)
        ids, vals = token_bit_entries(prompt_ids, output_ids, stop_ids)
        self._slots.append(np.full(len(ids), slot, np.int32))
        self._ids.append(ids)
        self._vals.append(vals)
        return slot

    def release(self, slot: int) -> None:
        self._free.append(slot)

    def take_writes(self) -> list[np.ndarray]:
        """The queued row writes as write-call inputs (host arrays), and the queue emptied: taken on
        the engine's thread, written (`write`) by the launch thread before the next program that
        reads the table."""
        if not self._zero:
            return []
        slots, ids, vals = (np.concatenate(x) for x in (self._slots, self._ids, self._vals))
        zero = np.full(self.num_slots, self.num_slots, np.int32)  # out of range: no row
        zero[:len(self._zero)] = self._zero
        self._zero, self._slots, self._ids, self._vals = [], [], [], []
        ok = (ids >= 0) & (ids < self.vocab_size)  # e.g. stop ids beyond the vocabulary
        slots, ids, vals = slots[ok], ids[ok].astype(np.int32), vals[ok]
        c, packed = self.write_chunk, []
        for i in range(0, max(len(ids), 1), c):
            packed.append(self.pack(zero, slots[i:i + c], ids[i:i + c], vals[i:i + c]))
            zero = np.full_like(zero, self.num_slots)  # zeroed by the first call only
        return packed

    def write(self, packed: list[np.ndarray]) -> None:
        """Dispatches write calls. Every call takes and returns the table, so they run in dispatch
        order on the device."""
        for p in packed:
            self.array = self._write(self.array, p)

    def pack(self, zero: np.ndarray, slots: np.ndarray, ids: np.ndarray,
             vals: np.ndarray) -> np.ndarray:
        """One write call's input as a single int32 array (one host->device transfer)."""
        n = len(ids)
        out = np.zeros(self.num_slots + 3 * self.write_chunk, np.int32)
        out[:self.num_slots] = zero
        e = out[self.num_slots:].reshape(3, self.write_chunk)
        e[0] = self.num_slots  # padding entries: out-of-range row, dropped
        e[0, :n], e[1, :n], e[2, :n] = slots, ids, vals
        return out

    def _write_impl(self, table: jax.Array, packed: jax.Array) -> jax.Array:
        zero = packed[:self.num_slots]
        slots, ids, vals = packed[self.num_slots:].reshape(3, self.write_chunk)
        table = table.at[zero].set(0, mode="drop")
        return table.at[slots, ids].add(vals, mode="drop")

    def warmup(self) -> Any:
        """Lowers the write program (for the start-up compile)."""
        return self._write.lower(self.array, self.pack(np.full(self.num_slots, self.num_slots,
                                                               np.int32), *(np.zeros(0, np.int32),) * 3))


def read_rows(table: jax.Array, slots: jax.Array) -> jax.Array:
    """The token bits of each batch row (i32[R, V]); a slot out of range (no row) reads zeros."""
    return table.at[slots].get(mode="fill", fill_value=0)


def record(table: jax.Array, slots: jax.Array, token_ids: jax.Array,
           counted: Optional[jax.Array] = None) -> jax.Array:
    """Counts each row's sampled token in its row of the table; rows without a slot, or (with
    speculative decoding) whose token is not output (`counted` false: a guess before it in its
    request was rejected), are dropped."""
    if counted is not None:
        slots = jnp.where(counted, slots, table.shape[0])
    return table.at[slots, token_ids].add(COUNT_UNIT, mode="drop")
