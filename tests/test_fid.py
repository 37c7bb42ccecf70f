"""fid_classifier: the Fréchet distance, the cached feature classifier, and FID falling
as a GAN trains on real digits."""

import os

import jax
import numpy as np
import pytest

from aigc_jax.config import config_from_file
from aigc_jax.data.images import load_digits
from aigc_jax.evaluation.classifier_fid import load_or_train
from aigc_jax.evaluation.frechet import GaussianStats, feature_stats, frechet_distance
from aigc_jax.families.gan import Family
from tests.conftest import GAN_CONFIG


def random_stats(seed, dim=6):
  rng = np.random.default_rng(seed)
  return feature_stats(rng.normal(size=(500, dim)) @ rng.normal(size=(dim, dim))
                       + rng.normal(size=dim))


def test_frechet_distance_is_zero_for_identical_features_and_symmetric():
  a, b = random_stats(0), random_stats(1)
  assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
  assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-9)
  assert frechet_distance(a, b) > 1.0


def test_frechet_distance_matches_the_closed_form_for_diagonal_gaussians():
  mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, -1.0])
  v1, v2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
  expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
  got = frechet_distance(GaussianStats(mu1, np.diag(v1), 10), GaussianStats(mu2, np.diag(v2), 10))
  assert got == pytest.approx(expected, rel=1e-10)


@pytest.fixture(scope="module")
def digits():
  return load_digits()


def test_classifier_floor_is_far_below_noise_and_the_cache_is_reused(digits, tmp_path):
  fid = load_or_train(digits, str(tmp_path), num_samples=1000, epochs=10)
  assert fid.test_accuracy > 0.9
  assert fid.num_samples == len(digits.test_images)  # capped by the test split
  noise = np.random.default_rng(0).integers(0, 256, (fid.num_samples, 8, 8, 1), np.uint8)
  assert fid.fid_floor < 0.05 * fid.fid(noise)
  one_class = digits.train_images[digits.train_labels == 3][:fid.num_samples]
  assert fid.fid_floor < 0.1 * fid.fid(one_class)  # a mode-collapsed "generator" scores badly
  [cache] = os.listdir(tmp_path)
  stamp = os.path.getmtime(tmp_path / cache)
  again = load_or_train(digits, str(tmp_path), num_samples=1000, epochs=10)
  assert os.path.getmtime(tmp_path / cache) == stamp  # read, not retrained
  assert again.test_accuracy == fid.test_accuracy and again.fid_floor == fid.fid_floor
  other = load_or_train(digits, str(tmp_path), num_samples=1000, epochs=3)  # stale: retrains
  assert os.path.getmtime(tmp_path / cache) != stamp or other.test_accuracy != fid.test_accuracy


def test_a_corrupt_classifier_cache_is_retrained(digits, tmp_path):
  fid = load_or_train(digits, str(tmp_path), num_samples=200, epochs=2)
  [cache] = os.listdir(tmp_path)
  (tmp_path / cache).write_bytes(b"not a numpy file")
  again = load_or_train(digits, str(tmp_path), num_samples=200, epochs=2)
  assert again.test_accuracy == fid.test_accuracy  # same seed: the same classifier


def test_short_gan_training_lowers_fid_markedly():
  config = config_from_file(GAN_CONFIG)
  config.train.batch_size = 32
  family = Family(config, None)
  state = jax.jit(family.init_state)(jax.random.PRNGKey(0))
  before = family.sample_metrics(state)
  step = jax.jit(family.train_step)
  for _ in range(1000):
    state, _ = step(state, next(family.train_data))
  after = family.sample_metrics(state)
  assert after["fid_floor"] == before["fid_floor"]
  assert after["fid_classifier"] < 0.25 * before["fid_classifier"]
  assert after["fid_classifier"] > after["fid_floor"]
