"""The Nyquist-energy measure: near the data's for real images, high for a checkerboard."""

import numpy as np

from aigc_jax.data.images import load_digits
from aigc_jax.evaluation.spectrum import nyquist_energy


def _checkerboard(images_u8: np.ndarray, amplitude: int) -> np.ndarray:
  H, W = images_u8.shape[1:3]
  board = ((np.add.outer(np.arange(H), np.arange(W)) % 2) * 2 - 1) * amplitude
  return np.clip(images_u8.astype(np.int32) + board[None, :, :, None], 0, 255).astype(np.uint8)


def test_real_images_agree_and_a_checkerboard_stands_out():
  dataset = load_digits()  # real 8x8 digits
  half = len(dataset.train_images) // 2
  a = nyquist_energy(dataset.train_images[:half])
  b = nyquist_energy(dataset.train_images[half:])
  assert 0 < a < 0.05 and 0.8 < b / a < 1.25  # two halves of the data: about equal
  # Grey-level amplitudes of a checkerboard over the same images: the measure grows with it.
  textured = [nyquist_energy(_checkerboard(dataset.train_images[:half], amplitude))
              for amplitude in (2, 8, 16, 32)]
  assert a < textured[0] < textured[1] < textured[2] < textured[3]
  assert textured[3] / a > 2.5


def test_a_pure_checkerboard_is_all_nyquist_and_a_flat_image_none():
  board = _checkerboard(np.full((2, 8, 8, 1), 128, np.uint8), 50)
  assert np.isclose(nyquist_energy(board), 1.0)
  assert nyquist_energy(np.full((3, 8, 8, 1), 7, np.uint8)) == 0.0
