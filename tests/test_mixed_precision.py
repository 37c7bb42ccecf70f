"""GAN, VAE and diffusion compute dtypes: with model.dtype='bfloat16' every matmul and
convolution of the train step runs in bfloat16, parameters stay float32, and the losses
match float32."""

import jax
import numpy as np
import pytest

from aigc_jax.errors import UserError
from aigc_jax.families import diffusion, gan, vae
from aigc_jax.train.loop import prepare_config


def _family(module, dtype: str):
  c = module.default_config()
  c.model.update(image_size=8, width=8, dtype=dtype)
  if module is gan:
    c.model.update(z_dim=8)
  elif module is vae:
    c.model.update(latent_dim=4, hidden=16)
  else:
    c.model.update(channel_mults=(1, 2), attention_levels=(1,), head_dim=8, groups=4)
  c.train.update(batch_size=4)
  images = np.random.default_rng(0).uniform(-1, 1, (4, 8, 8, 1)).astype(np.float32)
  batch = {"images": images, "labels": np.arange(4, dtype=np.int32)} if module is not vae \
      else {"images": images}
  return module.Family(c, None), batch


def _matmul_input_dtypes(jaxpr) -> set[str]:
  dtypes = set()
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
      dtypes |= {str(v.aval.dtype) for v in eqn.invars}
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          dtypes |= _matmul_input_dtypes(inner)
  return dtypes


@pytest.mark.parametrize("module", [gan, vae, diffusion], ids=["gan", "vae", "diffusion"])
def test_bfloat16_compute_keeps_float32_parameters_and_losses(module):
  losses = {}
  for dtype in ("float32", "bfloat16"):
    family, batch = _family(module, dtype)
    state = family.init_state(jax.random.PRNGKey(0))
    jaxpr = jax.make_jaxpr(family.train_step)(state, batch).jaxpr
    assert _matmul_input_dtypes(jaxpr) == {dtype}
    new_state, metrics = jax.jit(family.train_step)(state, batch)
    assert {str(x.dtype) for x in jax.tree.leaves(new_state.params)} == {"float32"}
    key = "g_loss" if module is gan else "loss"
    assert metrics[key].dtype == np.float32
    losses[dtype] = float(metrics[key])
  np.testing.assert_allclose(losses["bfloat16"], losses["float32"], rtol=2e-2)


@pytest.mark.parametrize("module", [gan, vae, diffusion], ids=["gan", "vae", "diffusion"])
def test_unknown_dtype_is_one_clear_error(module):
  c = module.default_config()
  c.model.dtype = "float8"
  with pytest.raises(UserError, match="'model.dtype' must be one of"):
    prepare_config(c)
