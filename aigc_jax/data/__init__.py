"""Data: text corpora, tokenizers, seeded batch sources."""
