"""The classic DCGAN peer of benchmarks/gan_quality.py (the TF tutorial's, in PyTorch):
shapes, exact parameter counts, and a few training steps with evaluation callbacks."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the PyTorch peer needs the crosscheck extra")

from benchmarks import gan_quality  # noqa: E402
from benchmarks import torch_classic_dcgan as peer  # noqa: E402

# The TF tutorial's model summaries: G 2,305,472 trainable parameters
# (Dense 100*12544 + BatchNorm 2*12544 + ConvT 256*128*25 + BN 2*128 + ConvT 128*64*25
# + BN 2*64 + ConvT 64*25), D 212,865 (Conv 25*64+64 + Conv 64*128*25+128 + Dense 6272+1).
G_PARAMS = 100 * 7 * 7 * 256 + 2 * 7 * 7 * 256 + 256 * 128 * 25 + 2 * 128 + 128 * 64 * 25 \
    + 2 * 64 + 64 * 25
D_PARAMS = (25 * 64 + 64) + (64 * 128 * 25 + 128) + (7 * 7 * 128 + 1)


def test_shapes_and_parameter_counts_match_the_tf_tutorial():
  assert (G_PARAMS, D_PARAMS) == (2_305_472, 212_865)
  torch.manual_seed(0)
  g, d = peer.build()
  assert (peer.param_count(g), peer.param_count(d)) == (G_PARAMS, D_PARAMS)
  g.eval()
  d.eval()
  with torch.no_grad():
    x = g(torch.randn(5, 100))
    logits = d(x)
  assert x.shape == (5, 1, 28, 28) and logits.shape == (5, 1)
  assert float(x.min()) >= -1 and float(x.max()) <= 1
  images = peer.generate(g, 7, seed=3)
  assert images.shape == (7, 28, 28, 1) and images.dtype == np.uint8
  np.testing.assert_array_equal(images, peer.generate(g, 7, seed=3))  # fixed noise
  assert not g.training  # generate restores the mode it found
  g.train()
  peer.generate(g, 2, seed=0)
  assert g.training


def test_a_three_step_run_has_finite_losses_and_calls_eval_at_the_given_steps():
  images = np.random.default_rng(0).integers(0, 256, (150, 28, 28, 1), dtype=np.uint8)
  calls = []

  def on_eval(step, g):
    calls.append(step)
    assert peer.generate(g, 4, seed=0).shape == (4, 28, 28, 1)

  # 150 images: two batches of 64 per epoch, so step 3 starts a new permutation
  result = peer.train(images, 3, seed=0, eval_steps=[1, 3, 7], on_eval=on_eval, threads=1)
  assert calls == result["eval_steps"] == [1, 3]
  assert len(result["train_seconds"]) == 2
  assert 0 < result["train_seconds"][0] <= result["train_seconds"][1]
  assert len(result["d_loss"]) == len(result["g_loss"]) == 3
  assert np.isfinite(result["d_loss"]).all() and np.isfinite(result["g_loss"]).all()
  assert result["g"].training  # training mode again after the callbacks


def test_our_curve_sums_training_time_from_steps_per_sec(tmp_path):
  records = [{"step": 10, "split": "train", "steps_per_sec": 5.0},
             {"step": 20, "split": "train", "steps_per_sec": 10.0},
             {"step": 20, "split": "val", "fid_classifier": 50.0},
             {"step": 30, "split": "train", "steps_per_sec": 10.0},
             {"step": 30, "split": "val", "fid_classifier": 40.0}]
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  curve = gan_quality.ours_curve(str(tmp_path))
  assert [(r["step"], r["fid_classifier"]) for r in curve] == [(20, 50.0), (30, 40.0)]
  assert [r["train_seconds"] for r in curve] == pytest.approx([3.0, 4.0])
  md = gan_quality.table([{"step": 30, "fid_classifier": 60.0, "train_seconds": 9.0}], curve)
  assert "| 20 | - | - | 50.00 | 3.0 |" in md and "| 30 | 60.00 | 9.0 | 40.00 | 4.0 |" in md
