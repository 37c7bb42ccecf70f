"""Prepared tensorflow-datasets splits, read without downloading (machines running aigc_jax
may have no network): a missing extra or unprepared dataset is one clear error."""

from __future__ import annotations

from collections.abc import Iterator

from aigc_jax.errors import UserError


def tfds_examples(name: str, split: str, data_dir: str | None,
                  data_dir_key: str = "data.tfds_data_dir") -> Iterator[dict]:
  """The examples of a prepared tfds split, as dicts of numpy values."""
  try:
    import tensorflow_datasets as tfds
  except ImportError as e:
    raise UserError(f"tfds dataset {name!r} needs tensorflow-datasets: "
                    "pip install 'aigc_jax[tfds]'") from e
  try:
    ds = tfds.load(name, split=split, data_dir=data_dir or None, download=False)
  except Exception as e:  # tfds raises several types for a missing or unprepared dataset
    raise UserError(f"tfds dataset {name!r} (split {split!r}) is not prepared in "
                    f"{data_dir or 'the default tfds data_dir'}: prepare it on a machine with "
                    f"network access (`tfds build {name}`) and copy it there, or set "
                    f"{data_dir_key} ({type(e).__name__}: {e})") from e
  return iter(tfds.as_numpy(ds))
