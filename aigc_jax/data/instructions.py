"""An instruction set built from the Python standard library: the prompt is a function's
signature and docstring, the response its body.

Functions are found with `ast` in the stdlib files outside test folders; a function
qualifies when it has a docstring and a body of `min_body_lines`..`max_body_lines` lines
after it. The split is by file (a hash of its path), so held-out functions come from
modules the model never saw during fine-tuning.
"""

from __future__ import annotations

import ast
import textwrap

from aigc_jax.data.text import split_documents, stdlib_documents
from aigc_jax.errors import UserError

INSTRUCTION = "Write the body of this Python function.\n\n"


def function_pairs(name: str, source: str, min_body_lines: int = 2,
                   max_body_lines: int = 30) -> list[dict]:
  """[{'prompt', 'response', 'source'}] for the documented functions of one module."""
  try:
    tree = ast.parse(source)
  except (SyntaxError, ValueError):
    return []
  lines = source.splitlines()
  pairs = []
  for node in ast.walk(tree):
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      continue
    doc = ast.get_docstring(node, clean=False)
    if not doc or len(node.body) < 2:
      continue
    doc_end = node.body[0].end_lineno  # the docstring statement's last line (1-based)
    body_end = node.end_lineno
    if not (min_body_lines <= body_end - doc_end <= max_body_lines):
      continue
    start = min([d.lineno for d in node.decorator_list] + [node.lineno]) - 1
    head = textwrap.dedent("\n".join(lines[start:doc_end]))
    indent = len(lines[start]) - len(lines[start].lstrip())
    body = "\n".join(line[indent:] for line in lines[doc_end:body_end])
    pairs.append({"prompt": INSTRUCTION + head, "response": body.rstrip() + "\n",
                  "source": f"{name}:{node.lineno}"})
  return pairs


def stdlib_function_pairs(limit_files: int = 0, val_fraction: float = 0.05,
                          max_body_lines: int = 30) -> tuple[list[dict], list[dict]]:
  """(train, held-out) pairs from the standard library, split by file."""
  train_docs, val_docs = split_documents(stdlib_documents(limit_files), val_fraction)
  pairs = lambda docs: [p for name, text in docs
                        for p in function_pairs(name, text, max_body_lines=max_body_lines)]
  train, val = pairs(train_docs), pairs(val_docs)
  if not train or not val:
    raise UserError(f"the standard library's first {limit_files or 'all'} files gave "
                    f"{len(train)} training and {len(val)} held-out functions: raise "
                    "data.limit_files or data.val_fraction")
  return train, val
