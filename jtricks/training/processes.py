"""Joining a multi-process run, and giving up cleanly when a process is missing.

`jax.distributed.initialize` joins the processes through a coordination service run by
process 0. Left to itself it fails loudly or late: a process whose coordinator nobody
runs waits 5 minutes and aborts with a C++ stack trace, two processes with one id abort
with a trace, a dead peer ends the survivors after a 100 s heartbeat timeout with a trace,
and JAX's exit handler then waits on a shutdown barrier that can never complete. What is
new here:

* `initialize` bounds the join (`within`, ``--distributed-timeout``) and gives JAX's own
  heartbeat the same bound, then checks that every process was started with the same
  ``--num-processes`` (`check_joined`);
* `watch_peers` ends the run with one line when a process has been silent for that
  bound (JAX's own heartbeat, set later as a backstop, aborts with a stack trace);
* `lost_process` tells a collective that failed because a peer went away (gloo: the
  connection was closed or reset) from other errors, and `leave` ends this process with
  one line at once, skipping the shutdown barrier (the last committed checkpoint is
  intact; the next ``--resume`` removes a cut write);
* `all_agree` lets the processes decide together, e.g. which checkpoint to restore.

References: JAX, "Using JAX in multi-host and multi-process environments"; the
coordination service's heartbeat (``heartbeat_timeout_seconds`` of
`jax.distributed.initialize`).
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import os
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np

from jtricks.errors import ConfigError, check_int, check_range

INIT_TIMEOUT = 60.0
"""Seconds a process waits for the others to join a multi-process run, and for a silent
peer before the run stops (``--distributed-timeout``)."""


@contextlib.contextmanager
def within(seconds: float, why: str) -> Iterator[None]:
    """End the process with ``jtricks: error: <why>`` and status 2 if the block has not
    returned after ``seconds``. For `jax.distributed.initialize`: its own
    ``initialization_timeout`` ends in a fatal abort with a C++ stack trace (and a
    process 0 alone waits far longer), so jtricks bounds the wait itself, gives JAX a
    later deadline, and ends first."""
    done = threading.Event()

    def watch() -> None:
        if not done.wait(seconds):
            os.write(2, f"jtricks: error: {why}\n".encode())
            os._exit(2)

    threading.Thread(target=watch, name="jtricks-join-timeout", daemon=True).start()
    try:
        yield
    finally:
        done.set()


def initialize(
    coordinator: str, num_processes: int, process_id: int, timeout: float = INIT_TIMEOUT
) -> None:
    """`jax.distributed.initialize` for a multi-process run (one call per process, before
    any other JAX work), given up after ``timeout`` seconds with one line naming the
    coordinator and what to check (`within`); JAX's heartbeat gets the same bound, so a
    process that disappears later is noticed within it. On CPU, cross-process
    collectives use gloo.

    Raises:
      ConfigError: a malformed ``HOST:PORT``, ``num_processes < 1``, ``process_id``
        outside ``[0, num_processes)``, ``timeout <= 0``, or (`check_joined`) processes
        started with different ``--num-processes``.
    """
    check_join(coordinator, num_processes, process_id, timeout)
    why = (
        f"process {process_id} of {num_processes} did not join the run within {timeout:g} s "
        f"(--distributed-timeout): check that process 0 runs with --coordinator {coordinator}, "
        "that this host reaches that address and port, and that every process has the same "
        f"--num-processes and its own --process-id in 0..{num_processes - 1}"
    )
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    with within(timeout, why):
        jax.distributed.initialize(
            coordinator_address=coordinator,
            num_processes=num_processes,
            process_id=process_id,
            initialization_timeout=int(timeout) + 60,
            heartbeat_timeout_seconds=max(int(timeout), 1) + 30,
        )
        check_joined(num_processes, process_id)
    watch_peers(timeout)


def check_join(coordinator: str, num_processes: int, process_id: int, timeout: float) -> None:
    """`initialize`'s arguments, checked before anything is started (`ConfigError`)."""
    host, _, port = str(coordinator).rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(
            f"coordinator must be HOST:PORT (e.g. localhost:12355); got {coordinator!r}",
            param="coordinator",
        )
    check_int("num_processes", num_processes, low=1)
    check_int("process_id", process_id, low=0, high=num_processes - 1)
    check_range("distributed_timeout", timeout, low=0.0, low_inclusive=False)


def check_joined(num_processes: int, process_id: int) -> None:
    """Refuse, in every process at once, a run whose processes were started with different
    ``--num-processes`` (the coordination service counts the processes process 0 was
    started with, so a process that expects more than process 0 waits for one that never
    comes and `within`'s line names it; one that expects fewer joins, and is caught here)."""
    from jax.experimental import multihost_utils

    counts = np.asarray(multihost_utils.process_allgather(np.int32(num_processes))).ravel()
    if len(set(counts.tolist())) > 1 or jax.process_count() != num_processes:
        given = ", ".join(f"process {i}: {n}" for i, n in enumerate(counts.tolist()))
        raise ConfigError(
            f"the processes of this run were started with different --num-processes "
            f"({given}; process 0 started the run for {jax.process_count()}): give every "
            "process the same --num-processes",
            param="num_processes",
        )


def all_agree(ok: bool) -> bool:
    """Whether ``ok`` holds in every process (one small all-gather; with one process,
    ``ok`` itself). Every process must call it at the same point."""
    if jax.process_count() == 1:
        return bool(ok)
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.int32(bool(ok)))))


BEAT = "jtricks/alive/"
"""The coordination service's key under which each process counts its beats."""


def watch_peers(timeout: float, every: float = 1.0) -> threading.Thread | None:
    """Start a daemon thread that ends this process with one line (`leave`) once another
    process of the run has not beaten for ``timeout`` seconds, or the coordinator (process
    0) cannot be reached. Each process counts its beats in the coordination service's
    key-value store every ``every`` seconds and reads the others'. A slow process still
    beats (compiling or writing a checkpoint releases the interpreter), so only a process
    that is gone stops the run.

    New here: JAX's own heartbeat (``heartbeat_timeout_seconds``, set above this bound as
    a backstop) ends every process with a C++ stack trace, and its reporting hook cannot
    be used from Python (jaxlib 0.10 fails converting its status: ``std::bad_cast``). A
    survivor blocked in a collective learns of a dead peer from gloo at once (`lost_process`);
    this thread covers the waits gloo does not see (a checkpoint's barrier). ``None`` with
    one process or where JAX's client is not reachable."""
    from jax._src import distributed as jax_distributed  # JAX's client, as multihost_utils

    client = getattr(jax_distributed.global_state, "client", None)
    if jax.process_count() == 1 or client is None:
        return None
    ending, lock = threading.Event(), threading.Lock()
    atexit.register(_ending, client, ending, lock)  # before JAX's exit handler (LIFO)
    args = (client, timeout, every, ending, lock)
    thread = threading.Thread(target=_beat, args=args, name="jtricks-peers", daemon=True)
    thread.start()
    return thread


DONE = "done"


def _ending(client: Any, ending: threading.Event, lock: threading.Lock) -> None:
    """At exit: stop beating and tell the others this process is done, not gone (it waits
    in JAX's shutdown barrier, which bounds the rest)."""
    with lock, contextlib.suppress(Exception):
        ending.set()
        client.key_value_set(f"{BEAT}{jax.process_index()}", DONE, allow_overwrite=True)


def _beat(
    client: Any, timeout: float, every: float, ending: threading.Event, lock: threading.Lock
) -> None:
    me, seen, beat = jax.process_index(), {}, 0
    stop = "the last checkpoint is intact: start every process again with --resume RUN_DIR"
    while not ending.wait(every):
        beat += 1
        try:
            with lock:  # never after `_ending`'s DONE
                if ending.is_set():
                    return
                client.key_value_set(f"{BEAT}{me}", str(beat), allow_overwrite=True)
            values = {k.rsplit("/", 1)[-1]: v for k, v in client.key_value_dir_get(BEAT)}
        except Exception as e:  # the coordination service (process 0) is gone
            if ending.is_set():  # this process is ending: the service may go first
                return
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            leave(f"jtricks: error: lost the coordinator, process 0 ({first}); {stop}")
        now = time.monotonic()
        for peer in range(jax.process_count()):
            value = values.get(str(peer))
            if peer == me or value == DONE or seen.get(peer, (object(),))[0] != value:
                seen[peer] = (value, now)
            elif now - seen[peer][1] > timeout:
                leave(
                    f"jtricks: error: process {peer} of {jax.process_count()} stopped "
                    f"answering for {timeout:g} s (--distributed-timeout); {stop}"
                )


LOST = ("Connection closed by peer", "Connection reset by peer", "heartbeat timeout")
"""What a collective's error says when a peer process went away (gloo's TCP transport,
the coordination service's heartbeat)."""


def lost_process(error: BaseException) -> bool:
    """Whether ``error`` is a collective failing because another process of this
    multi-process run went away."""
    return jax.process_count() > 1 and any(s in str(error) for s in LOST)


def leave(line: str, status: int = 1) -> None:
    """Print ``line`` and end this process now, with ``status``: JAX's exit handler would
    wait on a shutdown barrier the lost process never reaches, then print pages."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.write(2, f"{line}\n".encode())
    os._exit(status)


CLUSTERS = {
    "SLURM": (
        "SLURM_JOB_ID",
        "SLURM_STEP_NODELIST",
        "SLURM_NTASKS",
        "SLURM_PROCID",
        "SLURM_LOCALID",
    ),
    "Open MPI": ("OMPI_MCA_orte_hnp_uri", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK"),
    "Kubernetes": ("KUBERNETES_SERVICE_HOST", "JOB_COMPLETION_INDEX"),
}
"""The launchers whose environment `jax.distributed.initialize` reads by itself, and the
variables that show one started this process (the ones JAX's own detection reads)."""

SIZES = {"SLURM": "SLURM_NTASKS", "Open MPI": "OMPI_COMM_WORLD_SIZE"}
RANKS = {"SLURM": "SLURM_PROCID", "Open MPI": "OMPI_COMM_WORLD_RANK"}


def detect_cluster(environ: Any = None) -> tuple[str, int | None, int | None] | None:
    """``(launcher, processes, this process's rank)`` when a multi-process launcher
    started this process (SLURM with ``SLURM_NTASKS > 1``, Open MPI's ``mpirun`` with
    ``OMPI_COMM_WORLD_SIZE > 1``, an indexed Kubernetes Job with the ``kubernetes``
    package installed, whose size JAX asks the Kubernetes API for: ``None``), else
    ``None``. ``JTRICKS_AUTO_DISTRIBUTED=0`` turns the detection off."""
    env = os.environ if environ is None else environ
    if env.get("JTRICKS_AUTO_DISTRIBUTED", "1") == "0":
        return None
    for name, names in CLUSTERS.items():
        if not all(v in env for v in names):
            continue
        if name not in SIZES:  # JAX asks the Kubernetes API, through its client package
            if importlib.util.find_spec("kubernetes") is not None:
                return name, None, None
            continue
        size, rank = int(env[SIZES[name]]), int(env[RANKS[name]])
        if size > 1:
            return name, size, rank
    return None


def initialize_from_cluster(environ: Any = None) -> tuple[str, int | None, int | None] | None:
    """`jax.distributed.initialize()` with no arguments (JAX reads the coordinator, the
    process count and this process's rank from the launcher) when `detect_cluster` finds
    one; returns what it found. CPU collectives use gloo."""
    found = detect_cluster(environ)
    if found is not None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(heartbeat_timeout_seconds=int(INIT_TIMEOUT) + 30)
        watch_peers(INIT_TIMEOUT)
    return found
