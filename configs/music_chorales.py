"""A small transformer on Bach's four-part chorales (music21's corpus: 394 chorales,
split by melody so no hymn tune is in both halves; the `music` extra), one token per
event word: `bar`, a position in the bar, then per note its voice, pitch and duration
(aigc_jax/data/chorale_tokenizer.py; 262 ids). A chorale is ~790 words, so a window of 512
holds most of one; a prompt such as "key:1 meter:4/4 pickup:0" asks for one in G major."""

from aigc_jax.families.lm import default_config


def get_config():
  c = default_config()
  c.model.update(num_layers=4, num_heads=4, num_kv_heads=2, embed_dim=192, mlp_dim=512,
                 dropout=0.1)  # 394 chorales: 16 epochs by step 550, where it overfits
  c.data.update(name="chorales", tokenizer="chorale", seq_len=512, val_fraction=0.1)
  c.train.update(steps=600, batch_size=16, log_every=50, eval_every=200, eval_batches=8,
                 checkpoint_every=200)
  c.optim.update(lr=3e-3, warmup_steps=100, weight_decay=0.1)
  c.sample.update(prompt="key:1 meter:4/4 pickup:0", num=2, max_new_tokens=500,
                  temperature=0.9, top_p=0.95)
  return c
