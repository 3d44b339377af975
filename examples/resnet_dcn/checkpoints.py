"""Train-state checkpoints with Orbax (``orbax-checkpoint``'s ``CheckpointManager``).

One run (a model, or a variant and seed) keeps its checkpoints in one directory, one
subdirectory per training step::

  RUN_DIR/checkpoints/<step>/state/   the train state (params, optimiser state, ...): tensorstore
  RUN_DIR/checkpoints/<step>/meta/    JSON: epoch, training config, per-epoch history, wall time

What Orbax brings over writing a file by hand:

- **Atomic**: a step is written into a temporary directory and renamed when complete, so an
  interrupted save (a killed process, a preempted host) leaves the previous steps intact and is
  never mistaken for a checkpoint.
- **Multi-host**: every process calls :meth:`Checkpoints.save` and :meth:`Checkpoints.restore`
  (they are collective); every element of an array is written once, by a process that holds it
  (a replicated array is not written by every replica), and the directory must be one that every
  process sees.
- **Resharding**: :meth:`Checkpoints.restore` reads the arrays straight into the shardings of
  the template state it is given, so a state written by one process on one device resumes on
  any number of processes and devices.
- **Asynchronous**: :meth:`Checkpoints.save` returns once the arrays are copied off the devices,
  and the files are written in the background while training goes on; :meth:`Checkpoints.close`
  waits for the last one.

The last :data:`MAX_TO_KEEP` steps are kept; older ones are deleted as new ones land.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any, TypeVar

import jax
import orbax.checkpoint as ocp

#: How many checkpoints (the latest steps) a run keeps.
MAX_TO_KEEP = 3

State = TypeVar("State")


def directory(run_dir: str | pathlib.Path) -> pathlib.Path:
  """Where the checkpoints of the run in ``run_dir`` live."""
  return pathlib.Path(run_dir).absolute() / "checkpoints"


class Checkpoints:
  """The checkpoints of one run: a train state and its JSON metadata per step.

  Example usage::

    with Checkpoints(run_dir) as checkpoints:
      if checkpoints.latest_step() is not None:
        state, meta = checkpoints.restore(state)   # ``state``: a template with the shardings
      ...
      checkpoints.save(state, meta)                # at the step ``state.step``

  Every process of a multi-process run makes the same calls in the same order.
  """

  def __init__(self, run_dir: str | pathlib.Path, max_to_keep: int = MAX_TO_KEEP):
    self.directory = directory(run_dir)
    self.manager = ocp.CheckpointManager(
        self.directory, item_names=("state", "meta"),
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))

  def __enter__(self) -> Checkpoints:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()

  def close(self) -> None:
    """Waits for a save in flight to be written, then releases the manager."""
    self.manager.close()

  def steps(self) -> list[int]:
    """The training steps that have a complete checkpoint, oldest first."""
    return sorted(self.manager.all_steps())

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, state: Any, meta: dict[str, Any]) -> None:
    """Saves ``state`` (a pytree of ``jax.Array``) and ``meta`` (JSON) at step ``state.step``.

    Returns once the arrays are copied off the devices and ``meta`` is copied: both may then be
    changed (``state`` donated). The files are written in the background.
    """
    meta = json.loads(json.dumps(meta))   # the background write must not see later changes
    self.manager.save(int(state.step), args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))

  def read_meta(self, step: int | None = None) -> dict[str, Any]:
    """The metadata of ``step`` (default: the latest), without reading the arrays."""
    step = self._step(step)
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

  def check_resumable(self, meta: dict[str, Any], keys=("config", "steps_per_epoch")) -> None:
    """Refuses (``ValueError``) to resume from the latest checkpoint when it was written under
    another training setup: ``meta`` and its metadata differ in one of ``keys``."""
    saved = self.read_meta()
    for key in keys:
      if saved[key] != meta[key]:
        raise ValueError(f"{self.directory} was written with {key}={saved[key]}, this run has "
                         f"{meta[key]}; use another --workdir or drop --resume.")

  def restore(self, template: State, step: int | None = None) -> tuple[State, dict[str, Any]]:
    """The state and metadata of ``step`` (default: the latest).

    Args:
      template: a state of the same structure, shapes and dtypes (a freshly initialised one, or
        ``jax.eval_shape`` of its initialisation with shardings added); the restored arrays take
        its shardings, whatever the devices and processes that wrote them.
      step: the training step to restore.
    """
    step = self._step(step)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    return restored.state, restored.meta

  def clear(self) -> None:
    """Deletes every checkpoint of the run (a fresh run in a directory that has some)."""
    for step in self.steps():
      self.manager.delete(step)

  def _step(self, step: int | None) -> int:
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"No checkpoint in {self.directory}.")
    return step
