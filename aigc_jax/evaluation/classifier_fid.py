"""`fid_classifier`: the Fréchet distance between real test images and generated images in
the features of a small CNN classifier trained on the same dataset (not Inception FID:
the features are this dataset's own, so figures compare across runs on one dataset only).

The classifier is trained once per dataset and cached (parameters and test accuracy) under
the run's workdir; `fid_floor` is the same distance between a sample of real training
images and the test set, the value a perfect generator would reach with this many samples.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from aigc_jax.data.images import ImageDataset, to_unit_range
from aigc_jax.evaluation.frechet import GaussianStats, feature_stats, frechet_distance
from aigc_jax.files import replaced_atomically

FEATURE_DIM = 64
_CACHE_VERSION = 1
_CHUNK = 500  # images per compiled feature call (the last chunk is padded)


class FeatureClassifier(nnx.Module):
  """images [B, H, W, C] in [-1, 1] -> (features [B, FEATURE_DIM], logits [B, classes])."""

  def __init__(self, image_shape: tuple[int, int, int], num_classes: int, *, rngs: nnx.Rngs):
    H, W, C = image_shape
    # Two strided convolutions: ~2 MFLOP per 28x28 image, so training it takes a minute
    # on two CPU cores and ~90% test accuracy on Fashion-MNIST.
    self.convs = nnx.List([nnx.Conv(C, 32, (3, 3), strides=2, rngs=rngs),
                           nnx.Conv(32, 64, (3, 3), strides=2, rngs=rngs)])
    flat = -(-H // 4) * -(-W // 4) * 64
    self.embed = nnx.Linear(flat, FEATURE_DIM, rngs=rngs)
    self.head = nnx.Linear(FEATURE_DIM, num_classes, rngs=rngs)

  def __call__(self, images_BHWC: jax.Array) -> tuple[jax.Array, jax.Array]:
    h = images_BHWC
    for conv in self.convs:
      h = nnx.relu(conv(h))
    features = self.embed(h.reshape(h.shape[0], -1))  # pre-activation: closer to Gaussian
    return features, self.head(nnx.relu(features))


@dataclasses.dataclass
class ClassifierFid:
  """A trained feature classifier bound to one dataset's real-image statistics."""

  dataset_name: str
  test_accuracy: float
  test_stats: GaussianStats
  fid_floor: float
  num_samples: int  # generated images per estimate (= real train images in the floor)
  _forward: object  # jitted (params, images) -> (features, logits)
  _params: object

  def _apply(self, images_u8: np.ndarray, output: int) -> np.ndarray:
    out = []
    for start in range(0, len(images_u8), _CHUNK):
      chunk = images_u8[start:start + _CHUNK]
      padded = np.concatenate([chunk, np.zeros((_CHUNK - len(chunk), *chunk.shape[1:]),
                                                chunk.dtype)]) if len(chunk) < _CHUNK else chunk
      result = self._forward(self._params, to_unit_range(padded))[output]
      out.append(np.asarray(result)[:len(chunk)])
    return np.concatenate(out)

  def features(self, images_u8: np.ndarray) -> np.ndarray:
    """uint8 images [N, H, W, C] -> float32 features [N, FEATURE_DIM]."""
    return self._apply(images_u8, 0)

  def predict(self, images_u8: np.ndarray) -> np.ndarray:
    """uint8 images [N, H, W, C] -> the classifier's class ids [N]."""
    return self._apply(images_u8, 1).argmax(-1)

  def class_shares(self, images_u8: np.ndarray, num_classes: int) -> np.ndarray:
    """float64 [num_classes]: the share of the images the classifier puts in each class
    (mode dropping shows as classes far below the data's share)."""
    counts = np.bincount(self.predict(images_u8), minlength=num_classes)
    return counts / max(1, counts.sum())

  def fid(self, images_u8: np.ndarray) -> float:
    """fid_classifier of generated uint8 images against the real test set."""
    return frechet_distance(feature_stats(self.features(images_u8)), self.test_stats)

  def summary(self) -> dict[str, float]:
    """{"fid_floor", "classifier_test_accuracy"}: the figures that sit beside fid_classifier."""
    return {"fid_floor": self.fid_floor, "classifier_test_accuracy": self.test_accuracy}


def _fingerprint(dataset: ImageDataset, epochs: int, seed: int) -> dict:
  return {"version": _CACHE_VERSION, "dataset": dataset.name,
          "image_shape": list(dataset.image_shape), "num_train": len(dataset.train_images),
          "num_test": len(dataset.test_images), "num_classes": dataset.num_classes,
          "feature_dim": FEATURE_DIM, "epochs": epochs, "seed": seed,
          # a cheap content check: a different file with the same sizes is caught
          "checksum": int(dataset.train_images[::97].astype(np.int64).sum())}


def _train(dataset: ImageDataset, epochs: int, seed: int, batch_size: int = 128):
  """Adam on cross-entropy over shuffled epochs; returns (graphdef, params)."""
  model = FeatureClassifier(dataset.image_shape, dataset.num_classes,
                            rngs=nnx.Rngs(params=seed))
  graphdef, params = nnx.split(model)
  tx = optax.adam(1e-3)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, images, labels):
    def loss_fn(params):
      logits = nnx.merge(graphdef, params)(images)[1]
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    grads = jax.grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  rng = np.random.default_rng(seed)
  n = len(dataset.train_images)
  batch_size = min(batch_size, n)
  for _ in range(epochs):
    order = rng.permutation(n)
    for start in range(0, n - batch_size + 1, batch_size):
      idx = order[start:start + batch_size]
      params, opt_state = step(params, opt_state, to_unit_range(dataset.train_images[idx]),
                               dataset.train_labels[idx])
  return graphdef, params


def _save(path: str, params, meta: dict) -> None:
  leaves = {f"leaf_{i}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(params))}
  with replaced_atomically(path, suffix=".npz") as tmp:  # never a half-written cache file
    np.savez(tmp, meta=np.array(json.dumps(meta)), **leaves)


def _load(path: str, abstract_params, fingerprint: dict):
  """(params, meta) from the cache, or None when it is absent, stale or unreadable."""
  if not os.path.exists(path):
    return None
  try:
    with np.load(path) as f:
      meta = json.loads(str(f["meta"]))
      treedef = jax.tree.structure(abstract_params)
      leaves = [f[f"leaf_{i}"] for i in range(treedef.num_leaves)]
  except (OSError, ValueError, KeyError) as e:
    logging.warning("ignoring unreadable classifier cache %s (%s); retraining", path, e)
    return None
  shapes_ok = all(a.shape == b.shape
                  for a, b in zip(leaves, jax.tree.leaves(abstract_params), strict=True))
  if meta.get("fingerprint") != fingerprint or not shapes_ok:
    return None
  return jax.tree.unflatten(treedef, [jnp.asarray(x) for x in leaves]), meta


def load_or_train(dataset: ImageDataset, cache_dir: str | None, *, num_samples: int,
                  epochs: int = 2, seed: int = 0) -> ClassifierFid:
  """The dataset's feature classifier (trained now, or read from `cache_dir`), its test
  accuracy, the test-set feature statistics and the train-vs-test floor with
  min(num_samples, test size) samples."""
  fingerprint = _fingerprint(dataset, epochs, seed)
  H, W, C = dataset.image_shape
  path = None if cache_dir is None else os.path.join(
      cache_dir, f"fid_classifier_{dataset.name}_{H}x{W}x{C}.npz")
  abstract = nnx.eval_shape(lambda: FeatureClassifier(dataset.image_shape,
                                                      dataset.num_classes, rngs=nnx.Rngs(0)))
  graphdef, abstract_params = nnx.split(abstract)
  cached = None if path is None else _load(path, abstract_params, fingerprint)
  if cached is None:
    graphdef, params = _train(dataset, epochs, seed)
    meta = None
  else:
    params, meta = cached

  forward = jax.jit(lambda params, x: nnx.merge(graphdef, params)(x))
  logits_fn = lambda params, x: forward(params, x)[1]
  if meta is None:
    correct = 0
    for start in range(0, len(dataset.test_images), _CHUNK):
      chunk = dataset.test_images[start:start + _CHUNK]
      logits = np.asarray(logits_fn(params, to_unit_range(chunk)))
      correct += int((logits.argmax(-1) == dataset.test_labels[start:start + _CHUNK]).sum())
    meta = {"fingerprint": fingerprint, "test_accuracy": correct / len(dataset.test_images)}
    if path is not None:
      try:
        os.makedirs(cache_dir, exist_ok=True)
        _save(path, params, meta)
      except OSError as e:  # a cache: a run read from a read-only workdir goes on without it
        logging.warning("cannot write the classifier cache %s (%s); it is trained again "
                        "next time", path, e.strerror or e)

  n = min(num_samples, len(dataset.test_images))
  evaluator = ClassifierFid(dataset.name, meta["test_accuracy"], None, 0.0, n, forward,
                            params)
  evaluator.test_stats = feature_stats(evaluator.features(dataset.test_images))
  train_idx = np.random.default_rng(seed).choice(len(dataset.train_images), n, replace=False)
  evaluator.fid_floor = evaluator.fid(dataset.train_images[np.sort(train_idx)])
  return evaluator
