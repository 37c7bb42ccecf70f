"""A small transformer on ABC folk tunes (music21's Essen, O'Neill 1850 and Ryan's Mammoth
collections, ~10,900 training tunes; the `music` extra) with the ABC tokenizer (~1,800
units: a note with its accidental, octave and duration is one token), sized for a CPU.
Each tune's text starts with its header in the order X, M, L, R, ..., K, so a prompt such
as "X:1\\nM:6/8\\nL:1/8\\nK:D\\n" asks for a tune in 6/8 in D."""

from aigc_jax.families.lm import default_config


def get_config():
  c = default_config()
  c.model.update(num_layers=4, num_heads=4, num_kv_heads=2, embed_dim=192, mlp_dim=512)
  c.data.update(name="abc", tokenizer="abc", seq_len=256)
  c.train.update(steps=2000, batch_size=16, log_every=50, eval_every=500, eval_batches=16,
                 checkpoint_every=500)
  # Each evaluation also samples 100 tunes prompted with held-out headers and reports their
  # validity, key consistency and histogram overlaps (music_* in metrics.jsonl).
  c.music.update(eval_samples=100)
  c.optim.update(lr=3e-3, warmup_steps=100, weight_decay=0.1)
  c.sample.update(prompt="X:1\nM:6/8\nL:1/8\nK:D\n", num=2, max_new_tokens=240,
                  temperature=0.8, top_p=0.95)
  return c
