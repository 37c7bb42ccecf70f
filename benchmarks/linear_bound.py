"""The LM's linear layers alone, forward and backward, in JAX and in eager PyTorch.

Every LM case's dense matmuls (Q, K, V, O, SwiGLU gate / up / down: the same shapes as the
model's, forward, input gradient and weight gradient) chained with one multiply each
and no attention, norms, loss or optimizer. What this takes is a floor that a
framework's matmul kernels set for the whole LM step: where JAX's chain is slower than
PyTorch's, the LM step cannot match PyTorch's by rearranging the model.

  python -m benchmarks.linear_bound [--case w384] [--steps 10]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from aigc_jax.train.memory import keep_step_memory, reexec_with_malloc_tunables
from benchmarks.common import timed
from benchmarks.lm_step import CASES


def kernel_shapes(width: int, mlp: int) -> dict[str, tuple[int, int]]:
  return {"q": (width, width), "k": (width, width), "v": (width, width), "o": (width, width),
          "gate": (width, mlp), "up": (width, mlp), "down": (mlp, width)}


def chain_flops(case: str) -> int:
  """Matmul FLOPs of one forward + backward pass of the chain (3x the forward's)."""
  layers, _, width, mlp, context, batch, _ = CASES[case]
  per_token = sum(2 * a * b for a, b in kernel_shapes(width, mlp).values())
  return 3 * layers * batch * context * per_token


def chain_loss(params: list[dict], x_MD, matmul=jnp.matmul):
  """sum(y^2) of the chain; `matmul` lets PyTorch run the same function."""
  for p in params:
    h_MD = matmul(x_MD, p["q"]) + matmul(x_MD, p["k"]) * matmul(x_MD, p["v"])
    x_MD = x_MD + matmul(h_MD, p["o"])
    x_MD = x_MD + matmul(matmul(x_MD, p["gate"]) * matmul(x_MD, p["up"]), p["down"])
  return (x_MD * x_MD).sum()


def init_params(case: str, seed: int = 0) -> tuple[list[dict], np.ndarray]:
  layers, _, width, mlp, context, batch, _ = CASES[case]
  rng = np.random.default_rng(seed)
  params = [{name: (rng.standard_normal(shape) * 0.02).astype(np.float32)
             for name, shape in kernel_shapes(width, mlp).items()} for _ in range(layers)]
  return params, rng.standard_normal((batch * context, width)).astype(np.float32)


def time_jax(case: str, steps: int) -> tuple[float, float]:
  """(median, min) seconds of the jitted gradient of the chain (with respect to the
  kernels and the input, as the LM's first layer feeds the embedding's gradient)."""
  if jax.default_backend() == "cpu":
    keep_step_memory()  # as the LM benchmark does
  params, x = init_params(case)
  grad = jax.jit(jax.grad(chain_loss, argnums=(0, 1)))
  params, x = jax.device_put((params, x))
  med, low, _ = timed(lambda: grad(params, x), steps)
  return med, low


def time_torch(case: str, steps: int) -> tuple[float, float]:
  """(median, min) seconds of the same chain's backward pass in eager PyTorch."""
  import torch

  from benchmarks.torch_timing import time_eager

  params, x = init_params(case)
  params = [{k: torch.from_numpy(v).requires_grad_() for k, v in p.items()} for p in params]
  x = torch.from_numpy(x).requires_grad_()

  def step():
    loss = chain_loss(params, x, matmul=torch.matmul)
    loss.backward()
    return loss.detach()

  timing = time_eager(step, steps, warmup=3)
  return timing["median_s"], timing["min_s"]


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--case", default="w384", choices=sorted(CASES))
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--torch", action=argparse.BooleanOptionalAction, default=True)
  args = p.parse_args(argv)
  flops = chain_flops(args.case)
  result = {"case": args.case, "gflop": flops / 1e9}
  runs = [("jax", time_jax)] + ([("torch", time_torch)] if args.torch else [])
  for name, fn in runs:
    med, low = fn(args.case, args.steps)
    result[name] = {"median_ms": med * 1e3, "min_ms": low * 1e3, "gflop_per_s": flops / low / 1e9}
    print(f"{args.case} linear layers, {name}: median {med * 1e3:,.1f} ms, min {low * 1e3:,.1f} "
          f"ms, {flops / low / 1e9:.1f} GFLOP/s ({flops / 1e9:.2f} GFLOP)", flush=True)
  return result


if __name__ == "__main__":
  reexec_with_malloc_tunables()  # the same malloc settings as benchmarks.run
  main()
