"""Opinion monitoring's classifier: the BERT encoder all-MiniLM-L6-v2 (its wheel; 22.7M
parameters) fully fine-tuned with a linear head on its mean-pooled states, on VADER's NYT
editorial snippets and tweets as negative / neutral / positive (`data.name='opinion'`;
thresholds in aigc_jax/data/opinion.py); evaluation reports accuracy and macro-F1 beside
TF-IDF + logistic regression on the same split. `aigc-jax classify --workdir RUN` then
scores a file of texts, and `--monitor` flags surges of negative ones."""

from aigc_jax.families.finetune import default_config


def get_config():
  c = default_config()
  c.pretrained.update(format="bert", path="")
  c.task.update(name="classify", num_classes=3)
  c.data.update(name="opinion", seq_len=64, max_eval_examples=0)
  c.model.update(dropout=0.1)
  c.lora.update(rank=0, dropout=0.0)  # full fine-tuning: the encoder is small
  c.train.update(steps=400, batch_size=32, log_every=20, eval_every=200, checkpoint_every=100,
                 eval_at_start=False)
  c.optim.update(lr=5e-5, warmup_steps=40, weight_decay=0.01)
  c.sample.num = 0
  return c
