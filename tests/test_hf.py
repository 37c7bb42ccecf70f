"""Hugging Face Llama checkpoints: export -> import is exact, every tensor is where
`transformers` expects it (its LlamaForCausalLM computes our logits), bad folders get one
clear error."""

import dataclasses
import json

import jax
import numpy as np
import pytest

from aigc_jax.errors import UserError

pytest.importorskip("safetensors", reason="HF checkpoints need `safetensors` (dev extra)")

from aigc_jax.pretrained.hf import export_hf, load_hf, read_hf  # noqa: E402
from tests.tiny_llama import write_tiny_hf  # noqa: E402


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def tiny_hf(request, tmp_path_factory):
  directory = tmp_path_factory.mktemp("hf")
  cfg, params, tokenizer = write_tiny_hf(directory, tied=request.param)
  return directory, cfg, params, tokenizer


def test_export_import_round_trip_is_exact(tiny_hf):
  directory, cfg, params, tokenizer = tiny_hf
  got_cfg, got = read_hf(str(directory))
  assert got_cfg == dataclasses.replace(cfg, pretrained_max_seq_len=cfg.max_seq_len)
  jax.tree.map(np.testing.assert_array_equal, got, params)
  model, got_tok = load_hf(str(directory))
  text = "def f(x):\n    return x  # <|im_end|> stays text"
  assert list(got_tok.encode(text)) == list(tokenizer.encode(text))
  assert got_tok.decode(got_tok.encode(text)) == text
  assert (got_tok.bos_id, got_tok.eos_id) == (1, 2)
  chat = [{"role": "user", "content": "hi"}]
  assert list(got_tok.encode_chat(chat)) == list(tokenizer.encode_chat(chat))


def test_tensors_have_hugging_face_names_and_layout(tiny_hf):
  from safetensors.numpy import load_file

  directory, cfg, params, _ = tiny_hf
  tensors = load_file(str(directory / "model.safetensors"))
  eq = np.testing.assert_array_equal
  eq(tensors["model.embed_tokens.weight"], params["embed"]["embedding"])
  eq(tensors["model.norm.weight"], params["final_norm"]["scale"])
  block = params["blocks"][1]
  eq(tensors["model.layers.1.self_attn.k_proj.weight"], block["attn"]["k_proj"]["kernel"].T)
  eq(tensors["model.layers.1.mlp.down_proj.weight"], block["mlp"]["down"]["kernel"].T)
  eq(tensors["model.layers.1.post_attention_layernorm.weight"], block["mlp_norm"]["scale"])
  assert ("lm_head.weight" in tensors) == (not cfg.tie_embeddings)
  per_layer = 9
  assert len(tensors) == 2 + per_layer * cfg.num_layers + (not cfg.tie_embeddings)


def test_transformers_llama_computes_our_logits(tiny_hf):
  torch = pytest.importorskip("torch", reason="the cross-check needs PyTorch (dev extra)")
  transformers = pytest.importorskip("transformers",
                                     reason="the cross-check needs `transformers` (dev extra)")
  directory, cfg, params, _ = tiny_hf
  model, _ = load_hf(str(directory))
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(2, 17)).astype(np.int32)
  ours = np.asarray(model(tokens))
  hf = transformers.LlamaForCausalLM.from_pretrained(str(directory), torch_dtype=torch.float32)
  with torch.no_grad():
    theirs = hf(torch.from_numpy(tokens.astype(np.int64))).logits.numpy()
  np.testing.assert_allclose(ours, theirs, atol=2e-4, rtol=2e-4)


def test_export_of_a_model_loaded_shorter_keeps_the_original_context(tiny_hf, tmp_path):
  """Loaded with max_seq_len=64 (a smaller KV cache bound), the model still exports the
  file's context length, and `transformers` computes its logits from the export."""
  torch = pytest.importorskip("torch", reason="the cross-check needs PyTorch (dev extra)")
  transformers = pytest.importorskip("transformers",
                                     reason="the cross-check needs `transformers` (dev extra)")
  from flax import nnx

  directory, cfg, _, tokenizer = tiny_hf
  assert cfg.max_seq_len == 256
  model, _ = load_hf(str(directory), max_seq_len=64)
  assert (model.cfg.max_seq_len, model.cfg.pretrained_max_seq_len) == (64, 256)
  out = tmp_path / "export"
  export_hf(str(out), model.cfg, nnx.to_pure_dict(nnx.state(model, nnx.Param)), tokenizer)
  assert json.loads((out / "config.json").read_text())["max_position_embeddings"] == 256
  assert read_hf(str(out))[0].max_seq_len == 256
  tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, size=(2, 13)).astype(np.int32)
  hf = transformers.LlamaForCausalLM.from_pretrained(str(out), torch_dtype=torch.float32)
  assert hf.config.max_position_embeddings == 256
  with torch.no_grad():
    theirs = hf(torch.from_numpy(tokens.astype(np.int64))).logits.numpy()
  np.testing.assert_allclose(np.asarray(model(tokens)), theirs, atol=2e-4, rtol=2e-4)


def _edit_config(directory, **changes):
  path = directory / "config.json"
  config = json.loads(path.read_text())
  config.update(changes)
  path.write_text(json.dumps(config))


@pytest.mark.parametrize("changes, message", [
    ({"intermediate_size": 64}, "has shape"),
    ({"model_type": "gpt2"}, "model_type 'gpt2'"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling"),
    ({"num_hidden_layers": 3}, "is missing"),
])
def test_bad_checkpoints_are_named(tmp_path, changes, message):
  write_tiny_hf(tmp_path)
  _edit_config(tmp_path, **changes)
  with pytest.raises(UserError, match=message):
    load_hf(str(tmp_path))


def test_missing_or_damaged_files(tmp_path):
  with pytest.raises(UserError, match="no config.json"):
    load_hf(str(tmp_path))
  write_tiny_hf(tmp_path)
  weights = tmp_path / "model.safetensors"
  weights.write_bytes(weights.read_bytes()[:100])
  with pytest.raises(UserError, match="not a readable safetensors file"):
    load_hf(str(tmp_path))
