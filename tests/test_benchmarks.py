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


def test_attention_benchmark_checks_every_cpu_implementation_against_einsum(tmp_path,
                                                                          monkeypatch):
  from benchmarks import attention

  B, T, N, K, H = shape = (2, 40, 4, 2, 8)
  # MaxText's causal count is half the full T x T matmuls of forward + backward.
  q, k, v, w = attention.inputs(shape, "float32")
  full = count_matmul_flops(attention.loss_and_grads("einsum"), q, k, v, w)
  assert attention.attention_flops(B, T, N, H) == full // 2 == 3 * 2 * B * N * T * T * H
  assert "cudnn" not in attention.implementations("cpu", "bfloat16")
  assert "cudnn" in attention.implementations("gpu", "bfloat16")
  assert "cudnn" not in attention.implementations("gpu", "float32")  # cuDNN: 16-bit only

  out = tmp_path / "attention.json"
  result = attention.main(["--shape", ",".join(map(str, shape)), "--steps", "2",
                           "--out", str(out)])
  assert json.loads(out.read_text()) == result
  rows = {r["implementation"]: r for r in result["rows"]}
  assert set(rows) == {"einsum", "blockwise", "xla"} and result["auto"] == "blockwise"
  for r in rows.values():
    assert r["max_relative_error"] < 1e-5 and r["median_ms"] > 0

  # The error column catches a wrong implementation (here: not causal), and one that
  # raises is reported without stopping the others.
  attend = attention.attend

  def broken(q, k, v, mask, implementation):
    if implementation == "xla":
      return jax.nn.dot_product_attention(q, k, v)
    if implementation == "blockwise":
      raise RuntimeError("no kernel")
    return attend(q, k, v, mask, implementation)

  monkeypatch.setattr(attention, "attend", broken)
  result = attention.run(shape, "float32", 1)
  rows = {r["implementation"]: r for r in result["rows"]}
  assert rows["xla"]["max_relative_error"] > 0.1
  assert rows["einsum"]["max_relative_error"] == 0
  assert rows["blockwise"]["error"] == "RuntimeError: no kernel"
  assert "| blockwise | failed: RuntimeError: no kernel |" in attention.markdown(result)
  for bad in ("2,40,4", "2,40,4,3,8"):  # not five numbers; N not a multiple of K
    with pytest.raises(SystemExit):
      attention.main(["--shape", bad])


@pytest.mark.parametrize("family", ["lm", "gan", "vae"])
def test_gpu_preset_cases_trace_in_bfloat16_at_full_size(family):
  """The GPU preset cannot run here; its steps are traced (not run) at their real shapes,
  as the GPU run compiles them, so a GPU session does not discover a broken case."""
  from aigc_jax.train import guard

  dtype, cases = run.PRESETS["gpu"]
  assert dtype == "bfloat16" and cases[family]
  for case, _ in cases[family]:
    fam, host_batch = run.BENCHES[family].family_and_batch(case, dtype)
    state = jax.eval_shape(lambda fam=fam: guard.init(fam.init_state(jax.random.PRNGKey(0))))
    batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), host_batch)
    new_state, metrics = jax.eval_shape(guard.guard_step(fam.train_step), state, batch)
    assert jax.tree.structure(new_state) == jax.tree.structure(state)
    assert all(m.shape == () for m in jax.tree.leaves(metrics))
    assert metrics["g_loss" if family == "gan" else "loss"].dtype == jnp.float32
    params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
    if case == "gpt2_124m":  # the MFU target is at GPT-2 small's size
      assert 123e6 < params < 125e6
    elif case == "gpt_350m":
      assert 340e6 < params < 360e6
