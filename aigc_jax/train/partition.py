"""Trainable and frozen parameters, chosen by path patterns.

Parameters are pure nested dicts; a parameter's path is its keys joined by dots
('blocks.3.attn.q_proj.kernel'). `split` divides them into the trainable part (which the
optimizer sees, gradients are taken of, and checkpoints hold) and the frozen part (which
the step only reads: no gradient is computed for it, no optimizer state kept, and it stays
bit-identical). `join` puts them back together.
"""

from __future__ import annotations

from aigc_jax.nn.linear import match_paths


def flat_paths(params: dict, prefix: str = "") -> list[str]:
  """Dotted paths of every leaf, in the dict's order."""
  out = []
  for key, value in params.items():
    path = f"{prefix}{key}"
    out += flat_paths(value, path + ".") if isinstance(value, dict) else [path]
  return out


def trainable_paths(params: dict, trainable=(".*",), frozen=()) -> set[str]:
  """Paths matched by a `trainable` pattern and by no `frozen` pattern (regular
  expressions, `re.search`); a pattern that matches nothing is an error."""
  paths = flat_paths(params)
  chosen = set(match_paths(paths, trainable, "trainable")) if trainable else set()
  return chosen - set(match_paths(paths, frozen, "frozen") if frozen else ())


def split(params: dict, trainable: set[str], prefix: str = "") -> tuple[dict, dict]:
  """(trainable part, frozen part): two dicts with the same nesting; empty sections are
  left out."""
  train, frozen = {}, {}
  for key, value in params.items():
    path = f"{prefix}{key}"
    if isinstance(value, dict):
      t, f = split(value, trainable, path + ".")
      if t:
        train[key] = t
      if f:
        frozen[key] = f
    elif path in trainable:
      train[key] = value
    else:
      frozen[key] = value
  return train, frozen


def join(a: dict, b: dict) -> dict:
  """The union of two disjoint nested dicts."""
  out = dict(a)
  for key, value in b.items():
    out[key] = join(out[key], value) if key in out else value
  return out


def overlay(tree: dict, values: dict) -> dict:
  """`tree` with the leaves that `values` has (same nesting) replaced by them."""
  out = dict(tree)
  for key, value in values.items():
    out[key] = overlay(out.get(key, {}), value) if isinstance(value, dict) else value
  return out
