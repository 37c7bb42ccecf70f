"""Model families on the shared training loop: `lm`, `gan`, `vae`, `finetune`.

Each module provides `default_config()`, `validate(config)` and a `Family` class (the
contract: `aigc_jax.train.family`). They are registered by name as entry points (group
`aigc_jax.families` in pyproject.toml); `aigc_jax.train.family.load_family` finds them,
and families of other packages, by name or dotted path.
"""
