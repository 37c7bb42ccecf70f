import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aigc_jax.config import config_from_file
from aigc_jax.errors import UserError
from aigc_jax.families.lm import Family
from aigc_jax.train import Checkpointer, train_and_evaluate
from aigc_jax.train.loop import open_run
from tests.conftest import DIFFUSION_CONFIG, GAN_CONFIG, TINY_CONFIG, VAE_CONFIG, run_python


def unigram_entropy(ids: np.ndarray) -> float:
  p = np.bincount(ids.astype(np.int64)) / len(ids)
  p = p[p > 0]
  return float(-(p * np.log(p)).sum())


@pytest.mark.sharded
def test_validation_loss_falls_well_below_unigram_entropy(tmp_path):
  cfg = config_from_file(TINY_CONFIG, {"train.steps": 300, "train.eval_every": 300,
                                       "train.checkpoint_every": 300, "train.log_every": 10})
  summary = train_and_evaluate(cfg, str(tmp_path), progress=False)
  family = Family(cfg, None)
  entropy = unigram_entropy(family._token_streams[0])
  assert summary["val_loss"] < 0.8 * entropy, (summary, entropy)
  records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  train_losses = [r["loss"] for r in records if r["split"] == "train"]
  assert train_losses[-1] < train_losses[0] - 1.0
  assert summary["val_bits_per_byte"] == pytest.approx(summary["val_loss"] / np.log(2), rel=1e-6)


@pytest.mark.sharded
def test_a_single_batch_can_be_overfit(tiny_config):
  tiny_config.optim.update(lr=1e-2, warmup_steps=10, weight_decay=0.0)
  tiny_config.train.steps = 150
  family = Family(tiny_config, None)
  state = jax.jit(family.init_state)(jax.random.PRNGKey(0))
  batch = family.train_data.batch(0)
  step = jax.jit(family.train_step, donate_argnums=0)
  for _ in range(150):
    state, metrics = step(state, batch)
  assert float(metrics["loss"]) < 0.1


@pytest.mark.sharded
def test_train_step_compiles_once(tiny_config):
  family = Family(tiny_config, None)
  traces = []

  def counted(state, batch):
    traces.append(1)
    return family.train_step(state, batch)

  step = jax.jit(counted, donate_argnums=0)
  state = jax.jit(family.init_state)(jax.random.PRNGKey(0))
  for _ in range(4):
    state, metrics = step(state, next(family.train_data))
  jax.block_until_ready(metrics)
  assert len(traces) == 1 and int(state.step) == 4


@pytest.mark.sharded
def test_gradient_accumulation_matches_one_big_batch(tiny_config):
  results = []
  for accum in (1, 4):
    tiny_config.train.grad_accum_steps = accum
    family = Family(tiny_config, None)
    state = jax.jit(family.init_state)(jax.random.PRNGKey(0))
    new_state, metrics = jax.jit(family.train_step)(state, family.train_data.batch(0))
    results.append((new_state.params, metrics["loss"], metrics["grad_norm"]))
  (p1, l1, g1), (p4, l4, g4) = results
  np.testing.assert_allclose(l1, l4, rtol=1e-5)
  np.testing.assert_allclose(g1, g4, rtol=1e-4)
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p4), strict=True):
    np.testing.assert_allclose(a, b, atol=1e-6)


SHARDED = """
import json, sys, jax, numpy as np
from aigc_jax.config import config_from_file
from aigc_jax.train.family import load_family
from aigc_jax.train import mesh as mesh_lib
out = {}
for n in (1, 8):
  cfg = config_from_file(sys.argv[1], {"mesh.num_devices": n, "train.batch_size": 16})
  family = load_family(cfg.family).Family(cfg, None)
  mesh = mesh_lib.make_mesh(n)
  rep = mesh_lib.replicated(mesh)
  state = jax.jit(family.init_state, out_shardings=rep)(jax.random.PRNGKey(0))
  sh = jax.tree.map(lambda _: rep, state)
  step = jax.jit(family.train_step, in_shardings=(sh, mesh_lib.batch_sharding(mesh)),
                 out_shardings=(sh, rep), donate_argnums=0)
  losses = []
  for _ in range(3):
    batch = mesh_lib.put_batch(next(family.train_data), mesh)
    state, m = step(state, batch)
    losses.append(float(m[family.plot_keys[0]]))
  out[n] = (losses, [np.asarray(x) for x in jax.tree.leaves(state)],
            len(jax.tree.leaves(batch)[0].sharding.device_set))
(l1, p1, d1), (l8, p8, d8) = out[1], out[8]
print(json.dumps({"devices": [d1, d8], "loss_diff": float(np.max(np.abs(np.subtract(l1, l8)))),
                  "param_diff": max(float(np.max(np.abs(a - b))) for a, b in zip(p1, p8))}))
"""


@pytest.mark.parametrize("config", [TINY_CONFIG, GAN_CONFIG, VAE_CONFIG, DIFFUSION_CONFIG])
def test_one_and_eight_devices_agree(config):
  proc = run_python(SHARDED, {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"},
                    args=[config])
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result["devices"] == [1, 8]
  assert result["loss_diff"] < 1e-5 and result["param_diff"] < 1e-5, result


RESUME = """
import json, sys
from aigc_jax.config import config_from_file
from aigc_jax.train import train_and_evaluate
steps, workdir, path = int(sys.argv[1]), sys.argv[2], sys.argv[3]
overrides = json.loads(sys.argv[4])
cfg = config_from_file(path, {"train.steps": steps, "train.checkpoint_every": 6,
                              "train.eval_every": 100, **overrides})
train_and_evaluate(cfg, workdir, progress=False)
"""
# Dropout on (LM) and BatchNorm statistics + EMA (GAN): every kind of state must resume.
# Evaluation (FID) is not part of the state, so it is left out to keep the test short.
RESUME_CASES = [pytest.param(TINY_CONFIG, {"model.dropout": 0.1, "sample.num": 0},
                             marks=pytest.mark.sharded),
                (GAN_CONFIG, {"fid.samples": 0}),
                (VAE_CONFIG, {"iwae.k": 0, "iwae.final_k": 0}),  # binarization: step rng
                (DIFFUSION_CONFIG, {"fid.samples": 0, "model.dropout": 0.1})]  # noise, labels


def _final_params(workdir, cfg):
  run = open_run(cfg, workdir, for_training=False)
  return [np.asarray(x) for x in jax.tree.leaves(run.state)]


@pytest.mark.parametrize("config, overrides", RESUME_CASES)
def test_resume_in_a_new_process_is_bit_identical(tmp_path, config, overrides):
  def run(steps, workdir):
    proc = run_python(RESUME, args=[str(steps), workdir, config, json.dumps(overrides)])
    assert proc.returncode == 0, proc.stderr[-3000:]

  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  run(18, straight)
  run(6, resumed)  # stops after its checkpoint at step 6 (dropout on: rng state matters)
  assert Checkpointer(resumed + "/checkpoints").latest_step() == 6
  run(18, resumed)
  cfg = config_from_file(config, {"train.steps": 18, "train.checkpoint_every": 6,
                                  "train.eval_every": 100, **overrides})
  a, b = _final_params(straight, cfg), _final_params(resumed, cfg)
  assert len(a) == len(b)
  for x, y in zip(a, b, strict=True):
    np.testing.assert_array_equal(x, y)


@pytest.mark.sharded
def test_resume_with_a_different_model_is_refused(tmp_path, tiny_config):
  tiny_config.train.steps = 2
  train_and_evaluate(tiny_config, str(tmp_path), progress=False)
  tiny_config.model.embed_dim = 96
  with pytest.raises(UserError, match=r"different configuration \(model.embed_dim: 64 -> 96; "
                     r"from step 2.s checkpoint\)"):
    train_and_evaluate(tiny_config, str(tmp_path), progress=False)


def test_unwritable_workdir(tmp_path, tiny_config):
  blocker = tmp_path / "file"
  blocker.write_text("x")
  with pytest.raises(UserError, match="not writable"):
    train_and_evaluate(tiny_config, str(blocker / "run"), progress=False)


@pytest.mark.sharded
def test_metrics_of_every_logged_step_are_recorded(tmp_path, tiny_config):
  summary = train_and_evaluate(tiny_config, str(tmp_path), progress=False)
  records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  train_steps = [r["step"] for r in records if r["split"] == "train"]
  assert train_steps == [5, 10, 15, 20]
  assert [r["step"] for r in records if r["split"] == "val"] == [10, 20]
  first = next(r for r in records if r["split"] == "train")
  assert {"loss", "perplexity", "grad_norm", "lr", "tokens_per_sec"} <= set(first)
  assert summary["val_loss"] == records[-1]["val_loss"]
  assert jnp.isfinite(first["loss"])
  for path in ("config.json", "tokenizer.json", "plots/loss.png", "samples/step_0000020.txt"):
    assert (tmp_path / path).exists(), path
  assert os.listdir(tmp_path / "tensorboard")
  assert Checkpointer(str(tmp_path / "checkpoints")).all_steps() == [10, 20]


@pytest.mark.sharded
def test_every_record_has_a_step_rate_when_each_step_is_logged(tmp_path, tiny_config):
  # A record written at an evaluation right after the previous step's record once got a
  # rate of 0 (no step dispatched in between).
  tiny_config.train.update(steps=4, log_every=1, eval_every=2, checkpoint_every=4)
  tiny_config.sample.num = 0
  train_and_evaluate(tiny_config, str(tmp_path), progress=False)
  records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  rates = {r["step"]: r["steps_per_sec"] for r in records if r["split"] == "train"}
  assert sorted(rates) == [1, 2, 3, 4] and all(r > 0 for r in rates.values()), rates


def test_bpe_run_saves_its_tokenizer_and_counts_bytes(tmp_path, tiny_config):
  pytest.importorskip("tokenizers", reason="BPE needs the `tokenizers` package (dev extra)")
  tiny_config.data.update(tokenizer="bpe", bpe_vocab_size=400)
  tiny_config.train.update(steps=10, eval_every=10)
  summary = train_and_evaluate(tiny_config, str(tmp_path), progress=False)
  family = Family(tiny_config, str(tmp_path))  # loads the saved tokenizer
  assert family.tokenizer.kind == "bpe" and family.model_cfg.vocab_size == 400
  # BPE tokens span several bytes, so bits per byte is well below bits per token.
  bits_per_token = summary["val_loss"] / np.log(2)
  assert summary["val_bits_per_byte"] < 0.7 * bits_per_token
