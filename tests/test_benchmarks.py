"""The benchmark suite runs end to end on its tiny preset, and its FLOP counts match hand
computations. No timing is asserted."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from aigc_jax.models.transformer import Transformer, TransformerConfig
from aigc_jax.nn.upsample import UpConv2x
from aigc_jax.train import guard
from benchmarks import run
from benchmarks.common import compile_step, model_flops, state_bytes
from benchmarks.flops import compiled_matmul_flops, count_matmul_flops
from tests.conftest import run_python


def compiled_flops(fn, *args) -> int:
  return compiled_matmul_flops(jax.jit(fn).lower(*args).compile())


def test_dense_and_conv_flops_match_hand_counts():
  x, w = jnp.ones((3, 5)), jnp.ones((5, 7))
  assert count_matmul_flops(lambda a, b: a @ b, x, w) == 2 * 3 * 5 * 7
  # batched: [B, T, D] x [B, D, S] -> 2 * B * T * D * S
  assert count_matmul_flops(lambda a, b: jnp.einsum("btd,bds->bts", a, b),
                            jnp.ones((2, 3, 4)), jnp.ones((2, 4, 6))) == 2 * 2 * 3 * 4 * 6
  # a 3x3 conv, 2 -> 4 channels, SAME, stride 2 on 8x8: output 4x4, padding (0, 1), so the
  # last tap of the last output row (and column) falls on the padding: 4 * 3 - 1 taps
  conv = lambda a, k: jax.lax.conv_general_dilated(
      a, k, (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  args = jnp.ones((5, 8, 8, 2)), jnp.ones((3, 3, 2, 4))
  assert count_matmul_flops(conv, *args) == 2 * (5 * 4) * 2 * (4 * 3 - 1) ** 2
  # VALID: every tap is real, 2 * B * H_out * W_out * C_in * C_out * k * k
  valid = lambda a, k: jax.lax.conv_general_dilated(
      a, k, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  assert count_matmul_flops(valid, *args) == 2 * 5 * 6 * 6 * 2 * 4 * 3 * 3
  # the gradient of a matmul w.r.t. both operands is two more matmuls of the same size
  grad = jax.grad(lambda a, b: ((a @ b) ** 2).sum(), argnums=(0, 1))
  assert count_matmul_flops(grad, x, w) == 3 * 2 * 3 * 5 * 7
  # ... unless the loss is linear in it: then the forward matmul is dead code, not counted
  linear = jax.grad(lambda a, b: (a @ b).sum(), argnums=(0, 1))
  assert count_matmul_flops(linear, x, w) == 2 * 2 * 3 * 5 * 7 == compiled_flops(linear, x, w)
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
  assert compiled_flops(lambda t: model(t), tokens) == counted  # the compiled program's


@pytest.mark.sharded
def test_tiny_preset_writes_json_markdown_and_plot(tmp_path):
  out = tmp_path / "bench.json"
  results = run.main(["--preset", "tiny", "--out", str(out), "--torch", "off"])
  assert [(r["family"], r["case"]) for r in results["rows"]] == [
      ("lm", "tiny"), ("gan", "tiny"), ("vae", "tiny"), ("diffusion", "tiny")]
  saved = json.loads(out.read_text())
  assert saved["meta"]["preset"] == "tiny" and saved["meta"]["peak_flops_per_s"] > 0
  for r in saved["rows"]:
    assert r["step_median_s"] > 0 and r["compile_s"] > 0 and r["params"] > 0
    assert r["model_flops_per_step"] > 0 and 0 < r["mfu"] and np.isfinite(r["mfu"])
    assert r["xla_flops_per_step"] > 0 and r["process_max_rss_bytes"] > 0
    if r["family"] in ("gan", "vae", "diffusion") and r["devices"] == 1:  # see compile_step
      assert r["model_flops_per_step"] == r["compiled_flops_per_step"]
  lm, diffusion = saved["rows"][0], saved["rows"][3]
  assert lm["tokens_per_s"] == lm["examples_per_s"] * 16
  assert diffusion["sample_nfe"] == 50 and diffusion["sample_images_per_s"] > 0
  table = (tmp_path / "bench.md").read_text()
  assert table.count("\n| lm |") == 1 and "MFU against" in table
  assert "#### Sampling" in table and table.count("\n| diffusion | tiny |") == 2
  assert (tmp_path / "bench.png").read_bytes()[:4] == b"\x89PNG"

  # Per-family files (as benchmarks/gpu.sh writes them) merge into one table.
  parts = []
  for i, family in enumerate(("lm", "diffusion")):
    part = {"meta": {**saved["meta"], "command": f"run {family}"}, "rows": [saved["rows"][i * 3]]}
    parts.append(tmp_path / f"{family}.json")
    parts[-1].write_text(json.dumps(part))
  merged = run.main(["--merge", *map(str, parts), "--out", str(tmp_path / "all.json")])
  assert [r["family"] for r in merged["rows"]] == ["lm", "diffusion"]
  assert merged["meta"]["command"] == "run lm`; `run diffusion"
  assert "#### Sampling" in (tmp_path / "all.md").read_text()
  other = {"meta": {**saved["meta"], "device": "another"}, "rows": []}
  parts[1].write_text(json.dumps(other))
  with pytest.raises(SystemExit, match="device|another"):
    run.main(["--merge", *map(str, parts), "--out", str(tmp_path / "all.json")])


def test_diffusion_sampling_flops_are_nfe_forward_passes_and_pytorch_unet_matches():
  """The sampling benchmark counts 50 U-Net forward passes per image, and the eager
  PyTorch U-Net it is compared with has exactly our parameter count."""
  from benchmarks import diffusion_step

  for case in ("tiny", "28px"):
    family, _ = diffusion_step.family_and_batch(case, "float32")
    params = jax.eval_shape(lambda fam=family: fam.init_state(jax.random.PRNGKey(0)).params)
    forward = count_matmul_flops(
        lambda p, x, s, fam=family: nnx.merge(fam.graphdef, p)(x, s, jnp.zeros(1, jnp.int32)),
        params, jax.ShapeDtypeStruct((1, *family.net_cfg.image_shape), jnp.float32),
        jax.ShapeDtypeStruct((1,), jnp.float32))
    if case == "tiny":  # runs the sampler: seconds
      measured = diffusion_step.measure_sampling(family, 3, timed_calls=1)
      assert measured["sample_nfe"] == 50 and measured["sample_batch"] == 3
      assert measured["sample_flops_per_image"] == 50 * forward > 0
    torch = pytest.importorskip("torch", reason="the PyTorch side needs the bench extra")
    from benchmarks import torch_unet
    net = torch_unet.build(family.config.model)
    ours = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    assert sum(p.numel() for p in net.parameters()) == ours, case
    y = net(torch.zeros(2, family.net_cfg.channels, *family.net_cfg.image_shape[:2]),
            torch.ones(2), torch.zeros(2, dtype=torch.long))
    assert tuple(y.shape) == (2, family.net_cfg.channels, *family.net_cfg.image_shape[:2])


def replicated_and_fsdp_tiny_lm() -> dict:
  """{mesh: (per-device state bytes, first loss)} of the tiny LM case on data=8 and on
  fsdp=8 (needs 8 devices)."""
  family, host_batch = run.BENCHES["lm"].family_and_batch("tiny", "float32")
  out = {}
  for name, mesh in (("data", {"data": 8}), ("fsdp", {"data": 1, "fsdp": 8})):
    c = compile_step(family, host_batch, mesh=mesh)
    assert c["mesh"].shape == {"data": mesh["data"], "fsdp": mesh.get("fsdp", 1), "tensor": 1}
    placed = state_bytes(c["state"])
    _, metrics = c["compiled"](c["state"], c["batch"])
    out[name] = (placed, float(metrics["loss"]))
  return out


@pytest.mark.sharded
def test_fsdp_holds_an_eighth_of_the_replicated_params_and_optimizer_state():
  """The state compile_step builds is sharded as the loop shards it: on fsdp=8 each device
  holds at most 1/8 of the parameters + optimizer state a replicated device holds (5%
  over: the norm scales stay whole), and the step computes the same loss. With fewer than
  8 devices here, it runs in a process with 8 fake CPU devices."""
  if jax.device_count() >= 8:
    result = replicated_and_fsdp_tiny_lm()
  else:
    code = ("import json; from tests.test_benchmarks import replicated_and_fsdp_tiny_lm; "
            "print(json.dumps(replicated_and_fsdp_tiny_lm()))")
    proc = run_python(code, {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
  (replicated, loss_replicated), (fsdp, loss_fsdp) = result["data"], result["fsdp"]
  assert replicated["frozen_device_bytes"] == fsdp["frozen_device_bytes"] == 0
  assert 0 < fsdp["params_opt_device_bytes"] <= replicated["params_opt_device_bytes"] / 8 * 1.05
  assert fsdp["state_device_bytes"] < replicated["state_device_bytes"] / 4
  np.testing.assert_allclose(loss_fsdp, loss_replicated, rtol=1e-5)


def upconv_taps(n: int) -> int:
  """Along one dimension of UpConv2x (4x4 kernel, stride 2, SAME) on n inputs: output 2i + a
  sees inputs [i - 1, i] (a = 0) or [i, i + 1] (a = 1), so 2 taps for each of the 2n
  outputs, less the one that falls on the padding at each end."""
  return 2 * (2 * n) - 2


def test_transposed_conv_flops_count_only_real_inputs():
  # A 4x4 stride-2 transposed conv (lhs dilation 2) on 3x3 -> 6x6: each output meets 2x2
  # of the 4x4 taps (1 at the borders), not the zeros the dilation inserts or the padding.
  up = lambda a, k: jax.lax.conv_transpose(a, k, (2, 2), "SAME",
                                           dimension_numbers=("NHWC", "HWIO", "NHWC"))
  args = jnp.ones((1, 3, 3, 5)), jnp.ones((4, 4, 5, 7))
  hand = 2 * 7 * 5 * upconv_taps(3) ** 2
  assert count_matmul_flops(up, *args) == compiled_flops(up, *args) == hand


@pytest.mark.parametrize("impl", ["phases", "native"])
def test_upconv2x_forward_and_backward_compiled_flops_match_a_hand_count(impl):
  """The forward pass, the input gradient and the weight gradient of UpConv2x each make
  the same (input, tap, output) products, so the compiled step runs 3x the forward's
  FLOPs. The 'phases' custom VJP traces two forward passes whose results it discards
  (5x); they must not be counted."""
  B, H, W, C, F = 2, 3, 5, 4, 6  # C input, F output features
  graphdef, params = nnx.split(UpConv2x(C, F, rngs=nnx.Rngs(0), impl=impl))
  x = jnp.ones((B, H, W, C))
  grads = jax.grad(lambda p, x: (nnx.merge(graphdef, p)(x) ** 2).sum(), argnums=(0, 1))
  forward = 2 * B * C * F * upconv_taps(H) * upconv_taps(W)
  assert compiled_flops(grads, params, x) == 3 * forward
  assert count_matmul_flops(grads, params, x) == 3 * forward  # the jaxpr, dead code removed
  traced = count_matmul_flops(grads, params, x, dce=False)
  assert traced == (5 if impl == "phases" else 3) * forward


def test_compiled_flops_follow_loops_branches_groups_and_match_xla_for_convolutions():
  x, w = jnp.ones((3, 5)), jnp.ones((5, 5))
  mm = 2 * 3 * 5 * 5
  # a scan and a fori_loop become while loops with a known trip count
  scanned = lambda a, b: jax.lax.scan(lambda c, _: (jnp.tanh(c @ b), None), a, None,
                                      length=4)[0]
  assert compiled_flops(scanned, x, w) == 4 * mm
  looped = lambda a, b: jax.lax.fori_loop(0, 6, lambda i, c: jnp.tanh(c @ b), a)
  assert compiled_flops(looped, x, w) == 6 * mm
  # a conditional counts its most expensive branch
  branch = lambda a, b: jax.lax.cond(a.sum() > 0, lambda: a @ b @ b, lambda: a @ b)
  assert compiled_flops(branch, x, w) == 2 * mm
  # a loop of unknown length around a matmul cannot be counted
  unknown = lambda a, b: jax.lax.while_loop(lambda c: c.sum() < 1e3, lambda c: c @ b, a)
  with pytest.raises(ValueError, match="trip count"):
    compiled_flops(unknown, x, w)
  # batched dot and a dot contracting nothing (an outer product: elementwise)
  assert compiled_flops(lambda a, b: jnp.einsum("btd,bds->bts", a, b),
                        jnp.ones((2, 3, 4)), jnp.ones((2, 4, 6))) == 2 * 2 * 3 * 4 * 6
  outer = lambda a, b: a[:, None] @ b[None, :]
  assert count_matmul_flops(outer, jnp.ones(3), jnp.ones(4)) == 0
  assert compiled_flops(outer, jnp.ones(3), jnp.ones(4)) == 0
  # A program of one convolution: our count, the jaxpr's and XLA's cost_analysis() agree
  # (the same convention) for padding, strides, dilations and both kinds of groups.
  a = jnp.ones((4, 9, 8, 6))
  for kwargs, kernel in [
      (dict(window_strides=(2, 2), padding="SAME"), (3, 3, 6, 8)),
      (dict(window_strides=(1, 2), padding=[(2, 1), (0, 3)], lhs_dilation=(2, 2)),
       (3, 2, 6, 8)),
      (dict(window_strides=(1, 1), padding="VALID", rhs_dilation=(2, 2),
            feature_group_count=3), (3, 2, 2, 9)),
      (dict(window_strides=(1, 1), padding="SAME", batch_group_count=2), (3, 3, 6, 4))]:
    conv = lambda a, k, kw=kwargs: jax.lax.conv_general_dilated(
        a, k, dimension_numbers=("NHWC", "HWIO", "NHWC"), **kw)
    k = jnp.ones(kernel)
    compiled = jax.jit(conv).lower(a, k).compile()
    ours = compiled_matmul_flops(compiled)
    assert ours == count_matmul_flops(conv, a, k) == compiled.cost_analysis()["flops"] > 0


@pytest.mark.parametrize("family", ["gan", "vae"])
def test_gan_and_vae_model_flops_equal_the_compiled_programs(family):
  """For every case the CPU preset runs (the tiny preset's: see the test above): the model
  FLOPs the benchmark reports are those of the compiled step's convolutions and matmuls,
  and the step's traced jaxpr without dead-code elimination counts more (UpConv2x's
  discarded passes)."""
  for case, _ in run.PRESETS["cpu"][1][family]:
    fam, host_batch = run.BENCHES[family].family_and_batch(case, "float32")
    c = compile_step(fam, host_batch, max_devices=1)
    assert model_flops(c) == c["compiled_flops_per_step"] > 0, case
    traced = count_matmul_flops(guard.guard_step(fam.train_step), c["state"], c["batch"],
                                dce=False)
    assert traced > model_flops(c), case


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


@pytest.mark.parametrize("family", ["lm", "gan", "vae", "diffusion"])
def test_gpu_preset_cases_trace_in_bfloat16_at_full_size(family):
  """The GPU preset cannot run here; its steps are traced (not run) at their real shapes,
  as the GPU run compiles them, so a GPU session does not discover a broken case."""
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
