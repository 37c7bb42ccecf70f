"""Llama-3-8B's shape (32 layers, width 4096, 32 query / 8 key-value heads of 128, SwiGLU
14336, untied embeddings, ~8.03B parameters with the 128,256-token vocabulary) at context
4096 in bfloat16, its blocks scanned (`lax.scan`: one compiled block) and rematerialised,
FSDP over every device: a multi-host GPU/TPU run (float32 parameters + AdamW moments are
12 bytes a parameter, ~96 GB in all).

The byte tokenizer with an explicit vocabulary keeps the model's shape without reading
data, for memory planning (`python -m benchmarks.plan`) and step benchmarks; to train,
point `data` at a corpus (ids above 256 then stay unused)."""

from aigc_jax.families.lm import default_config


def get_config():
  c = default_config()
  c.model.update(vocab_size=128256, num_layers=32, num_heads=32, num_kv_heads=8,
                 embed_dim=4096, mlp_dim=14336, head_dim=128, tie_embeddings=False,
                 rope_base=500000.0, norm_eps=1e-5, dtype="bfloat16", attention="auto",
                 remat_policy="full", scan_layers=True, dropout=0.0,
                 logits_chunk=512)  # [B, 512, V] logits at a time, not [B, 4096, V]
  c.data.update(seq_len=4096, tokenizer="byte")
  c.train.update(steps=50000, batch_size=128, log_every=50, eval_every=1000, eval_batches=16,
                 checkpoint_every=1000)
  c.optim.update(lr=3e-4, warmup_steps=2000, weight_decay=0.1, b1=0.9, b2=0.95,
                 min_lr_ratio=0.1, grad_clip=1.0)
  c.mesh.update(data=1, fsdp=-1, tensor=1)
  return c
