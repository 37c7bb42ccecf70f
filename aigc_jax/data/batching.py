"""Seeded, random-access batch sources whose position is a checkpointable integer.

Batch i is a pure function of (seed, i), so resuming needs only the index of the next
batch, and a restarted run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import functools
import hashlib

import numpy as np

from aigc_jax.errors import UserError


class SeededBatches:
  """Iteration, position and seed check for a source whose `batch(i)` is a pure function
  of (seed, i)."""

  seed: int
  next_index: int = 0
  # The rows of every global batch this process builds (with several processes, the
  # loop sets it to the rows its devices hold); the draws behind them are the same.
  rows: slice = slice(None)

  def batch(self, index: int) -> dict[str, np.ndarray]:
    """Batch `index`: a dict of [B, ...] numpy arrays, a pure function of (seed, index)."""
    raise NotImplementedError

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    out = self.batch(self.next_index)
    self.next_index += 1
    return out

  def source_arrays(self) -> dict[str, np.ndarray]:
    """The arrays every batch is drawn from (what the fingerprint covers); {}: none."""
    return {}

  @functools.cached_property
  def fingerprint(self) -> dict | None:
    """{"size": N, "blake2b": hex}: the length and a hash of `source_arrays()` (their
    names, dtypes, shapes and bytes), computed once; None without source arrays."""
    arrays = self.source_arrays()
    if not arrays:
      return None
    digest = hashlib.blake2b(digest_size=16)
    for name, array in sorted(arrays.items()):
      array = np.ascontiguousarray(array)
      digest.update(f"{name}:{array.dtype.str}:{array.shape};".encode())
      digest.update(array.reshape(-1).view(np.uint8))  # no copy; empty arrays too
    return {"size": len(next(iter(arrays.values()))), "blake2b": digest.hexdigest()}

  def get_state(self) -> dict:
    """{"next_index", "seed", "data"}: the position to resume from, and the data's
    fingerprint (checked when a training run resumes)."""
    state = {"next_index": int(self.next_index), "seed": int(self.seed)}
    if self.fingerprint is not None:
      state["data"] = self.fingerprint
    return state

  def set_state(self, state: dict) -> None:
    """Resumes at a position from `get_state` (UserError if the seed differs)."""
    if int(state["seed"]) != self.seed:
      raise UserError(f"the checkpoint's data iterator used seed {state['seed']}, this run "
                      f"{self.seed}: resume with the original seed or start a new workdir")
    self.next_index = int(state["next_index"])


class TokenWindows(SeededBatches):
  """Random windows of `seq_len + 1` tokens from one id stream.

  batch(i) = {"inputs": [B, T] int32, "targets": [B, T] int32} with targets = inputs
  shifted left by one.
  """

  def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int):
    if tokens.ndim != 1:
      raise UserError(f"token stream must be 1-D, got shape {tokens.shape}")
    if len(tokens) < seq_len + 2:
      raise UserError(f"the training split has {len(tokens)} tokens, fewer than "
                      f"data.seq_len + 2 = {seq_len + 2}: add data or lower data.seq_len")
    self.tokens, self.batch_size, self.seq_len, self.seed = tokens, batch_size, seq_len, seed
    self.next_index = 0
    self._offsets = np.arange(seq_len + 1)

  def source_arrays(self) -> dict[str, np.ndarray]:
    return {"tokens": self.tokens}

  def batch(self, index: int) -> dict[str, np.ndarray]:
    """{"inputs", "targets"}: [B, T] int32 windows at seeded random offsets."""
    rng = np.random.default_rng([self.seed, index])
    starts = rng.integers(0, len(self.tokens) - self.seq_len - 1, size=self.batch_size)
    starts = starts[self.rows]
    window = self.tokens[starts[:, None] + self._offsets].astype(np.int32)
    return {"inputs": window[:, :-1], "targets": window[:, 1:]}


def eval_windows(tokens: np.ndarray, batch_size: int, seq_len: int,
                 max_batches: int) -> list[dict[str, np.ndarray]]:
  """Non-overlapping windows spread evenly over a validation stream, in whole batches."""
  n_windows = (len(tokens) - 1) // seq_len
  n_batches = min(max_batches, n_windows // batch_size)
  if n_batches < 1:
    raise UserError(f"the validation split has {len(tokens)} tokens, fewer than one batch "
                    f"of train.batch_size x (data.seq_len + 1) = {batch_size} x {seq_len + 1}: "
                    "add validation data (data.val_path or data.val_fraction) or lower them")
  n = n_batches * batch_size
  chosen = np.linspace(0, n_windows - 1, n).round().astype(np.int64) * seq_len
  window = tokens[chosen[:, None] + np.arange(seq_len + 1)].astype(np.int32)
  return [{"inputs": window[i:i + batch_size, :-1], "targets": window[i:i + batch_size, 1:]}
          for i in range(0, n, batch_size)]


class EpochOrder:
  """Which rows make batch i when every example is seen once per epoch, in an order
  permuted afresh each epoch from (seed, epoch): a pure function of (seed, i)."""

  def __init__(self, size: int, batch_size: int, seed: int):
    self.size, self.batch_size, self.seed = size, batch_size, seed
    self._perms: dict[int, np.ndarray] = {}

  def _permutation(self, epoch: int) -> np.ndarray:
    if epoch not in self._perms:
      if len(self._perms) >= 2:  # a batch spans at most two epochs
        self._perms.pop(min(self._perms))
      self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.size)
    return self._perms[epoch]

  def rows(self, index: int, part: slice = slice(None)) -> np.ndarray:
    """int [B] (or its `part`): rows index*B .. index*B + B - 1 of the epoch order."""
    positions = (index * self.batch_size + np.arange(self.batch_size))[part]
    return np.asarray([self._permutation(int(p) // self.size)[int(p) % self.size]
                       for p in positions], np.int64)


class ExampleBatches(SeededBatches):
  """Batches of whole examples (rows of equal-length arrays), in epochs: every example is
  seen once per epoch, in an order permuted afresh each epoch from (seed, epoch).

  batch(i) = {key: array[rows]} for B rows; a pure function of (seed, i).
  """

  def __init__(self, arrays: dict[str, np.ndarray], batch_size: int, seed: int):
    sizes = {len(v) for v in arrays.values()}
    if len(sizes) != 1 or not sizes.pop():
      raise UserError("the training examples are empty (or their fields differ in length)")
    self.arrays, self.batch_size, self.seed, self.next_index = arrays, batch_size, seed, 0
    self.size = len(next(iter(arrays.values())))
    self._order = EpochOrder(self.size, batch_size, seed)

  def source_arrays(self) -> dict[str, np.ndarray]:
    return self.arrays

  def batch(self, index: int) -> dict[str, np.ndarray]:
    """{key: [B, ...]}: rows index*B .. index*B + B - 1 of the epoch-permuted order."""
    rows = self._order.rows(index, self.rows)
    return {k: v[rows] for k, v in self.arrays.items()}
