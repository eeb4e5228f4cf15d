"""Multi-process runs: joining ``jax.distributed`` and checking that every process agrees.

One process drives the devices of one host (a TPU VM worker, a GPU node, or a CPU process with
``--xla_force_host_platform_device_count``). The ``dist.*`` config says how they find each other:

* ``dist.num_processes=1`` (default): a single process; nothing to join.
* ``dist.num_processes=N``, ``dist.process_id=i``, ``dist.coordinator_address=HOST:PORT``: explicit,
  works anywhere. HOST is the address of process 0's host, PORT any free port there; process 0
  serves the coordinator. Before handing over to JAX, process 0 waits for the others on that port
  and every other process waits to reach it, so a missing or unreachable process ends every
  process with one clear line (exit 2) instead of a hang or JAX's abort.
* ``dist.num_processes=0``: JAX's cluster auto-detection finds all three: Cloud TPU VMs and pod
  slices (TPU metadata), SLURM (``srun``'s ``SLURM_*`` variables) and Open MPI (``mpirun``).
* ``dist.num_processes=N`` with ``dist.coordinator_address=""``: the address comes from
  ``$JAX_COORDINATOR_ADDRESS`` or the detected cluster; N and the process id are as given.

Environment variables:

* ``GPTJAX_DIST_TIMEOUT`` — seconds a process waits for the others to show up (default 120);
  also passed to JAX as ``initialization_timeout``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.metadata
import os
import socket
import time
import uuid
from pathlib import Path

import numpy as np

from gptjax import storage
from gptjax.config import Config, DistConfig
from gptjax.errors import GptjaxError

TIMEOUT_ENV = "GPTJAX_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 120
_HELLO = b"gptjax-rendezvous"
_WIDTH = 256  # bytes per exchanged value; longer values are exchanged as their sha256


def timeout_s() -> int:
    """``$GPTJAX_DIST_TIMEOUT`` in seconds, else ``DEFAULT_TIMEOUT_S``."""
    text = os.environ.get(TIMEOUT_ENV, "")
    if not text:
        return DEFAULT_TIMEOUT_S
    if not text.isdigit() or int(text) < 1:
        raise GptjaxError(f"{TIMEOUT_ENV}={text!r} must be a whole number of seconds >= 1")
    return int(text)


def initialize(dist: DistConfig) -> None:
    """Joins the other processes through ``jax.distributed.initialize`` (no-op for one process).

    Must run before anything touches a jax device. Raises ``GptjaxError`` for a bad ``dist``
    config, an unreachable coordinator or processes that never arrive.
    """
    n, pid, address = dist.num_processes, dist.process_id, dist.coordinator_address
    if n == 1:
        return
    if n < 0 or (n > 1 and not 0 <= pid < n):
        raise GptjaxError(
            f"dist.num_processes={n}, dist.process_id={pid}: need num_processes >= 0 "
            f"(0 = auto-detect) and 0 <= process_id < num_processes"
        )
    import jax

    # gloo gives XLA:CPU its cross-process collectives (TPU/GPU bring their own). It is JAX
    # 0.10's default already; pinned so that an older or newer default of "none" cannot turn
    # multi-process CPU runs into compile errors. Only the CPU backend reads it.
    if not os.environ.get("JAX_CPU_COLLECTIVES_IMPLEMENTATION"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    timeout = timeout_s()
    address = address or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
    if n > 1 and address:
        host, port = _split_address(address)
        if pid == 0:
            _wait_for_peers(port, n, address, timeout)
        else:
            _reach_coordinator(host, port, pid, address, timeout)
    try:
        jax.distributed.initialize(
            coordinator_address=address or None,
            num_processes=n or None,
            process_id=pid if n else None,
            initialization_timeout=timeout,
        )
    except ValueError as e:  # JAX found no cluster to take the missing values from
        raise GptjaxError(
            f"jax.distributed could not start ({e}) with dist.num_processes={n} and "
            f"dist.coordinator_address={dist.coordinator_address!r}: auto-detection works on "
            f"Cloud TPU, SLURM and Open MPI only; elsewhere pass --dist.num_processes, "
            f"--dist.process_id and --dist.coordinator_address=HOST:PORT of process 0"
        ) from None


def _split_address(address: str) -> tuple[str, int]:
    """``"host:port"`` or ``"[v6::addr]:port"`` → ``(host, port)``."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise GptjaxError(
            f"dist.coordinator_address={address!r} must be HOST:PORT, e.g. 10.0.0.2:8476 "
            f"(the address of process 0's host and a free port there)"
        )
    return host.strip("[]"), int(port)


def _wait_for_peers(port: int, n: int, address: str, timeout: int) -> None:
    """Process 0: accepts one hello from each of processes 1..n-1 on ``port``, then lets them
    all go at once. The port is released before JAX binds it for the coordinator service."""
    try:
        if socket.has_dualstack_ipv6():
            server = socket.create_server(("", port), family=socket.AF_INET6, dualstack_ipv6=True)
        else:
            server = socket.create_server(("", port))
    except OSError as e:
        raise GptjaxError(
            f"process 0 cannot listen on port {port} of dist.coordinator_address={address!r} "
            f"({e.strerror}); pick a free port and give the same address to every process"
        ) from None
    deadline = time.monotonic() + timeout
    peers: dict[int, socket.socket] = {}
    try:
        with server:
            while len(peers) < n - 1 and (left := deadline - time.monotonic()) > 0:
                server.settimeout(left)
                try:
                    conn, _ = server.accept()
                except TimeoutError:
                    break
                peer = _read_hello(conn, n, deadline)
                if peer is None or peer in peers:
                    conn.close()  # a stranger, a port scanner, or a duplicate process id
                else:
                    peers[peer] = conn
        if len(peers) < n - 1:
            missing = sorted(set(range(1, n)) - set(peers))
            raise GptjaxError(
                f"process 0 waited {timeout}s at dist.coordinator_address={address!r} but "
                f"processes {missing} of {n} never arrived; start the same command on every "
                f"host with its own --dist.process_id (or raise {TIMEOUT_ENV})"
            )
        for conn in peers.values():
            conn.sendall(b"go\n")
        for conn in peers.values():  # let the peers close first: no TIME_WAIT on our port
            conn.settimeout(5)
            with contextlib.suppress(OSError):
                conn.recv(1)
    finally:
        for conn in peers.values():
            conn.close()


def _read_hello(conn: socket.socket, n: int, deadline: float) -> int | None:
    conn.settimeout(max(0.1, min(5.0, deadline - time.monotonic())))
    try:
        words = conn.recv(64).split()
    except OSError:
        return None
    if len(words) != 2 or words[0] != _HELLO or not words[1].isdigit():
        return None
    peer = int(words[1])
    return peer if 0 < peer < n else None


def _reach_coordinator(host: str, port: int, pid: int, address: str, timeout: int) -> None:
    """Processes 1..n-1: says hello to process 0 (retrying until it listens) and waits for go."""
    deadline = time.monotonic() + timeout
    error = "no attempt"
    while (left := deadline - time.monotonic()) > 0:
        try:
            with socket.create_connection((host, port), timeout=min(2.0, left)) as conn:
                conn.sendall(_HELLO + b" %d\n" % pid)
                conn.settimeout(max(0.1, deadline - time.monotonic()))
                if conn.recv(3) == b"go\n":
                    return
                error = "process 0 gave up or another service answered on that port"
        except OSError as e:
            error = e.strerror or type(e).__name__
        time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
    raise GptjaxError(
        f"process {pid} could not join the coordinator at dist.coordinator_address="
        f"{address!r} within {timeout}s (last error: {error}); start process 0 "
        f"(--dist.process_id=0) on that host with the same address, check the host, port and "
        f"firewall, or raise {TIMEOUT_ENV}"
    )


# ----------------------------------------------------------------------------- agreement


def versions() -> str:
    """The package versions that must match on every process, as one line."""
    names = ("gptjax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint")
    found = {name: _version(name) for name in names}
    return ", ".join(f"{name} {v}" for name, v in found.items())


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def config_fingerprint(config: Config) -> str:
    """A short hash of the config without ``dist`` (which differs by process)."""
    text = dataclasses.replace(config, dist=DistConfig()).to_json()
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def check_processes_agree(config: Config) -> None:
    """Raises the same ``GptjaxError`` on every process if any two disagree on package versions
    or on the config (all but ``dist``); the message names each differing config key. A no-op
    for one process.

    Uses cross-process all-gathers, so every process must call it (the training loop's
    ``preflight`` does).
    """
    import jax

    if jax.process_count() == 1:
        return
    try:
        every = allgather_strings([versions(), config_fingerprint(config)])  # [P][2]
        check_same_versions([v for v, _ in every])
        if len({c for _, c in every}) > 1:  # same versions, so the same config keys everywhere
            flat = _flat(config)
            fields = allgather_strings(list(flat.values()))  # [P][keys]
            check_same_config(list(flat), fields)
            raise _disagreement([("config", [c for _, c in every])])
    except jax.errors.JaxRuntimeError as e:  # e.g. gloo's 30 s rendezvous timeout on CPU
        raise GptjaxError(
            f"process {jax.process_index()} waited in vain for the other processes at the "
            f"preflight check ({str(e).splitlines()[0][:200]}); one of them probably stopped "
            f"earlier: see its log"
        ) from None


def check_same_versions(seen: list[str]) -> None:
    """Raises naming every process's versions unless ``seen`` (``versions()`` of process 0,
    1, ...) are all equal."""
    if len(set(seen)) > 1:
        raise _disagreement([("package versions", seen)])


def check_same_config(keys: list[str], seen: list[list[str]]) -> None:
    """Raises naming each differing key unless ``seen[p][i]`` (process p's value of
    ``keys[i]``) agree for every key."""
    columns = [(f"config {k}", [values[i] for values in seen]) for i, k in enumerate(keys)]
    differing = [(k, values) for k, values in columns if len(set(values)) > 1]
    if differing:
        raise _disagreement(differing)


def _disagreement(items: list[tuple[str, list[str]]]) -> GptjaxError:
    """One line for ``[(what, [value of process 0, value of process 1, ...]), ...]``."""
    parts = [
        f"{what} ({'; '.join(f'process {p}: {v}' for p, v in enumerate(seen))})"
        for what, seen in items
    ]
    return GptjaxError(
        f"the {len(items[0][1])} processes disagree on {' and on '.join(parts)}; install the "
        f"same gptjax (same commit) and libraries on every host and launch the same command "
        f"there"
    )


def _flat(config: Config) -> dict[str, str]:
    """``{"section.key": repr(value)}`` for every field but ``dist.*``."""
    return {
        f"{section}.{key}": repr(value)
        for section, fields in config.to_dict().items()
        if section != "dist"
        for key, value in fields.items()
    }


def check_shared_workdir(workdir: str | Path, *, wait_s: float = 10.0) -> None:
    """Raises the same ``GptjaxError`` on every process unless all of them see ``workdir`` as one
    folder: each process writes its own shards of every Orbax checkpoint there, and without a
    shared folder the checkpoint is never finalised (the save waits forever). A no-op for one
    process. Process 0 writes a marker file; the others look for it for up to ``wait_s``
    seconds (network filesystems may show new files late)."""
    import jax

    if jax.process_count() == 1:
        return
    name = allgather_strings([f".gptjax-shared-{uuid.uuid4().hex}"])[0][0]  # process 0's
    marker = storage.path(workdir) / name
    if jax.process_index() == 0:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text("written by process 0 to check that every process sees this folder\n")
    allgather_strings(["written"])  # a barrier: the marker exists before anyone looks
    deadline = time.monotonic() + wait_s
    while not (seen := marker.exists()) and time.monotonic() < deadline:
        time.sleep(0.5)
    seen_by = [values[0] == "yes" for values in allgather_strings(["yes" if seen else "no"])]
    if jax.process_index() == 0:
        marker.unlink()
    if not all(seen_by):
        blind = [p for p, ok in enumerate(seen_by) if not ok]
        raise GptjaxError(
            f"--workdir {workdir} is not shared: processes {blind} do not see the file process "
            f"0 wrote there; with several hosts the workdir must be one folder that every "
            f"process sees at the same path (a gs://BUCKET/PATH URI, NFS, Filestore)"
        )


def allgather_strings(values: list[str]) -> list[list[str]]:
    """Every process's ``values`` (same length everywhere), indexed ``[process][i]``."""
    from jax.experimental import multihost_utils

    rows = np.zeros((len(values), _WIDTH), np.uint8)  # [V, W]
    for i, text in enumerate(values):
        data = text.encode()
        if len(data) > _WIDTH:
            data = hashlib.sha256(data).hexdigest().encode()
        rows[i, : len(data)] = np.frombuffer(data, np.uint8)
    gathered = np.asarray(multihost_utils.process_allgather(rows))  # [P, V, W]
    return [[bytes(row).rstrip(b"\0").decode() for row in proc] for proc in gathered]
