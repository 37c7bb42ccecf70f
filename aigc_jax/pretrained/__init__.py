"""Pretrained weights from files (GGUF) into aigc_jax models."""
