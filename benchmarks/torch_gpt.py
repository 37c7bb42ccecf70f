"""A GPT-2-style model in PyTorch with nanoGPT's architecture (LayerNorm, GELU MLP 4x,
fused QKV, scaled_dot_product_attention, tied embeddings, AdamW), written here as the
eager-PyTorch reference for step-time comparisons. Needs `torch` (the `bench` extra)."""

from __future__ import annotations

from benchmarks.torch_timing import time_eager


def build(vocab: int, layers: int, heads: int, width: int, context: int):
  import torch
  import torch.nn as nn
  import torch.nn.functional as F

  class Block(nn.Module):
    def __init__(self):
      super().__init__()
      self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
      self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
      self.fc, self.out = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x):
      B, T, C = x.shape
      q, k, v = self.qkv(self.ln1(x)).split(C, dim=2)
      q, k, v = (t.view(B, T, heads, C // heads).transpose(1, 2) for t in (q, k, v))
      y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
      x = x + self.proj(y.transpose(1, 2).reshape(B, T, C))
      return x + self.out(F.gelu(self.fc(self.ln2(x))))

  class GPT(nn.Module):
    def __init__(self):
      super().__init__()
      self.tok, self.pos = nn.Embedding(vocab, width), nn.Embedding(context, width)
      self.blocks = nn.ModuleList(Block() for _ in range(layers))
      self.ln = nn.LayerNorm(width)
      self.head = nn.Linear(width, vocab, bias=False)
      self.head.weight = self.tok.weight

    def forward(self, idx, targets):
      x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
      for b in self.blocks:
        x = b(x)
      logits = self.head(self.ln(x))
      return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))

  return GPT()


def time_step(vocab=257, layers=4, heads=4, width=128, context=64, batch=12, steps=60,
              warmup=10) -> dict:
  """Median seconds of one eager float32 training step (forward, backward, AdamW)."""
  import torch

  torch.manual_seed(0)
  model = build(vocab, layers, heads, width, context)
  opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
  x = torch.randint(0, vocab, (batch, context))
  y = torch.randint(0, vocab, (batch, context))

  def step():
    loss = model(x, y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss

  return time_eager(step, steps, warmup)


if __name__ == "__main__":
  print(time_step())
