"""The periodic-energy measures: near the data's for real images, high for the textures
that strided up-convolutions leave (a checkerboard; the same board at twice the size)."""

import numpy as np
import pytest

from aigc_jax.data.images import load_fashion_mnist
from aigc_jax.evaluation.spectrum import nyquist_energy, periodic_energy


@pytest.fixture(scope="module")
def halves():
  """Two disjoint sets of 2,000 real Fashion-MNIST test images [N, 28, 28, 1] uint8."""
  test = load_fashion_mnist().test_images
  return test[:2000], test[2000:4000]


def _board(images_u8: np.ndarray, amplitude: int, cell: int) -> np.ndarray:
  """images plus a +-amplitude checkerboard of cell x cell squares (period 2 x cell)."""
  H, W = images_u8.shape[1:3]
  board = ((np.add.outer(np.arange(H) // cell, np.arange(W) // cell) % 2) * 2 - 1) * amplitude
  return np.clip(images_u8.astype(np.int32) + board[None, :, :, None], 0, 255).astype(np.uint8)


def test_real_images_agree_and_a_checkerboard_stands_out(halves):
  a, b = nyquist_energy(halves[0]), nyquist_energy(halves[1])
  assert 0 < a < 0.01 and 0.8 < b / a < 1.25  # two halves of the data: about equal
  # Grey-level amplitudes of a checkerboard over the same images: the measure grows with it.
  textured = [nyquist_energy(_board(halves[0], amplitude, 1)) for amplitude in (2, 4, 8, 16)]
  assert a < textured[0] < textured[1] < textured[2] < textured[3]
  assert textured[2] / a > 3  # +-8 grey levels: clearly visible in the figure


def test_period_four_sees_the_enlarged_checkerboard_that_nyquist_misses(halves):
  a, b = periodic_energy(halves[0], 4), periodic_energy(halves[1], 4)
  assert 0 < a < 0.05 and 0.8 < b / a < 1.25
  textured = _board(halves[0], 8, 2)
  assert periodic_energy(textured, 4) / a > 1.4
  # A board of 2x2 squares has no power at the Nyquist frequency: period 2 barely moves.
  assert nyquist_energy(textured) / nyquist_energy(halves[0]) < 1.2


def test_pure_patterns_are_all_periodic_and_a_flat_image_none():
  grey = np.full((2, 8, 8, 1), 128, np.uint8)
  assert np.isclose(nyquist_energy(_board(grey, 50, 1)), 1.0)
  assert np.isclose(periodic_energy(_board(grey, 50, 2), 4), 1.0)
  assert nyquist_energy(np.full((3, 8, 8, 1), 7, np.uint8)) == 0.0


def test_periods_the_sides_cannot_hold_are_refused():
  with pytest.raises(ValueError, match="divisible"):
    periodic_energy(np.zeros((1, 6, 6, 1)), 4)
  with pytest.raises(ValueError, match="at least 2"):
    periodic_energy(np.zeros((1, 8, 8, 1)), 1)
  with pytest.raises(ValueError, match="even sides"):
    nyquist_energy(np.zeros((1, 7, 7, 1)))
