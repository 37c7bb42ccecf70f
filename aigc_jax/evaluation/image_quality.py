"""The figures an image generator's samples are judged by, shared by the image families:
fid_classifier with its floor, and beside it what FID can hide — which classes the
samples fall in, and the texture up-convolutions leave."""

from __future__ import annotations

import numpy as np

from aigc_jax.data.images import ImageDataset
from aigc_jax.evaluation.classifier_fid import ClassifierFid
from aigc_jax.evaluation.spectrum import periodic_energy

# Texture measures: the samples' share of power at a period over the test set's.
TEXTURE_PERIODS = {"nyquist_ratio": 2, "period4_ratio": 4}


def data_texture(dataset: ImageDataset) -> dict[int, float]:
  """{period: the test set's share of spectral power at that period} for the periods the
  image sides hold (computed once per run: it reads the whole test set)."""
  H, W, _ = dataset.image_shape
  return {period: periodic_energy(dataset.test_images, period)
          for period in TEXTURE_PERIODS.values() if H % period == 0 and W % period == 0}


def sample_quality(fid: ClassifierFid, images_u8: np.ndarray, dataset: ImageDataset,
                   texture: dict[int, float], labels: np.ndarray | None = None) -> dict:
  """Metrics of generated images [N, H, W, C] uint8: fid_classifier, fid_floor and the
  classifier's test accuracy; class_share_min_ratio / _max_ratio (a class's share of the
  samples, by the classifier's head, over its share of the test set: near 0, a class
  dropped); nyquist_ratio / period4_ratio (`texture`: `data_texture(dataset)`); with the
  `labels` a conditional model was asked for, class_accuracy (the share the classifier
  puts in the asked class)."""
  classes = dataset.num_classes
  test_labels = dataset.test_labels
  data_shares = np.bincount(test_labels, minlength=classes) / len(test_labels)
  present = data_shares > 0
  predicted = fid.predict(images_u8)
  shares = np.bincount(predicted, minlength=classes) / len(predicted)
  ratios = shares[present] / data_shares[present]
  metrics = {"fid_classifier": fid.fid(images_u8), **fid.summary(),
             "class_share_min_ratio": float(ratios.min()),
             "class_share_max_ratio": float(ratios.max())}
  for name, period in TEXTURE_PERIODS.items():
    if texture.get(period):
      metrics[name] = periodic_energy(images_u8, period) / texture[period]
  if labels is not None:
    metrics["class_accuracy"] = float(np.mean(predicted == np.asarray(labels)))
  return metrics
