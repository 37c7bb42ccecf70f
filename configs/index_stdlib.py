"""The retrieval assistant's index: the standard library's documented functions, classes
and methods and pydoc's help topics (~5,400 passages), embedded by all-MiniLM-L6-v2
(about 3 min on 2 CPU cores; collection.limit=N for the first N).

  aigc-jax index --config configs/index_stdlib.py
  aigc-jax ask --index runs/stdlib_index "How do I read a CSV file into dictionaries?"
"""

from aigc_jax.apps.ask import default_index_config


def get_config():
  c = default_index_config()
  c.index.update(dir="runs/stdlib_index", max_len=256, batch_size=64)
  return c
