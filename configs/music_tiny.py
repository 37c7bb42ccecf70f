"""A tiny ABC music LM for tests: one collection (Ryan's Mammoth, ~1,000 tunes), the ABC
tokenizer, every mesh of 8 devices dividing its shapes, music figures at evaluation."""

from aigc_jax.families.lm import default_config


def get_config():
  c = default_config()
  # vocab_size: the ABC tokenizer's ids (~700 from this collection) padded to a multiple
  # of 8, so the embedding splits whole on any mesh of 8 devices.
  c.model.update(num_layers=2, num_heads=8, num_kv_heads=8, embed_dim=64, mlp_dim=128,
                 vocab_size=1280)
  c.data.update(name="abc", tokenizer="abc", abc_collections=("ryansMammoth",), seq_len=64)
  c.train.update(steps=20, batch_size=8, log_every=5, eval_every=10, eval_batches=2,
                 checkpoint_every=10)
  c.optim.update(lr=3e-3, warmup_steps=5)
  c.music.update(eval_samples=4, eval_max_new_tokens=32)
  c.sample.update(prompt="X:1\nM:6/8\nL:1/8\nK:D\n", num=2, max_new_tokens=32)
  return c
