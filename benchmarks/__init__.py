"""Step-throughput benchmarks (scripts that print figures; never timed tests).

The benchmarks are entry points: importing this package applies the XLA:CPU flags the
`aigc-jax` CLI applies (aigc_jax itself changes nothing on import), so a benchmark times
the programs a training run executes.
"""

from aigc_jax.xla_flags import apply_fast_cpu_flags

apply_fast_cpu_flags()  # before anything starts a JAX backend
