"""The benchmark suite runs end to end on its tiny preset, and its FLOP counts match hand
computations. No timing is asserted."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from aigc_jax.models.transformer import Transformer, TransformerConfig
from benchmarks import run
from benchmarks.flops import count_matmul_flops


def test_dense_and_conv_flops_match_hand_counts():
  x, w = jnp.ones((3, 5)), jnp.ones((5, 7))
  assert count_matmul_flops(lambda a, b: a @ b, x, w) == 2 * 3 * 5 * 7
  # batched: [B, T, D] x [B, D, S] -> 2 * B * T * D * S
  assert count_matmul_flops(lambda a, b: jnp.einsum("btd,bds->bts", a, b),
                            jnp.ones((2, 3, 4)), jnp.ones((2, 4, 6))) == 2 * 2 * 3 * 4 * 6
  # a 3x3 conv, 2 -> 4 channels, SAME, stride 2 on 8x8: output 4x4
  conv = lambda a, k: jax.lax.conv_general_dilated(
      a, k, (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  flops = count_matmul_flops(conv, jnp.ones((5, 8, 8, 2)), jnp.ones((3, 3, 2, 4)))
  assert flops == 2 * (5 * 4 * 4 * 4) * (3 * 3 * 2)
  # the gradient of a matmul w.r.t. both operands is two more matmuls of the same size
  grad = jax.grad(lambda a, b: (a @ b).sum(), argnums=(0, 1))
  assert count_matmul_flops(grad, x, w) == 3 * 2 * 3 * 5 * 7
  # scan bodies count once per iteration
  scanned = lambda a, b: jax.lax.scan(lambda c, _: (c @ b, None), a, None, length=4)[0]
  assert count_matmul_flops(scanned, jnp.ones((3, 5)), jnp.ones((5, 5))) == 4 * 2 * 3 * 5 * 5


def test_lm_formula_matches_a_hand_count_and_the_models_matmuls():
  L, D, N, K, H, F, V, T, B = 2, 16, 4, 2, 4, 24, 40, 8, 3
  cfg = TransformerConfig(vocab_size=V, num_layers=L, num_heads=N, num_kv_heads=K,
                          embed_dim=D, mlp_dim=F, max_seq_len=T, attention="einsum")
  per_layer = 2 * D * H * (N + K + K + N) + 2 * 3 * D * F + 2 * 2 * T * N * H / 2
  forward = L * per_layer + 2 * D * V
  assert cfg.flops_per_token(T, training=False) == forward
  assert cfg.flops_per_token(T, training=True) == 3 * forward
  # The model's own matmuls: the formula, plus the masked half of QK^T and AV that the
  # einsum implementation computes and MaxText's convention does not count.
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  tokens = jnp.zeros((B, T), jnp.int32)
  counted = count_matmul_flops(lambda t: model(t), tokens)
  assert counted == B * T * (forward + L * 2 * 2 * T * N * H / 2)


@pytest.mark.sharded
def test_tiny_preset_writes_json_markdown_and_plot(tmp_path):
  out = tmp_path / "bench.json"
  results = run.main(["--preset", "tiny", "--out", str(out), "--torch", "off"])
  assert [(r["family"], r["case"]) for r in results["rows"]] == [
      ("lm", "tiny"), ("gan", "tiny"), ("vae", "tiny")]
  saved = json.loads(out.read_text())
  assert saved["meta"]["preset"] == "tiny" and saved["meta"]["peak_flops_per_s"] > 0
  for r in saved["rows"]:
    assert r["step_median_s"] > 0 and r["compile_s"] > 0 and r["params"] > 0
    assert r["model_flops_per_step"] > 0 and 0 < r["mfu"] and np.isfinite(r["mfu"])
    assert r["xla_flops_per_step"] > 0 and r["process_max_rss_bytes"] > 0
  lm = saved["rows"][0]
  assert lm["tokens_per_s"] == lm["examples_per_s"] * 16
  table = (tmp_path / "bench.md").read_text()
  assert table.count("\n| lm |") == 1 and "MFU against" in table
  assert (tmp_path / "bench.png").read_bytes()[:4] == b"\x89PNG"


def test_transposed_conv_flops_count_only_real_inputs():
  # A 4x4 stride-2 transposed conv (lhs dilation 2) on 3x3 -> 6x6: each output meets 2x2
  # of the 4x4 taps, so 2 * (6 * 6 * out) * (4 * in) FLOPs per image.
  up = lambda a, k: jax.lax.conv_transpose(a, k, (2, 2), "SAME",
                                           dimension_numbers=("NHWC", "HWIO", "NHWC"))
  flops = count_matmul_flops(up, jnp.ones((1, 3, 3, 5)), jnp.ones((4, 4, 5, 7)))
  assert flops == 2 * (6 * 6 * 7) * (4 * 5)


def test_linear_bound_chain_counts_the_lm_matmuls_and_matches_pytorch():
  from benchmarks import linear_bound

  layers, _, D, F, T, B, _ = linear_bound.CASES["tiny"]
  assert linear_bound.chain_flops("tiny") == 3 * layers * B * T * 2 * (4 * D * D + 3 * D * F)
  params, x = linear_bound.init_params("tiny")
  # The FLOPs counted from the chain's own gradient jaxpr agree with the formula.
  grad = jax.grad(linear_bound.chain_loss, argnums=(0, 1))
  assert count_matmul_flops(grad, params, x) == linear_bound.chain_flops("tiny")
  torch = pytest.importorskip("torch", reason="the PyTorch side needs the bench extra")
  ours, ours_x = jax.jit(grad)(params, x)
  theirs = [{k: torch.from_numpy(v).requires_grad_() for k, v in p.items()} for p in params]
  theirs_x = torch.from_numpy(x).requires_grad_()
  linear_bound.chain_loss(theirs, theirs_x, matmul=torch.matmul).backward()
  np.testing.assert_allclose(ours_x, theirs_x.grad.numpy(), rtol=1e-4, atol=1e-6)
  for a, b in zip(ours, theirs, strict=True):
    assert a.keys() == b.keys() == linear_bound.kernel_shapes(D, F).keys()
    for name in a:
      np.testing.assert_allclose(a[name], b[name].grad.numpy(), rtol=1e-4, atol=1e-6)
