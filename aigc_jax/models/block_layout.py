"""The transformer's two layer layouts, as parameter dicts: unrolled (`blocks.0`,
`blocks.1`, ...: what pretrained files and LoRA paths use) and stacked (`scan_layers`:
one `blocks` whose arrays carry a leading layer axis), and conversions between them."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from aigc_jax.errors import UserError


def require_unrolled(cfg, what: str) -> None:
  """UserError when `cfg` stacks its blocks: `what` (pretrained import/export, LoRA)
  reads per-layer paths such as 'blocks.0.attn.q_proj'."""
  if cfg.scan_layers:
    raise UserError(f"{what} needs the unrolled layer layout (blocks.0, blocks.1, ...), but "
                    "config 'model.scan_layers' is True: set model.scan_layers=False (convert "
                    "trained parameters with aigc_jax.models.block_layout.unstack_blocks)")


def _stack(arrays):
  xp = np if all(isinstance(a, np.ndarray) for a in arrays) else jnp
  return xp.stack(arrays)


def stack_blocks(params: dict) -> dict:
  """Pure-dict parameters in the unrolled layout ({'blocks': {0: ..., 1: ...}, ...}) ->
  the scan_layers layout ({'blocks': {...}} with a leading layer axis). Host (numpy)
  arrays stay on the host. Works on any dict laid out like the parameters (Adam's mu, nu)."""
  blocks = params.get("blocks")
  if not isinstance(blocks, dict) or not blocks or not all(isinstance(k, int) for k in blocks):
    raise UserError("stack_blocks needs parameters in the unrolled layout, with "
                    "'blocks' keyed 0..L-1 (model.scan_layers=False)")
  layers = [blocks[i] for i in range(len(blocks))]
  return {**params, "blocks": jax.tree.map(lambda *xs: _stack(xs), *layers)}


def unstack_blocks(params: dict) -> dict:
  """The inverse of `stack_blocks`: scan_layers parameters -> the unrolled layout."""
  blocks = params.get("blocks")
  if not isinstance(blocks, dict) or not blocks or any(isinstance(k, int) for k in blocks):
    raise UserError("unstack_blocks needs parameters in the scan_layers layout, with "
                    "'blocks' holding stacked arrays (model.scan_layers=True)")
  L = jax.tree.leaves(blocks)[0].shape[0]
  return {**params, "blocks": {i: jax.tree.map(lambda x, i=i: x[i], blocks)
                               for i in range(L)}}
