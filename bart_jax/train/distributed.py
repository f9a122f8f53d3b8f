"""A training job across processes and signals: starting `jax.distributed` with the checks only the whole job
can answer, and the stop request every process agrees on (`StopRequest` records SIGINT / SIGTERM, `StopVote`
makes all processes stop at the same step). One process needs neither collective."""

from __future__ import annotations

import signal
import socket
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

from bart_jax.errors import Terminated
from bart_jax.train import partitioning
from bart_jax.train.config import RunConfig


def initialize_distributed(cfg: RunConfig) -> None:
    """jax.distributed.initialize once per process when `distributed.enabled` (one process per host), then
    the checks only the whole job can answer: the number of processes and the mesh over all devices.
    Every failure is a UserError that says what to check."""
    from bart_jax.errors import UserError

    d = cfg.distributed
    if not d.enabled or jax.distributed.is_initialized():
        return
    if d.coordinator_address and d.process_id:  # JAX aborts the process on a timeout: say it in one line first
        _wait_for_coordinator(d.coordinator_address, d.initialization_timeout_s)
    # JAX's preemption notifier takes SIGTERM over when it starts; the stage's own handlers decide instead.
    sigterm = signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None
    try:
        jax.distributed.initialize(coordinator_address=d.coordinator_address, num_processes=d.num_processes,
                                   process_id=d.process_id, initialization_timeout=d.initialization_timeout_s,
                                   heartbeat_timeout_seconds=d.heartbeat_timeout_s)
    finally:
        if sigterm is not None:
            signal.signal(signal.SIGTERM, sigterm)
    from jax.experimental import multihost_utils

    claims = np.asarray(multihost_utils.process_allgather(np.int32(d.num_processes or jax.process_count())))
    if (claims != jax.process_count()).any():
        raise UserError(f"distributed.num_processes differs from the job the coordinator at {d.coordinator_address} "
                        f"formed ({jax.process_count()} processes; each process's setting: {claims.tolist()}); give "
                        "every process the same num_processes")
    try:
        partitioning.mesh_shape(cfg.mesh, jax.device_count())
    except ValueError as e:
        raise UserError(f"{e} (mesh.data/fsdp/tensor; {jax.process_count()} processes x "
                        f"{jax.local_device_count()} devices)") from None


def _wait_for_coordinator(address: str, timeout_s: float) -> None:
    """Return once a TCP connection to the coordinator at `address` ('host:port') succeeds; UserError after
    `timeout_s` seconds of trying."""
    from bart_jax.errors import UserError

    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=max(1.0, min(5.0, timeout_s))):
                return
        except (OSError, ValueError) as e:
            if time.monotonic() >= deadline:
                raise UserError(f"cannot reach the coordinator at {address} (distributed.coordinator_address) "
                                f"within distributed.initialization_timeout_s={timeout_s} s ({e}); start process 0 "
                                "there, or correct the address") from None
            time.sleep(0.5)


class StopRequest:
    """SIGINT / SIGTERM handlers that only record the signal, so a stage stops where it can save (see
    `train_loop`); a second signal interrupts at once. Installed only from the main thread (elsewhere
    nothing is recorded). A context manager: the previous handlers come back on exit."""

    def __init__(self):
        self.signum = None
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum, frame):
        if self.signum is not None:  # asked twice: stop now, without the checkpoint
            raise KeyboardInterrupt() if signum == signal.SIGINT else Terminated()
        self.signum = signum

    def restore(self):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def __enter__(self) -> "StopRequest":
        return self

    def __exit__(self, *exc) -> None:
        self.restore()


class StopVote:
    """The signal (or None) that every process of the job agrees to stop on: the largest signal number any
    process recorded in its `StopRequest`.

    One process needs no vote. With several, each step boundary queues this process's signal into a max
    over all devices (a tiny collective, dispatched asynchronously like the train step), and reads the vote
    queued at the previous boundary, which ran before the previous step and so is ready without waiting for
    the step in flight: every process reads the same vote at the same boundary, so all stop at the same step.
    """

    def __init__(self, stop: StopRequest):
        self.stop = stop
        self._queued = None
        if jax.process_count() > 1:
            from jax.sharding import Mesh, NamedSharding, PartitionSpec

            mesh = Mesh(np.asarray(jax.devices()), ("all",))
            self._sharding = NamedSharding(mesh, PartitionSpec("all"))
            self._max = jax.jit(jnp.max, out_shardings=NamedSharding(mesh, PartitionSpec()))

    def at_boundary(self) -> int | None:
        """The vote of the previous boundary (None at the first); queues this one's."""
        if jax.process_count() == 1:
            return self.stop.signum
        previous, self._queued = self._queued, self._queue()
        return None if previous is None else self._read(previous)

    def now(self) -> int | None:
        """A vote taken now (waits for every process to reach it)."""
        if jax.process_count() == 1:
            return self.stop.signum
        self._queued = None
        return self._read(self._queue())

    def _queue(self):
        local = np.full((jax.local_device_count(),), self.stop.signum or 0, np.int32)
        return self._max(jax.make_array_from_process_local_data(self._sharding, local))

    @staticmethod
    def _read(vote) -> int | None:
        return int(np.asarray(vote.addressable_data(0))) or None


def signum_of(e: KeyboardInterrupt) -> int:
    return signal.SIGTERM if isinstance(e, Terminated) else signal.SIGINT
