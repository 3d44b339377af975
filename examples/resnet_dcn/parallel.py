"""Data-parallel training over every device of every process (JAX's multi-controller runtime).

One process per host (or several on one machine) runs the same program; ``jax.distributed``
connects them, and ``jax.devices()`` then lists the devices of all processes. The examples build
one ``"batch"`` mesh axis over all of them: every process draws the same global batch order, keeps
its own slice of each global batch, and assembles the global batch-sharded array with
``jax.make_array_from_process_local_data``; the train state is replicated, and XLA reduces the
gradients across devices and processes.

The process flags (``--coordinator-address``, ``--num-processes``, ``--process-id``) default to the
environment variables ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``.
Without a coordinator address the program runs as one process over its local devices. On CPU
the processes exchange collectives through gloo (``jax_cpu_collectives_implementation``).
"""

from __future__ import annotations

import argparse
import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

#: How long a process waits for the others to join (seconds).
INITIALIZATION_TIMEOUT_S = 300


def add_process_flags(parser: argparse.ArgumentParser) -> None:
  """Adds ``--coordinator-address``, ``--num-processes`` and ``--process-id`` to ``parser``."""
  env = os.environ.get
  group = parser.add_argument_group("several processes (jax.distributed)")
  group.add_argument("--coordinator-address", default=env("JAX_COORDINATOR_ADDRESS"),
                     help="host:port of process 0; default $JAX_COORDINATOR_ADDRESS; unset: "
                          "one process")
  group.add_argument("--num-processes", type=int,
                     default=int(env("JAX_NUM_PROCESSES", "1")),
                     help="default $JAX_NUM_PROCESSES or 1")
  group.add_argument("--process-id", type=int, default=int(env("JAX_PROCESS_ID", "0")),
                     help="this process, 0 to num-processes - 1; default $JAX_PROCESS_ID or 0")


def initialize(coordinator_address: str | None, num_processes: int, process_id: int) -> None:
  """Joins the other processes (``jax.distributed.initialize``) when a coordinator is given.

  Must run before anything touches a device. Does nothing for a single process without a
  coordinator, or when the runtime is already initialised.
  """
  if coordinator_address is None:
    if num_processes != 1:
      raise ValueError(f"--num-processes {num_processes} needs --coordinator-address (or "
                       "JAX_COORDINATOR_ADDRESS).")
    return
  if jax.distributed.is_initialized():
    return
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address, num_processes, process_id,
                             initialization_timeout=INITIALIZATION_TIMEOUT_S)


def batch_mesh() -> Mesh:
  """One ``"batch"`` axis over ``jax.devices()``: the devices of every process."""
  return Mesh(np.asarray(jax.devices()), ("batch",))


def process_slice(global_size: int) -> slice:
  """This process's rows of a global batch of ``global_size`` (split evenly over processes)."""
  count = jax.process_count()
  if global_size % count:
    raise ValueError(f"A global batch of {global_size} does not split over {count} processes.")
  local = global_size // count
  return slice(jax.process_index() * local, (jax.process_index() + 1) * local)


def global_batch(sharding: NamedSharding, rows: np.ndarray) -> jax.Array:
  """The global batch-sharded array of a global batch ``rows``, of which this process feeds its
  own slice (every process holds the same ``rows``; only the local slice is read)."""
  local = rows[process_slice(len(rows))]
  return jax.make_array_from_process_local_data(sharding, local, rows.shape)


def is_chief() -> bool:
  """Whether this process writes the results and figures: process 0. (Every process takes part
  in writing the checkpoints: see ``checkpoints``.)"""
  return jax.process_index() == 0


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec("batch"))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())
