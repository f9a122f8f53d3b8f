"""A training job across processes and signals: starting `jax.distributed` with the checks only the whole job
can answer, the stop request every process agrees on (`StopRequest` records SIGINT / SIGTERM, `StopVote`
makes all processes stop at the same step), and the end of the job when a process is lost (`JobLost`). One
process needs none of it."""

from __future__ import annotations

import atexit
import logging
import os
import secrets
import selectors
import signal
import socket
import threading
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from bart_jax.errors import Terminated
from bart_jax.train import partitioning
from bart_jax.train.config import RunConfig

logger = logging.getLogger(__name__)


def initialize_distributed(cfg: RunConfig) -> None:
    """jax.distributed.initialize once per process when `distributed.enabled` (one process per host), then
    the checks only the whole job can answer: the number of processes and the mesh over all devices.
    Every failure is a UserError that says what to check, except a process that does not join within
    `distributed.initialization_timeout_s`, which ends the job (`JobLost`). Once the job has formed, a process
    that dies ends the others at once (`JobLost`, see `_watch_job`)."""
    from bart_jax.errors import UserError

    d = cfg.distributed
    if not d.enabled or jax.distributed.is_initialized():
        return
    if d.coordinator_address and d.process_id:  # JAX aborts the process on a timeout: say it in one line first
        _wait_for_coordinator(d.coordinator_address, d.initialization_timeout_s)
    # JAX's preemption notifier takes SIGTERM over when it starts; the stage's own handlers decide instead.
    sigterm = signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None
    # JAX aborts with its own fatal message when not every process joins in time; its deadline comes later, so
    # ours ends the process first with a line that says what to do.
    at = f" at the coordinator {d.coordinator_address}" if d.coordinator_address else ""
    ids = f" (distributed.process_id=0 to {d.num_processes - 1})" if d.num_processes else ""
    deadline = threading.Timer(d.initialization_timeout_s, _end_job, (JobLost(
        f"not every process joined the job{at} within distributed.initialization_timeout_s="
        f"{d.initialization_timeout_s} s; start the same command on every process{ids}, or raise "
        "distributed.initialization_timeout_s", restart=False),))
    deadline.daemon = True
    deadline.start()
    try:
        jax.distributed.initialize(coordinator_address=d.coordinator_address, num_processes=d.num_processes,
                                   process_id=d.process_id,
                                   initialization_timeout=d.initialization_timeout_s + _JAX_LATER_S,
                                   heartbeat_timeout_seconds=d.heartbeat_timeout_s)
    finally:
        deadline.cancel()
        if sigterm is not None:
            signal.signal(signal.SIGTERM, sigterm)
    from jax.experimental import multihost_utils

    several = jax.process_count() > 1
    listener = _listening_socket() if several and jax.process_index() == 0 else None
    # A connection to the watch counts only with this job's token: a stranger on the port ends nothing.
    token = secrets.randbelow(2**31 - 1) + 1 if listener else 0
    # One gather: each process's num_processes, and the port and token process 0 watches the others with.
    gathered = np.asarray(multihost_utils.process_allgather(np.asarray(
        [d.num_processes or jax.process_count(), listener.getsockname()[1] if listener else 0, token], np.int32)))
    claims = gathered[:, 0]
    if (claims != jax.process_count()).any():
        raise UserError(f"distributed.num_processes differs from the job the coordinator at {d.coordinator_address} "
                        f"formed ({jax.process_count()} processes; each process's setting: {claims.tolist()}); give "
                        "every process the same num_processes")
    if several:
        _watch_job(listener, d.coordinator_address or _coordinator_address(), int(gathered[0, 1]),
                   int(gathered[0, 2]))
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


# ------------------------------------------------------------------------------- a lost process
JOB_LOST_EXIT = 75  # EX_TEMPFAIL (sysexits.h): neither a user error (2) nor a bug; restarting the job resumes it
_JAX_LATER_S = 10  # JAX's own join deadline comes this much after ours (its abort prints no line of ours)
_RELAY_S = 2.0  # how long process 0 waits for the others to end on its word before it ends itself


class JobLost(RuntimeError):
    """Another process of the job is gone (killed, crashed) or never joined, so this one cannot go on: every
    collective would wait for it until JAX aborts the process. Not raised: `_end_job` reports it (the
    command line's `report_job_lost_with`, else the log) and ends the process with `JOB_LOST_EXIT`, from
    whichever thread noticed, since the main thread is then blocked in a collective that never returns.
    `restart`: whether restarting the job resumes it (a checkpoint may be worth naming)."""

    def __init__(self, message: str, restart: bool = True):
        super().__init__(message)
        self.restart = restart


_report: Callable[[JobLost], None] | None = None
_ending = threading.Lock()  # held by the one thread that reports a JobLost and ends the process
_ended = threading.Event()  # a JobLost is being reported: the process ends in a moment
_bye = threading.Event()  # this process ends in order: a closed connection from now on is no loss


def report_job_lost_with(report: Callable[[JobLost], None] | None) -> None:
    """How a JobLost reaches the user (the command line prints one line); None: the log."""
    global _report
    _report = report


def await_job_lost(timeout_s: float = 2 * _RELAY_S + 1) -> None:
    """For a failure in the main thread of a multi-process job (a collective with a dead process may fail
    before the watch says so): return after `timeout_s` if no process was lost; else never (the process ends)."""
    if jax.distributed.is_initialized() and _ended.wait(timeout_s):
        time.sleep(60)


def _end_job(e: JobLost) -> None:
    """Report `e` and end the process, from whichever thread calls first."""
    if not _ending.acquire(blocking=False):
        return
    _ended.set()
    try:
        if _report is not None:
            _report(e)
        else:
            logger.critical("%s", e)
    finally:
        os._exit(JOB_LOST_EXIT)  # no unwinding: JAX's exit handlers would wait for the lost process


def _coordinator_address() -> str | None:
    """The address JAX connected to when it detected the cluster itself; None if unknown."""
    try:
        from jax._src import distributed as jax_distributed  # private: only where the config gave no address

        return jax_distributed.global_state.coordinator_address
    except (ImportError, AttributeError):
        return None


def _lost(process: int | None) -> JobLost:
    who = "a process" if process is None else "process 0 (the coordinator)" if process == 0 else f"process {process}"
    return JobLost(f"{who} of this {jax.process_count()}-process job stopped (killed or crashed: its connection "
                   "closed), and the others cannot go on without it; restart the job: the same command on every "
                   "process resumes from the last checkpoint")


def _listening_socket() -> socket.socket:
    """Process 0's end of the watch: a port on every interface (IPv4 and IPv6 where it can) for the others."""
    dual = socket.has_dualstack_ipv6()
    return socket.create_server(("", 0), family=socket.AF_INET6 if dual else socket.AF_INET, dualstack_ipv6=dual)


def _watch_job(listener: socket.socket | None, address: str | None, port: int, token: int) -> None:
    """Watch the other processes of the job: each connects to `port` on process 0's host (that of the
    coordinator `address`) and says who it is, with the job's `token`. A process that dies, however (SIGKILL,
    a crash), has its connections closed by the kernel, so the other end learns at once, where JAX's heartbeat
    takes `distributed.heartbeat_timeout_s` and then aborts with a stack trace. A process that ends in order
    says 'bye' first (at exit). Process 0 tells the others which process was lost. Without a connection (an
    unreachable port) the job runs as before, on JAX's heartbeat alone."""
    atexit.register(_farewell)
    if listener is not None:
        threading.Thread(target=_serve, args=(listener, token), name="bart_jax-watch", daemon=True).start()
        return
    host = address.rpartition(":")[0].strip("[]") if address else None
    try:
        if not host:
            raise OSError("the coordinator's address is unknown")
        sock = socket.create_connection((host, port), timeout=30)
        sock.settimeout(None)
        sock.sendall(f"{token} {jax.process_index()}\n".encode())
    except OSError as e:
        logger.warning("cannot watch process 0 at %s:%s (%s): a lost process ends the job only after "
                       "distributed.heartbeat_timeout_s, with JAX's own message", host, port, e)
        return
    _peers.append(sock)
    threading.Thread(target=_listen, args=(sock,), name="bart_jax-watch", daemon=True).start()


_peers: list[socket.socket] = []  # this process's watch connections (process 0: one per other process)


def _listen(sock: socket.socket) -> None:
    """A process other than 0: end the job when process 0 names a lost process, or is lost itself."""
    buffer = b""
    while True:
        try:
            data = sock.recv(256)
        except OSError:
            data = b""
        if _bye.is_set():
            return
        buffer += data
        for line in buffer.split(b"\n")[:-1]:
            if line == b"bye":
                return
            if line.startswith(b"lost "):
                _end_job(_lost(int(line[5:]) if line[5:].isdigit() else None))
        buffer = buffer.rpartition(b"\n")[2]
        if not data:
            _end_job(_lost(0))


def _serve(listener: socket.socket, token: int) -> None:
    """Process 0: accept the others' connections (each says '<token> <process id>' first); when one closes
    without 'bye', tell the rest and end. A connection without the token is never a process of the job."""
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    who: dict[socket.socket, int | None] = {}
    buffers: dict[socket.socket, bytes] = {}
    while True:
        for key, _ in selector.select():
            if key.fileobj is listener:
                try:
                    conn, _ = listener.accept()
                except OSError:
                    continue
                selector.register(conn, selectors.EVENT_READ)
                who[conn], buffers[conn] = None, b""
                _peers.append(conn)
                continue
            conn = key.fileobj
            try:
                data = conn.recv(256)
            except OSError:
                data = b""
            buffers[conn] += data
            lines = buffers[conn].split(b"\n")
            buffers[conn] = lines.pop()
            if b"bye" in lines or (not data and (who[conn] is None or _bye.is_set())):
                selector.unregister(conn)  # ended in order, or never said who it was
                del who[conn]
                continue
            claim = lines[0].split() if lines and who[conn] is None else []
            if len(claim) == 2 and claim[0] == str(token).encode() and claim[1].isdigit():
                who[conn] = int(claim[1])
            if not data:
                selector.unregister(conn)
                _relay(who[conn], [c for c in who if c is not conn and who[c] is not None])
                _end_job(_lost(who[conn]))


def _relay(process: int | None, others: list[socket.socket]) -> None:
    """Tell the other processes which one was lost, and give them a moment to end first: once process 0 (the
    coordinator) is gone, JAX aborts them with its own message."""
    for conn in others:
        try:
            conn.settimeout(_RELAY_S)
            conn.sendall(f"lost {'' if process is None else process}\n".encode())
        except OSError:
            pass
    deadline = time.monotonic() + _RELAY_S
    for conn in others:
        try:
            conn.settimeout(max(0.01, deadline - time.monotonic()))
            while conn.recv(256):
                pass
        except OSError:
            pass


def _farewell() -> None:
    """At an orderly exit: 'bye' on every watch connection, so the other end takes the close for no loss."""
    _bye.set()
    for sock in list(_peers):
        try:
            sock.sendall(b"bye\n")
        except OSError:
            pass


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
