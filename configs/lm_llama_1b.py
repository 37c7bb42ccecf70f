"""Llama-3.2-1B's shape (16 layers, width 2048, 32 query / 8 key-value heads of 64, SwiGLU
8192, tied embeddings, ~1.24B parameters with the 128,256-token vocabulary) at context
2048 in bfloat16, its blocks scanned (`lax.scan`: one compiled block) and rematerialised,
FSDP over every device.

The byte tokenizer with an explicit vocabulary keeps the model's shape without reading
data, for memory planning (`python -m benchmarks.plan`) and step benchmarks; to train,
point `data` at a corpus (ids above 256 then stay unused)."""

from aigc_jax.families.lm import default_config


def get_config():
  c = default_config()
  c.model.update(vocab_size=128256, num_layers=16, num_heads=32, num_kv_heads=8,
                 embed_dim=2048, mlp_dim=8192, head_dim=64, tie_embeddings=True,
                 rope_base=500000.0, norm_eps=1e-5, dtype="bfloat16", attention="auto",
                 remat_policy="full", scan_layers=True, dropout=0.0,
                 logits_chunk=512)  # [B, 512, V] logits at a time, not [B, 2048, V]
  c.data.update(seq_len=2048, tokenizer="byte")
  c.train.update(steps=20000, batch_size=64, log_every=50, eval_every=1000, eval_batches=16,
                 checkpoint_every=1000)
  c.optim.update(lr=3e-4, warmup_steps=2000, weight_decay=0.1, b1=0.9, b2=0.95,
                 min_lr_ratio=0.1, grad_clip=1.0)
  c.mesh.update(data=1, fsdp=-1, tensor=1)
  return c
