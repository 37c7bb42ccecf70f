"""LoRA SFT of SmolLM2-135M-Instruct on the stdlib instruction set (prompt = a function's
signature and docstring, response = its body; loss on response tokens only)."""

from aigc_jax.families.finetune import default_config


def get_config():
  c = default_config()
  c.task.name = "sft"
  c.data.update(name="stdlib_functions", seq_len=256, max_eval_examples=96)
  # No adapter dropout and 4 micro-batches of 2: on CPU, XLA keeps the dropout masks and
  # every layer's activations of a whole 8 x 256 batch live (9.3 GB of temporaries);
  # this way a step needs 1.6 GB (peak RSS of the run 3.2 GB). The logits are made 64
  # positions at a time (model.logits_chunk, the default).
  c.lora.update(rank=8, alpha=16.0, dropout=0.0)
  # 80 x 8 = 640 of the 4,051 training functions (~11 s a step on 2 CPU cores).
  c.train.update(steps=80, batch_size=8, grad_accum_steps=4, log_every=10, eval_every=40,
                 checkpoint_every=40)
  c.optim.update(lr=3e-4, warmup_steps=10)
  c.sample.update(num=2, max_new_tokens=120)
  return c
