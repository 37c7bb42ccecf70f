"""Pretrain, then fine-tune: the music LM of configs/music_abc.py (every ABC tune),
fine-tuned on the tunes in 6/8 alone (1,766 of 11,478: jigs and the like) with the
fine-tuning machinery (full fine-tuning here; lora.rank=8 for adapters). The held-out 6/8
tunes are held out of the pretraining run too (both split each tune by its own hash).

  aigc-jax train --config configs/music_abc.py --workdir runs/music_abc
  aigc-jax train --config configs/music_abc_jigs.py --workdir runs/music_jigs \\
      [--config.pretrained.path=runs/music_abc]
"""

from aigc_jax.families.finetune import default_config


def get_config():
  c = default_config()
  c.pretrained.update(format="run", path="runs/music_abc")
  c.task.name = "lm"
  c.data.update(name="abc", abc_fields=("M:6/8",), seq_len=256, max_eval_examples=256)
  c.model.update(logits_chunk=0)
  c.lora.update(rank=0, dropout=0.0)  # full fine-tuning of the 1.85M parameters
  c.train.update(steps=300, batch_size=16, log_every=50, eval_every=100, checkpoint_every=100)
  c.optim.update(lr=1e-3, warmup_steps=50, weight_decay=0.1, b2=0.95)
  c.music.update(eval_samples=100)
  c.sample.update(prompt="X:1\nM:6/8\nL:1/8\nK:D\n", num=2, max_new_tokens=240,
                  temperature=0.8, top_p=0.95)
  return c
