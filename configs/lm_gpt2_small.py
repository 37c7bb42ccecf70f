"""GPT-2-small shape (12 layers, 12 heads, width 768, context 1024, ~124M parameters with
a 50k vocabulary) for a GPU/TPU: bfloat16 compute, BPE tokenizer, rematerialised blocks."""

from aigc_jax.families.lm import default_config


def get_config():
  c = default_config()
  c.model.update(num_layers=12, num_heads=12, num_kv_heads=12, embed_dim=768, mlp_dim=2048,
                 dtype="bfloat16", attention="auto", remat=True, dropout=0.0)
  c.data.update(seq_len=1024, tokenizer="bpe", bpe_vocab_size=32768)
  c.train.update(steps=20000, batch_size=64, log_every=50, eval_every=1000, eval_batches=32,
                 checkpoint_every=1000)
  c.optim.update(lr=6e-4, warmup_steps=700, weight_decay=0.1, min_lr_ratio=0.1)
  return c
