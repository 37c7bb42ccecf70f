"""The GAN sweep's summary and the image-model comparison (benchmarks/gan_sweep.py,
benchmarks/image_models.py) on small real runs and written metrics."""

import json

import pytest

from benchmarks import gan_sweep, image_models
from tests.conftest import DIFFUSION_CONFIG, GAN_CONFIG, run_cli


def _write_metrics(workdir, records):
  workdir.mkdir(parents=True)
  (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_the_sweep_summary_reads_fid_time_and_class_shares_per_setting(tmp_path):
  records = [{"step": 1000, "split": "train", "steps_per_sec": 5.0},
             {"step": 1000, "split": "val", "fid_classifier": 40.0},
             {"step": 2000, "split": "train", "steps_per_sec": 4.0},
             {"step": 2000, "split": "val", "fid_classifier": 20.123, "class_share_min_ratio": 0.7,
              "class_share_max_ratio": 1.4, "nyquist_ratio": 1.1, "period4_ratio": 0.9}]
  _write_metrics(tmp_path / "g", records)
  rows = gan_sweep.main(["--root", str(tmp_path), "--out", str(tmp_path / "sweep.json")])
  assert [r["setting"] for r in rows] == ["g"]  # only settings with a run
  r = rows[0]
  assert r["fid"] == {"1000": 40.0, "2000": 20.12} and r["train_seconds"]["2000"] == 450.0
  md = (tmp_path / "sweep.md").read_text()
  assert '| g: {"model.kernel_init": "glorot_uniform"} | 40.0 | 20.12 | - | 450.0 | 0.70-1.40 |' \
      in md
  assert gan_sweep.overrides("final")["model.width"] == 128  # the recipe the config holds


@pytest.mark.slow
def test_the_comparison_scores_every_model_with_one_classifier(tmp_path):
  """Tiny GAN and diffusion runs (EDM and flow matching) on the digits, scored together
  (real sampling, real FID)."""
  runs = {}
  for kind, config, flags in (("gan", GAN_CONFIG, []), ("edm", DIFFUSION_CONFIG, []),
                              ("flow", DIFFUSION_CONFIG, ["--config.loss.name=flow"])):
    runs[kind] = str(tmp_path / kind)
    proc = run_cli("train", "--config", config, "--workdir", runs[kind],
                   "--config.fid.samples=0", *flags)
    assert proc.returncode == 0, proc.stderr[-2000:]
  results = image_models.main(["--gan", runs["gan"], "--diffusion", runs["edm"],
                               "--diffusion", runs["flow"],
                               "--samples", "300", "--steps-sweep", "2,4",
                               "--sweep-samples", "200",
                               "--cache", str(tmp_path / "cache"),
                               "--out", str(tmp_path / "cmp.json"),
                               "--png", str(tmp_path / "cmp.png")])
  assert list(results["models"]) == ["gan", "diffusion (edm)", "diffusion (flow)"]
  gan, diffusion = results["models"]["gan"], results["models"]["diffusion (edm)"]
  flow = results["models"]["diffusion (flow)"]
  assert gan["nfe"] == 1 and diffusion["nfe"] == 11 == flow["nfe"]  # heun, 6 steps
  assert [s["nfe"] for s in diffusion["steps_sweep"]] == [3, 7]
  assert gan["fid_floor"] == diffusion["fid_floor"]  # one classifier, one sample count
  assert flow["fid_classifier"] != diffusion["fid_classifier"]  # two models, not one twice
  # The curve's points: fewer samples, so their own (higher) floor from the same classifier.
  assert diffusion["steps_sweep"][0]["fid_floor"] > gan["fid_floor"]
  md = (tmp_path / "cmp.md").read_text()
  assert "FID against sampling steps (200 samples each" in md
  assert "| diffusion (flow) | heun | 4 | 7 |" in md
  assert gan["train_seconds"] > 0 and diffusion["params"] > 0
  assert (tmp_path / "cmp.png").exists()
  assert "| gan (20 steps) |" in md
