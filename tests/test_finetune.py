"""Fine-tuning on the shared loop: LoRA and pattern-frozen SFT with prompt masking, the
classification head, checkpoints that hold only what trains, merged export."""

import ast
import json

import jax
import numpy as np
import pytest
from flax import nnx

from aigc_jax.config import config_from_file
from aigc_jax.errors import UserError
from tests.conftest import ROOT, run_cli

pytest.importorskip("safetensors", reason="fine-tuning tests load HF checkpoints (dev extra)")

from aigc_jax.pretrained.hf import load_hf  # noqa: E402
from aigc_jax.train import open_run, train_and_evaluate  # noqa: E402
from tests.tiny_llama import write_tiny_hf  # noqa: E402

FT_TINY = str(ROOT / "configs" / "ft_tiny.py")


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  directory = tmp_path_factory.mktemp("pretrained")
  cfg, params, tokenizer = write_tiny_hf(directory)
  return str(directory), params, tokenizer


def _config(pretrained_dir, **overrides):
  c = config_from_file(FT_TINY)
  c.pretrained.path = pretrained_dir
  for dotted, value in overrides.items():
    section, key = dotted.split(".")
    c[section][key] = value
  return c


def _leaves_by_path(tree, prefix=""):
  out = {}
  for key, value in tree.items():
    path = f"{prefix}{key}"
    if isinstance(value, dict):
      out.update(_leaves_by_path(value, path + "."))
    else:
      out[path] = np.asarray(value)
  return out


@pytest.mark.sharded
def test_lora_sft_trains_only_adapters_and_lowers_held_out_loss(pretrained, tmp_path):
  directory, base, _ = pretrained
  config = _config(directory)
  summary = train_and_evaluate(config, str(tmp_path), progress=False)
  records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  val = [r for r in records if r.get("split") == "val"]
  assert val[0]["step"] == 0 and val[-1]["step"] == 16
  assert val[-1]["val_loss"] < val[0]["val_loss"] - 0.1, val
  run = open_run(config, str(tmp_path), for_training=False)
  trained = _leaves_by_path(jax.device_get(run.state.params))
  assert trained and all(".lora." in p for p in trained)
  frozen = _leaves_by_path(jax.device_get(run.state.frozen))
  for path, value in _leaves_by_path(base).items():
    np.testing.assert_array_equal(frozen[path], value)  # base weights bit-identical
  assert any(np.abs(v).sum() > 0 for p, v in trained.items() if p.endswith(".b"))
  assert summary["steps"] == 16
  # Checkpoints hold the adapters only, not the base weights.
  saved = json.loads((tmp_path / "checkpoints" / "16" / "state" / "_METADATA").read_text())
  arrays = [ast.literal_eval(k) for k in saved["tree_metadata"]]
  assert [k for k in arrays if k[0] == "frozen" and len(k) > 1] == []
  assert all("lora" in k for k in arrays if k[0] == "params")
  # ... so resuming on other base weights (same shapes) is refused, not silently mixed.
  other = tmp_path / "other_pretrained"
  write_tiny_hf(other, seed=1)
  config.pretrained.path = str(other)
  with pytest.raises(UserError, match="trained on other frozen .pretrained. weights"):
    open_run(config, str(tmp_path), for_training=True)


@pytest.mark.sharded
def test_frozen_patterns_stay_bit_identical_in_full_fine_tuning(pretrained, tmp_path):
  directory, base, _ = pretrained
  config = _config(directory, **{"lora.rank": 0, "train.steps": 3, "train.eval_at_start": False,
                                 "train.eval_every": 3, "train.checkpoint_every": 3})
  config.train.frozen = (r"blocks\.0\.", r"^embed\.")
  train_and_evaluate(config, str(tmp_path), progress=False)
  run = open_run(config, str(tmp_path), for_training=False)
  trained = _leaves_by_path(jax.device_get(run.state.params))
  frozen = _leaves_by_path(jax.device_get(run.state.frozen))
  base = _leaves_by_path(base)
  assert set(frozen) == {p for p in base if p.startswith(("blocks.0.", "embed."))}
  for path in frozen:
    np.testing.assert_array_equal(frozen[path], base[path])
  changed = [p for p in trained if not np.array_equal(trained[p], base[p])]
  assert set(changed) == set(trained) and "blocks.1.attn.q_proj.kernel" in changed


def test_sft_masks_the_prompt_and_uses_the_chat_template(pretrained, tmp_path):
  directory, _, tokenizer = pretrained
  run = open_run(_config(directory), str(tmp_path), for_training=True)
  family = run.family
  batch = family.eval_batches()[0]
  row = int(np.flatnonzero(batch["mask"][:, -1] == 0)[0])  # a response that fits whole
  mask, targets = batch["mask"][row], batch["targets"][row]
  first = int(np.argmax(mask > 0))
  prompt_text = tokenizer.decode(batch["inputs"][row][:first + 1])
  assert prompt_text.startswith("<|im_start|>system\n") and prompt_text.endswith(
      "<|im_start|>assistant\n")
  assert "Write the body of this Python function." in prompt_text
  response = tokenizer.decode(targets[mask > 0])
  assert response.endswith("<|im_end|>\n") and "<|im_start|>" not in response


@pytest.mark.sharded
def test_merged_export_matches_the_fine_tuned_model(pretrained, tmp_path):
  directory, _, _ = pretrained
  workdir, out = tmp_path / "run", tmp_path / "export"
  # Run with a shorter context than the file's 256: the export keeps the file's.
  config = _config(directory, **{"train.steps": 4, "train.eval_at_start": False,
                                 "train.eval_every": 4, "model.max_seq_len": 200})
  train_and_evaluate(config, str(workdir), progress=False)
  result = run_cli("export", "--workdir", str(workdir), "--format", "safetensors",
                   "--out", str(out))
  assert result.returncode == 0, result.stderr
  assert json.loads((out / "config.json").read_text())["max_position_embeddings"] == 256
  run = open_run(config, str(workdir), for_training=False)
  tokens = np.random.default_rng(0).integers(0, 300, size=(2, 11)).astype(np.int32)
  ours = np.asarray(run.family.model(run.state)(tokens))
  exported, tok = load_hf(str(out))
  np.testing.assert_allclose(np.asarray(exported(tokens)), ours, atol=1e-5, rtol=1e-5)
  assert tok is not None and tok.chat_template
  sample = run_cli("sample", "--workdir", str(workdir), "--prompt", "def add(a, b):",
                   "--max-new-tokens", "5")
  assert sample.returncode == 0, sample.stderr
  assert "=== prompt 0 ===\ndef add(a, b):\n=== reply ===\n" in sample.stdout


@pytest.mark.sharded
def test_classifier_head_trains_with_lora(pretrained, tmp_path):
  pytest.importorskip("sklearn", reason="the TF-IDF baseline needs scikit-learn (dev extra)")
  from aigc_jax.data.sentiment import find_archive
  try:
    find_archive()
  except UserError as e:
    pytest.fail(f"VADER's data is missing ({e}); `make data` fetches it")
  directory, base, _ = pretrained
  config = _config(directory, **{"task.name": "classify", "data.name": "vader",
                                 "data.seq_len": 48, "train.steps": 6, "train.batch_size": 8,
                                 "train.eval_every": 6, "data.max_eval_examples": 64})
  summary = train_and_evaluate(config, str(tmp_path), progress=False)
  assert 0 <= summary["val_accuracy"] <= 1
  assert 0.7 < summary["baseline_tfidf_accuracy"] < 0.9
  run = open_run(config, str(tmp_path), for_training=False)
  trained = _leaves_by_path(jax.device_get(run.state.params))
  assert "head.kernel" in trained and all(p == "head.kernel" or ".lora." in p for p in trained)
  frozen = _leaves_by_path(jax.device_get(run.state.frozen))
  for path, value in _leaves_by_path(base).items():
    np.testing.assert_array_equal(frozen["lm." + path], value)


@pytest.mark.parametrize("overrides, message", [
    ({"lora.targets": (r"attn\.qkv",)}, "LoRA target pattern"),
    ({"train.frozen": ("no_such_layer",)}, "frozen pattern 'no_such_layer' matches nothing"),
    ({"data.seq_len": 4096}, "exceeds the model's context"),
    ({"data.name": "vader"}, "for task 'sft' must be one of"),
])
def test_bad_fine_tuning_configs(pretrained, tmp_path, overrides, message):
  directory, _, _ = pretrained
  config = _config(directory)
  for dotted, value in overrides.items():
    section, key = dotted.split(".")
    config[section][key] = value
  with pytest.raises(UserError, match=message):
    open_run(config, str(tmp_path), for_training=True)


def test_lora_model_logits_equal_base_at_init(pretrained, tmp_path):
  directory, _, _ = pretrained
  run = open_run(_config(directory), str(tmp_path), for_training=True)
  base, _ = load_hf(directory)
  tokens = np.random.default_rng(3).integers(0, 300, size=(2, 9)).astype(np.int32)
  np.testing.assert_array_equal(np.asarray(run.family.model(run.state)(tokens)),
                                np.asarray(base(tokens)))
  assert isinstance(run.family.model(run.state), nnx.Module)


def test_micro_batches_are_weighted_by_their_response_tokens(pretrained):
  """With gradient accumulation, the SFT loss is still the mean over every response token
  of the batch (micro-batches hold different numbers of them)."""
  from aigc_jax.families.finetune import Family

  results = []
  for accum in (1, 4):
    family = Family(_config(pretrained[0], **{"train.grad_accum_steps": accum}), None)
    state = family.load_weights(jax.jit(family.init_state)(jax.random.PRNGKey(0)))
    batch = next(family.train_data)
    new_state, metrics = jax.jit(family.train_step)(state, batch)
    results.append((new_state.params, metrics))
  (p1, m1), (p4, m4) = results
  tokens = batch["mask"].reshape(2, 4, -1).sum(axis=(0, 2))  # per micro-batch (rows i::4)
  assert len(set(tokens.tolist())) > 1, tokens  # the micro-batches differ
  np.testing.assert_allclose(m4["loss_weight"], batch["mask"].sum())
  np.testing.assert_allclose(m1["loss"], m4["loss"], rtol=1e-5)
  np.testing.assert_allclose(m1["grad_norm"], m4["grad_norm"], rtol=1e-4)
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p4), strict=True):
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_tasks_are_separate_family_classes(pretrained):
  from aigc_jax.families.finetune import Family
  from aigc_jax.families.finetune_classify import ClassifyFamily
  from aigc_jax.families.finetune_sft import SftFamily

  sft = Family(_config(pretrained[0]), None)
  classify = Family(_config(pretrained[0], **{"task.name": "classify", "data.name": "vader"}),
                    None)
  assert type(sft) is SftFamily and type(classify) is ClassifyFamily
  assert sft.name == classify.name == "finetune"
  assert classify.plot_keys == ("loss", "accuracy") and sft.plot_keys == ("loss",)
  with pytest.raises(UserError, match="no text to sample"):
    classify.cli_sample(None, "", {})


def test_dropout_acts_in_the_train_step_only(pretrained):
  """Model and adapter dropout draw from the step's key; the state holds parameters only;
  evaluation is deterministic."""
  from aigc_jax.families.finetune import Family

  family = Family(_config(pretrained[0], **{"model.dropout": 0.2, "lora.dropout": 0.2}), None)
  state = family.load_weights(jax.jit(family.init_state)(jax.random.PRNGKey(0)))
  leaves = {**_leaves_by_path(state.params), **_leaves_by_path(state.frozen)}
  assert not [p for p in leaves if "rngs" in p or "count" in p or p.endswith(".key")]
  batch = next(family.train_data)
  step = jax.jit(family.train_step)
  loss_a = step(state, batch)[1]["loss"]
  np.testing.assert_array_equal(step(state, batch)[1]["loss"], loss_a)  # the same key
  loss_b = step(state.replace(rng=jax.random.PRNGKey(9)), batch)[1]["loss"]
  assert abs(float(loss_a) - float(loss_b)) > 1e-4
  eval_step = jax.jit(family.eval_step)
  np.testing.assert_array_equal(eval_step(state, batch)["nll_sum"],
                                eval_step(state, batch)["nll_sum"])
  plain = Family(_config(pretrained[0]), None)
  np.testing.assert_allclose(eval_step(state, batch)["nll_sum"],
                             jax.jit(plain.eval_step)(state, batch)["nll_sum"], rtol=1e-5)
