"""The one training loop every model family runs on.

Compiles the family's pure step once (ahead of time, state donated, shardings explicit),
feeds it seeded batches, reads step N's metrics only after step N+1 is dispatched, evaluates,
writes samples, checkpoints asynchronously and resumes from the newest checkpoint.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from aigc_jax import config as config_lib
from aigc_jax.errors import UserError
from aigc_jax.nn.partitioning import activation_sharding
from aigc_jax.train import guard
from aigc_jax.train import mesh as mesh_lib
from aigc_jax.train import plan as plan_lib
from aigc_jax.train import sharding as sharding_lib
from aigc_jax.train.checkpoint import Checkpointer
from aigc_jax.train.family import family_module_path, load_family
from aigc_jax.train.memory import release_free_memory
from aigc_jax.train.metrics import MetricsWriter, plot_curves
from aigc_jax.train.preemption import Preempted, StopRequests, stop_requests  # noqa: F401
from aigc_jax.train.resume_checks import (  # noqa: F401
  DATA_READING_KEYS,
  RUNTIME_MODEL_KEYS,
  _check_read_config,
  _check_resume_config,
  check_data_fingerprint,
  fixed_differences,
  on_every_process,
)
from aigc_jax.train.workdir_lock import training_lock


def prepare_config(config, family=None):
  """Checks a run config against its family's defaults and rules; returns the family
  module (`family`: the module itself, or None to find it from `config.family`)."""
  if config.get("family") is None:
    raise UserError("config has no 'family' key: start from a family's default_config(), "
                    "e.g. aigc_jax.families.lm.default_config()")
  module = load_family(config.family if family is None else family)
  if family is not None and family_module_path(config.family) != module.__name__:
    # The saved config must name the module that trained, or eval/resume would load another.
    raise UserError(f"config 'family' is {config.family!r}, but the run was given the family "
                    f"module {module.__name__!r}: set config.family = {module.__name__!r}")
  config_lib.check_against_defaults(config, module.default_config())
  module.validate(config)
  guard.validate(config)
  return module


def prepare_workdir(workdir: str) -> str:
  """The absolute workdir, created and checked writable (UserError naming the fix)."""
  workdir = os.path.abspath(os.path.expanduser(workdir))
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f".write_test.{jax.process_index()}")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise UserError(f"workdir {workdir!r} is not writable ({e.strerror}): choose another "
                    "--workdir") from e
  return workdir


@dataclasses.dataclass
class Run:
  """A family bound to a mesh, with its state and compiled steps (for training or
  inference)."""

  config: object
  workdir: str
  family: object
  mesh: jax.sharding.Mesh
  state: object
  checkpointer: Checkpointer
  state_sharding: object = None
  rules: dict = dataclasses.field(default_factory=dict)

  def sharded(self):
    """The context in which the family's code is traced: activations pinned to the mesh
    by the rules (`nn.partitioning.constrain`)."""
    return activation_sharding(self.mesh, self.rules)

  def jit_train_step(self):
    """The guarded train step under `jax.jit` with the state's shardings, state donated
    (trace it inside `sharded()`)."""
    return jit_train_step(self.family, self.config, self.mesh, self.state_sharding)

  def compile_train_step(self, batch):
    """The guarded train step compiled ahead of time for `batch`'s shapes, state donated.
    A step whose memory (from the compiled program) exceeds what the devices (on CPU:
    the host) have free stops here with one error, before it runs."""
    with self.sharded():
      compiled = self.jit_train_step().lower(self.state, batch).compile()
    release_free_memory()  # the compiler's working memory
    # The state and batch are on the devices already (counted as in use).
    if plan_lib.reports_memory(self.mesh):
      memory = plan_lib.compiled_memory(compiled)
      on_every_process(lambda: plan_lib.check_fits(memory, resident=memory["argument_bytes"]))
    elif jax.default_backend() == "cpu":  # CPU devices share the host's memory
      memory = plan_lib.compiled_memory(compiled)
      local = sum(d.process_index == jax.process_index() for d in self.mesh.devices.flat)
      on_every_process(lambda: plan_lib.check_fits_host(memory, local,
                                                        resident=memory["argument_bytes"]))
    return compiled

  def put_batch(self, batch):
    """A host batch (this process's rows) as a global array split over the batch axes."""
    return mesh_lib.put_batch(batch, self.mesh)

  def host_part(self, batch):
    """This process's rows of a whole global batch (all of it with one process)."""
    if jax.process_count() == 1:
      return batch
    rows = mesh_lib.host_rows(len(jax.tree.leaves(batch)[0]), self.mesh)
    return jax.tree.map(lambda x: x[rows], batch)

  def evaluate(self) -> dict[str, float]:
    """The family's metrics over all its eval batches (sums accumulated on device; one
    transfer at the end), then its sample metrics."""
    if not hasattr(self, "_eval_step"):
      self._eval_step = jax.jit(
          self.family.eval_step,
          in_shardings=(self.state_sharding, mesh_lib.batch_sharding(self.mesh)),
          out_shardings=mesh_lib.replicated(self.mesh))
    totals = None
    for i, batch in enumerate(self.family.eval_batches()):
      with self.sharded():
        sums = self._eval_step(self.state, self.put_batch(self.host_part(batch)))
      totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
      if i % 16 == 15:
        # A bounded number of collective programs in flight: XLA:CPU's rendezvous can
        # time out with dozens queued on many (fake) devices.
        jax.block_until_ready(totals)
    totals = {k: np.asarray(v, np.float64) for k, v in jax.device_get(totals).items()}
    metrics = {**self.family.summarize_eval(totals), **self.family.sample_metrics(self.state)}
    release_free_memory()
    return {k: v if isinstance(v, int) else float(v) for k, v in metrics.items()}


def open_run(config, workdir: str, *, for_training: bool, family=None) -> Run:
  """Builds the family and state; restores the newest checkpoint if there is one.

  `family`: the family module (None: found from `config.family`, a registered name or a
  dotted module path; see `aigc_jax.train.family`).
  """
  module = prepare_config(config, family)
  if for_training:
    workdir = prepare_workdir(workdir)
  else:  # eval and sample write nothing into the run's folder
    workdir = os.path.abspath(os.path.expanduser(workdir))
  checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"),
                              keep=config.train.keep_checkpoints, read_only=not for_training)
  if for_training:
    _check_resume_config(config, workdir, module, checkpointer)
  else:
    _check_read_config(config, workdir, module, checkpointer)
  mesh = (mesh_lib.make_mesh(config.mesh) if for_training
          else mesh_lib.make_mesh_for_reading(config.mesh))
  rules = mesh_lib.rules_from_config(config.mesh)
  mesh_lib.check_batch_divisible(config.train.batch_size, mesh)
  family = module.Family(config, workdir)
  if hasattr(family, "check_mesh"):  # e.g. attention heads that must split whole
    family.check_mesh(mesh, rules)
  if plan_lib.reports_memory(mesh):
    # An accelerator: the state and a batch must fit before anything is allocated (the
    # compiled step's temporaries are checked once it is compiled).
    plan_lib.preflight(config, mesh, rules, family)
  init = ShardedInit(family, mesh, rules, config.seed)
  train_data = family.train_data
  if jax.process_count() > 1 and hasattr(train_data, "rows"):
    # Each process builds only its own rows of every batch.
    train_data.rows = mesh_lib.host_rows(config.train.batch_size, mesh)
  if checkpointer.latest_step() is not None:
    # Restored straight into the current run's shardings (whatever mesh saved it): the
    # initial state is never built beside the restored one.
    state, data_state, _ = checkpointer.restore(init.restore_target())
    if for_training:
      on_every_process(lambda: check_data_fingerprint(data_state, train_data.get_state(),
                                                      workdir))
    train_data.set_state(data_state)
  elif not for_training:
    raise UserError(f"no checkpoint in {workdir}/checkpoints: train first "
                    f"(aigc-jax train --config ... --workdir {workdir})")
  else:
    state = init.state()
  release_free_memory()  # e.g. the random or host copies that pretrained weights replaced
  return Run(config, workdir, family, mesh, state, checkpointer, init.shardings, rules)


class ShardedInit:
  """A family's initial state (with the guard's statistics): its shapes, its shardings
  from the parameters' logical names (`family.param_names()`; all replicated for a family
  without one), and the state built under `jax.jit` straight into them, so no device ever
  holds more than its part. Pretrained weights (`family.load_weights`) are put in place
  as data, not compiled constants."""

  def __init__(self, family, mesh, rules: dict, seed: int):
    self.family, self.mesh, self.rules = family, mesh, rules
    self.key = jax.random.PRNGKey(seed)
    self.init = lambda rng: guard.init(family.init_state(rng))
    names = family.param_names() if hasattr(family, "param_names") else None
    with activation_sharding(mesh, rules):
      self.abstract = jax.eval_shape(self.init, self.key)
      self.shardings = sharding_lib.state_shardings(self.abstract, names, mesh, rules)

  def _jit(self, fn, shardings):
    with activation_sharding(self.mesh, self.rules):
      return jax.jit(fn, out_shardings=shardings)(self.key)

  def state(self):
    """The initial state on the mesh (with pretrained weights in place)."""
    state = self._jit(self.init, self.shardings)
    if hasattr(self.family, "load_weights"):
      state = jax.device_put(self.family.load_weights(state), self.shardings)
    return state

  def restore_target(self):
    """What a checkpoint restores into: shapes and shardings, plus the frozen weights
    (checkpoints do not hold them), built and loaded alone."""
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          self.abstract, self.shardings)
    if hasattr(self.family, "load_weights") and jax.tree.leaves(self.abstract.frozen):
      frozen = self._jit(lambda rng: self.init(rng).frozen, self.shardings.frozen)
      loaded = self.family.load_weights(target.replace(frozen=frozen)).frozen
      target = target.replace(frozen=jax.device_put(loaded, self.shardings.frozen))
    return target


def jit_train_step(family, config, mesh, state_sharding):
  """The family's train step inside the non-finite guard, under `jax.jit` with the
  state's shardings (batch split over data x fsdp), state donated: what the loop runs
  (trace it inside `activation_sharding(mesh, rules)`)."""
  t = config.train
  step = guard.guard_step(family.train_step, t.spike_sigma, t.spike_window)
  return jax.jit(step, in_shardings=(state_sharding, mesh_lib.batch_sharding(mesh)),
                 out_shardings=(state_sharding, mesh_lib.replicated(mesh)),
                 donate_argnums=0)


def init_sharded_state(family, mesh, rules: dict, seed: int):
  """(state, its shardings): the family's initial state built under `jax.jit` straight
  into the shardings its parameters' logical names give (see `ShardedInit`)."""
  init = ShardedInit(family, mesh, rules, seed)
  return init.state(), init.shardings


class _TrainLog:
  """Writes step N's train metrics once step N+1 has been dispatched, so reading them
  never stalls the device; rates are the steps finished since the last record over the
  time since it (reading step N's metrics waits for step N to finish)."""

  def __init__(self, writer: MetricsWriter, items_per_step: dict, bar, shown: tuple,
               start_step: int):
    self.writer, self.items_per_step, self.bar, self.shown = writer, items_per_step, bar, shown
    self.pending = None
    self.last_step, self.last_time = start_step, time.perf_counter()

  def exclude(self, seconds: float) -> None:
    """Leaves time spent off the train step (evaluation, samples) out of the rates."""
    self.last_time += seconds

  def hold(self, step: int, metrics) -> None:
    self.flush()
    self.pending = (step, metrics)

  def flush(self) -> None:
    if self.pending is None:
      return
    step, metrics = self.pending
    self.pending = None
    values = jax.device_get(metrics)
    now = time.perf_counter()
    rate = (step - self.last_step) / max(now - self.last_time, 1e-9)
    self.last_step, self.last_time = step, now
    rates = {"steps_per_sec": rate}
    rates.update({f"{k}_per_sec": v * rate for k, v in self.items_per_step.items()})
    record = self.writer.write(step, "train", {**values, **rates})
    self.bar.set_postfix({k: f"{record[k]:.4f}" for k in self.shown if k in record})


def _write_samples(run: Run, state, step: int) -> None:
  """The family's samples of `step`. With several processes the state is sharded across
  hosts and no process may gather it, so samples are not written during training (say so
  once); `aigc-jax sample` on one host writes them from the checkpoint."""
  if jax.process_count() == 1:
    try:
      with run.sharded():
        run.family.write_samples(state, step, run.workdir)
    except OSError as e:  # the step's checkpoint is already saved (see _run_steps)
      where = e.filename or os.path.join(run.workdir, "samples")
      raise UserError(f"cannot write the samples of step {step} to {where} "
                      f"({e.strerror or e}); the checkpoint of step {step} is saved: free "
                      "disk space or fix the folder's permissions, then re-run the same "
                      "command to resume") from e
  elif jax.process_index() == 0 and not getattr(run, "_warned_samples", False):
    run._warned_samples = True
    print("note: samples are not written during a multi-process run; run `aigc-jax sample "
          f"--workdir {run.workdir}` afterwards", file=sys.stderr)


def train_and_evaluate(config, workdir: str, *, family=None,
                       progress: bool | None = None) -> dict:
  """Trains (or resumes) the run in `workdir` to `config.train.steps`, evaluating every
  `train.eval_every` steps; returns a summary with the final evaluation.

  `family`: the family module (None: found from `config.family`). `progress`: show a
  progress bar (None: when stderr is a terminal). Changes no process-wide setting; on CPU,
  `aigc_jax.train.memory.keep_step_memory()` (which the CLI applies) makes steps faster.
  """
  with training_lock(workdir):  # one training run per workdir (train/workdir_lock.py)
    return _train_and_evaluate(config, workdir, family=family, progress=progress)


def _train_and_evaluate(config, workdir: str, *, family, progress: bool | None) -> dict:
  # Stop requests are taken from the start: a Ctrl-C while the run restores or compiles
  # is noted and honoured before the first step (never an exception inside Orbax's or
  # XLA's threads).
  with stop_requests() as stop, plan_lib.out_of_memory_as_user_error("the training run"):
    stop.during_start_up(None)
    run = open_run(config, workdir, for_training=True, family=family)
    primary = jax.process_index() == 0  # with several processes, one writes the files
    if primary:
      config_lib.save_config(config, run.workdir)
    writer = MetricsWriter(run.workdir, enabled=primary)
    try:
      return _run_steps(run, writer, progress, stop)
    finally:
      try:
        run.checkpointer.close()  # waits for the last asynchronous save to commit
      finally:
        writer.close()


def _run_steps(run: Run, writer: MetricsWriter, progress: bool | None,
               stop: StopRequests) -> dict:
  family, config = run.family, run.config
  tcfg, total = config.train, config.train.steps
  start = int(jax.device_get(run.state.step))
  summary = {"workdir": run.workdir, "start_step": start}
  stop.during_start_up(start)
  if start >= total:
    return {**summary, **run.evaluate(), "steps": start}

  batch = run.put_batch(next(family.train_data))
  t0 = time.perf_counter()
  step_fn = run.compile_train_step(batch)
  summary["compile_seconds"] = time.perf_counter() - t0
  stop.during_start_up(start)
  stop.begin_training()

  config_dict = config.to_dict()
  bar = tqdm(total=total, initial=start, desc=family.name, unit="step", dynamic_ncols=True,
             disable=not (sys.stderr.isatty() if progress is None else progress))
  log = _TrainLog(writer, family.items_per_step, bar, family.plot_keys, start)
  last_eval = {}
  if start == 0 and tcfg.get("eval_at_start", False):  # e.g. a pretrained model, untuned
    t_eval = time.perf_counter()
    writer.write(0, "val", run.evaluate())
    log.exclude(time.perf_counter() - t_eval)
  state, previous = run.state, None
  check = lambda metrics, step: guard.check(metrics, step, tcfg.nan_policy, run.checkpointer)
  for step in range(start, total):
    state, metrics = step_fn(state, batch)  # dispatched; runs asynchronously
    run.state = state
    done = step + 1
    if previous is not None:
      check(previous, done - 1)  # the previous step, finished while this one runs
    previous = metrics
    data_state = family.train_data.get_state()  # the position after this step's batch
    if done < total:
      batch = run.put_batch(next(family.train_data))  # overlaps the device
    at_eval = done % tcfg.eval_every == 0 or done == total
    stopping = stop.requested(done)
    saving = done % tcfg.checkpoint_every == 0 or done == total or stopping
    if at_eval or saving:
      check(metrics, done)  # never evaluate or checkpoint after an unchecked step
    if saving:
      # Before anything that writes other files (metrics, samples, plots) and may fail
      # on a full disk: the step's checkpoint is kept whatever happens to them.
      run.checkpointer.save(done, state, data_state, config_dict)
    log.flush()  # the previous step's metrics: this step is already dispatched
    if done % tcfg.log_every == 0 or done == total:
      log.hold(done, metrics)
    bar.update(1)
    if at_eval:
      log.flush()
      t_eval = time.perf_counter()
      last_eval = run.evaluate()
      writer.write(done, "val", last_eval)
      _write_samples(run, state, done)
      if writer.enabled:
        plot_curves(run.workdir, family.plot_keys)
      bar.write(f"step {done}: " + ", ".join(f"{k}={v:.4g}" for k, v in last_eval.items()),
                file=sys.stderr)
      log.exclude(time.perf_counter() - t_eval)
    if stopping:
      log.flush()
      bar.close()
      raise Preempted(done, stop.signum)
  bar.close()
  return {**summary, **last_eval, "steps": total}
