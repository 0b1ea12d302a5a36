"""Make or connect the Dask cluster whose workers are daskdp's ranks.

Each rank is one worker process carrying the Dask resource ``GPU`` (its tensor-parallel size).
Devices are pinned in the worker's launch environment, before CUDA or OpenMP start: rank ``i``
sees only its own GPUs (``CUDA_VISIBLE_DEVICES``) or, on a host without GPUs, its own cores
(``VLLM_CPU_OMP_THREADS_BIND``).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import glob
import logging
import multiprocessing
import multiprocessing.forkserver
import os
import re
import signal
import socket
import ssl
import struct
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dask.config
from dask.utils import parse_timedelta
from distributed import Client, LocalCluster, Nanny, SpecCluster
from distributed.comm import CommClosedError
from distributed.comm.addressing import parse_address, parse_host_port
from distributed.proctitle import enable_proctitle_on_children
from distributed.security import Security

from daskdp.errors import UserError

GPU = "GPU"
# Dask's periodic work that runs beside the engines, on cores they keep busy, and slows them:
# the worker's statistical profiler (a stack sample every 10 ms), the system monitor's
# host-wide disk counters, and the timers that wake every event loop (the scheduler's and
# nannies' in the client process, each worker's beside its engine) dozens of times a second:
# the loop health check every 20 ms, the memory monitors every 100 ms, the system monitor every
# 500 ms. Slower timers took the client process from 5% of a core to 1% during generation
# (2 ranks on 2 cores). The dashboard keeps its CPU, memory and network plots, updated every 2 s.
RANK_DASK_CONFIG = {
    "distributed.worker.profile.enabled": False,
    "distributed.admin.system-monitor.disk": False,
    "distributed.admin.system-monitor.interval": "2s",
    "distributed.admin.tick.interval": "500ms",
    "distributed.worker.memory.monitor-interval": "500ms",
}


def visible_gpus() -> list[str]:
    """The GPUs this host offers: ``CUDA_VISIBLE_DEVICES`` when set, else the NVIDIA devices."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [device for device in visible.split(",") if device.strip()]
    devices = glob.glob("/dev/nvidia[0-9]*")
    return sorted((path.removeprefix("/dev/nvidia") for path in devices), key=int)


# vLLM's INFO and WARNING lines and its load bars from every rank drown the progress display.
QUIET = {
    "VLLM_LOGGING_LEVEL": "ERROR",
    "TORCH_CPP_LOG_LEVEL": "ERROR",
}
# One compute thread per rank on a host without GPUs: with more, OpenMP's threads and the
# engine's Python thread fight over the rank's cores (2 threads on 2 cores ran 2x slower here).
CPU_RANK_THREADS = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}


def _quiet() -> dict[str, str]:
    return {key: os.environ.get(key, value) for key, value in QUIET.items()}


def rank_environments(ranks: int, tensor_parallel_size: int) -> list[dict[str, str]]:
    """Launch environment of each rank: its own GPUs, or on a CPU host its own cores."""
    common = _quiet()
    gpus = visible_gpus()
    if gpus:
        needed = ranks * tensor_parallel_size
        if needed > len(gpus):
            raise UserError(
                f"{ranks} workers x tensor_parallel_size {tensor_parallel_size} need {needed} GPUs "
                f"but this host has {len(gpus)}; pass --workers {len(gpus) // tensor_parallel_size}"
            )
        return [
            {
                **common,
                "CUDA_VISIBLE_DEVICES": ",".join(
                    gpus[i * tensor_parallel_size : (i + 1) * tensor_parallel_size]
                ),
            }
            for i in range(ranks)
        ]
    cores = sorted(os.sched_getaffinity(0))
    per_rank = max(1, len(cores) // ranks)
    environments = []
    for i in range(ranks):
        own = [cores[(i * per_rank + j) % len(cores)] for j in range(per_rank)]
        environments.append(
            {**common, "VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, own)), **CPU_RANK_THREADS}
        )
    return environments


# Holders of the forkserver (clusters forking ranks from it, runs about to start one); it is
# stopped when none is left.
_forkserver_holders = 0


def forks_local_ranks(cluster_config: dict[str, Any]) -> bool:
    """Whether `connect` with ``cluster_config`` starts ranks on this host forked from the forkserver."""
    local = (cluster_config.get("type") or "local") == "local" and not cluster_config["scheduler-address"]
    return local and not visible_gpus()


@contextlib.contextmanager
def forkserver_for(cluster_config: dict[str, Any]):
    """Hold the forkserver while a run that will fork its ranks from it gets ready.

    vLLM then imports there while the run imports its own modules and checks its input; a run
    that stops before its cluster starts stops the forkserver.
    """
    held = forks_local_ranks(cluster_config)
    if held:
        start_forkserver()
    try:
        yield
    finally:
        if held:
            release_forkserver()


def start_forkserver() -> None:
    """Start multiprocessing's forkserver with vLLM imported, for ranks sharing a host's cores.

    Ranks forked from it start with vLLM imported: one import of about 10 s of CPU instead of
    one per rank, each slowing the others on a host without GPUs. Each call holds it until
    :func:`release_forkserver`.
    """
    global _forkserver_holders
    _forkserver_holders += 1
    # The rule of distributed.nanny: the OS environment wins over the config, None unsets.
    pre_spawn = {
        key: os.environ.get(key, str(value))
        for key, value in dask.config.get("distributed.nanny.pre-spawn-environ").items()
        if value is not None
    }
    if pre_spawn.get("PYTHONHASHSEED") in (None, "0"):
        pre_spawn["PYTHONHASHSEED"] = "6640"  # as the nanny does, for consistent hashing
    multiprocessing.get_context("forkserver").set_forkserver_preload(["daskdp.forkserver"])
    # As a nanny does for the workers it starts: they show as `dask worker [...]` in ps and top.
    enable_proctitle_on_children()
    with _environment({**pre_spawn, **_quiet(), **CPU_RANK_THREADS}), _sigint_ignored():
        multiprocessing.forkserver.ensure_running()


def release_forkserver() -> None:
    """Stop the forkserver when nothing holds it any more.

    A process left behind would hold vLLM's memory, and the CPU time of the ranks it reaped
    would be missing from this process's (``time``, the benchmarks).
    """
    global _forkserver_holders
    _forkserver_holders -= 1
    if _forkserver_holders == 0:
        forkserver = multiprocessing.forkserver._forkserver
        if forkserver._forkserver_pid is not None:
            # Asked to stop, it would first finish importing vLLM (a run that stopped early).
            os.kill(forkserver._forkserver_pid, signal.SIGKILL)
        forkserver._stop()  # the only way the standard library has


@contextlib.contextmanager
def _sigint_ignored() -> Iterator[None]:
    """Start processes that ignore Ctrl-C: the terminal sends SIGINT to the whole process
    group, and the process that started them stops them itself. (The forkserver ignores it
    once its imports are done, and its ranks inherit what it had before; killed mid-import,
    it made each worker waiting for it log a traceback.)"""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may set signal handlers
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def silenced(*names: str) -> Iterator[None]:
    """Drop every record of the loggers ``names`` and of the loggers under them, in the block."""
    prefixes = tuple(f"{name}." for name in names)
    loggers = [logging.getLogger(name) for name in names] + [
        each
        for each_name, each in list(logging.root.manager.loggerDict.items())
        if each_name.startswith(prefixes) and isinstance(each, logging.Logger)
    ]
    levels = [each.level for each in loggers]
    for each in loggers:
        each.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        for each, level in zip(loggers, levels, strict=True):
            each.setLevel(level)


@contextlib.contextmanager
def _environment(variables: dict[str, str]):
    saved = {key: os.environ.get(key) for key in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


START_METHOD = "distributed.worker.multiprocessing-method"
# ForkedNanny instances starting their worker now, and Dask's start method before the first.
_forking = 0
_start_method_before: str | None = None
_forking_lock = threading.Lock()


@contextlib.contextmanager
def _forking_workers() -> Iterator[None]:
    """Dask's start method is ``forkserver`` while any `ForkedNanny` starts its worker.

    Nannies start at the same time and finish in any order; nested ``dask.config.set`` blocks
    exited out of order would restore each other's value and leave ``forkserver`` set.
    """
    global _forking, _start_method_before
    with _forking_lock:
        if _forking == 0:
            _start_method_before = dask.config.get(START_METHOD)
            dask.config.set({START_METHOD: "forkserver"})
        _forking += 1
    try:
        yield
    finally:
        with _forking_lock:
            _forking -= 1
            if _forking == 0:
                dask.config.set({START_METHOD: _start_method_before})


class ForkedNanny(Nanny):
    """A nanny whose worker is forked from the forkserver, when it starts and when it restarts.

    Dask reads the start method from its configuration each time a nanny starts its worker: a
    worker restarted after it died (killed, out of memory) would otherwise be spawned, and
    import vLLM again before its engine could load.
    """

    async def instantiate(self):
        with _forking_workers():
            return await super().instantiate()


class RankedLocalCluster(LocalCluster):
    """A ``LocalCluster`` of one worker process per rank, each pinned to its own devices.

    Workers are named ``0 .. ranks-1`` and carry the resource ``GPU=tensor_parallel_size``.

    Examples
    --------
    >>> cluster = RankedLocalCluster(ranks=2)  # doctest: +SKIP
    >>> client = Client(cluster)  # doctest: +SKIP
    """

    def __init__(
        self,
        ranks: int,
        tensor_parallel_size: int = 1,
        host: str = "127.0.0.1",
        dashboard_address: str = "127.0.0.1:0",
        **kwargs: Any,
    ):
        self.rank_environments = rank_environments(ranks, tensor_parallel_size)
        # The ranks' temporary files (vLLM's rendezvous file among them) go here, removed when
        # the cluster closes: a rank stopped at the end of a run leaves its own behind.
        self.scratch = tempfile.TemporaryDirectory(prefix="daskdp-ranks-")
        config = {**RANK_DASK_CONFIG, "distributed.worker.daemon": tensor_parallel_size == 1}
        self.forked = not visible_gpus()
        if self.forked:
            start_forkserver()
            kwargs.setdefault("worker_class", ForkedNanny)
        # vLLM spawns its tensor-parallel workers: a worker process must be able to have children.
        try:
            with dask.config.set(config):
                super().__init__(
                    n_workers=0,
                    threads_per_worker=1,
                    processes=True,
                    host=host,
                    dashboard_address=dashboard_address,
                    resources={GPU: tensor_parallel_size},
                    preload=["daskdp.plugin"],  # starts importing vLLM as each worker starts
                    **kwargs,
                )
                self.scale(ranks)
                self.sync(self._correct_state)
        except BaseException:
            # Interrupted while its workers start (Ctrl-C): the forkserver goes first, so that
            # workers waiting for it fail at once (Dask logs each with a traceback: no news),
            # then the cluster. Its close fails on the cancelled start, and Dask's exit hook
            # would wait 10 s on it again: the process exits, and its workers with it.
            with silenced("distributed", "tornado"):
                self._release_forkserver()
                with contextlib.suppress(Exception):
                    self.close(timeout=10)
            self.shutdown_on_close = False
            raise

    def stop_ranks(self, grace: float = 0.1) -> None:
        """End the worker processes now, giving each ``grace`` seconds before SIGKILL.

        For the end of a run whose results are on disk: a worker holding an engine otherwise
        spends seconds freeing it and finalising torch before it exits.
        """

        async def stop() -> None:
            # On a loaded host a killed process may take longer than ``grace`` to be reaped;
            # ``close()`` then waits for it.
            closing = (nanny.close(timeout=grace) for nanny in self.workers.values())
            await asyncio.gather(*closing, return_exceptions=True)

        self.sync(stop)

    def new_worker_spec(self):
        rank = min(set(range(len(self.rank_environments))) - set(self.worker_spec), default=None)
        if rank is None:
            raise ValueError(f"all {len(self.rank_environments)} ranks of this cluster are running")
        spec = copy.deepcopy(self.new_spec)
        spec["options"]["env"] = {
            **spec["options"].get("env", {}),
            **self.rank_environments[rank],
            "TMPDIR": self.scratch.name,
        }
        return {rank: spec}

    async def _close(self) -> None:
        await super()._close()
        self.scratch.cleanup()
        self._release_forkserver()

    def _release_forkserver(self) -> None:
        if self.forked:
            self.forked = False
            release_forkserver()


def default_ranks(tensor_parallel_size: int) -> int:
    """One rank per group of ``tensor_parallel_size`` GPUs; 1 on a host without GPUs."""
    gpus = visible_gpus()
    return max(1, len(gpus) // tensor_parallel_size) if gpus else 1


# The client's TLS files: Security's parameter -> daskdp's key, its flag, and the Dask key that
# applies when none of daskdp's keys is set.
TLS_FILES = {
    "tls_ca_file": ("tls-ca-file", "--tls-ca-file", "distributed.comm.tls.ca-file"),
    "tls_client_cert": ("tls-cert", "--tls-cert", "distributed.comm.tls.client.cert"),
    "tls_client_key": ("tls-key", "--tls-key", "distributed.comm.tls.client.key"),
}
TLS_FLAGS = "--tls-ca-file CA.pem --tls-cert CERT.pem --tls-key KEY.pem"


def client_security(cluster_config: dict[str, Any], address: str) -> tuple[Security | None, dict[str, str]]:
    """The client's ``Security`` for the scheduler at ``address``, and a name for each of its files.

    ``cluster.tls-ca-file``/``tls-cert``/``tls-key`` when any is set, with encryption required.
    Otherwise Dask decides: ``None`` when a ``distributed.client.security-loader`` is configured
    (``Client`` calls it), else ``Security()``, which reads ``distributed.comm.tls.*``. Mistakes
    that Dask would report with a traceback, or only at the first connection, raise `UserError`.
    A file is named by its flag (or Dask key) and path; PEM text given in place of a path is
    never shown.
    """
    ours = {attr: cluster_config.get(key) for attr, (key, _, _) in TLS_FILES.items()}
    if any(ours.values()):
        security = Security(require_encryption=True, **ours)
        names = {attr: flag for attr, (_, flag, _) in TLS_FILES.items()}
    elif dask.config.get("distributed.client.security-loader"):
        return None, {}
    else:
        security = Security()
        names = {attr: dask_key for attr, (_, _, dask_key) in TLS_FILES.items()}
    files = {attr: getattr(security, attr) for attr in TLS_FILES}
    named = {attr: _named(names[attr], value) for attr, value in files.items()}
    for attr, value in files.items():
        if value and "\n" not in value:  # Dask also takes PEM text in place of a path
            try:
                with open(value, "rb"):
                    pass
            except OSError as e:
                raise UserError(f"cannot read {named[attr]} ({e.strerror or e}); check the path") from None
    key = "tls_client_key" if files["tls_client_key"] else "tls_client_cert"
    if files[key] and _passphrase_protected(files[key]):
        # ssl would ask for the passphrase on the terminal; Dask has no parameter to pass one.
        raise UserError(
            f"{named[key]} holds a passphrase-protected private key, which Dask cannot use; "
            "pass an unprotected key"
        )
    scheme, _ = parse_address(address)
    if scheme == "tcp" and security.require_encryption:
        given = [names[attr] for attr, value in ours.items() if value]
        why = f"{', '.join(given)} given" if given else "distributed.comm.require-encryption is set"
        raise UserError(f"the scheduler address {address} is not encrypted but {why}; use tls://HOST:PORT")
    if scheme == "tls" and not (files["tls_ca_file"] and files["tls_client_cert"]):
        if not any(ours.values()):
            raise UserError(
                f"the scheduler at {address} uses TLS but no certificates are given; pass {TLS_FLAGS} "
                "(or set distributed.comm.tls.ca-file and distributed.comm.tls.client.cert/key)"
            )
        missing = " and ".join(names[attr] for attr in ("tls_ca_file", "tls_client_cert") if not files[attr])
        raise UserError(
            f"TLS needs a CA file and a client certificate; pass {missing} too "
            "(--tls-key may be left out only when the key is in the certificate file)"
        )
    return security, named


def _named(name: str, value: str | None) -> str:
    return f"{name} {value}" if value and "\n" not in value else name


def _connect_error(address: str, error: OSError, security: Security | None, named: dict[str, str]) -> str:
    """One line saying why ``Client(address)`` failed and which setting to fix."""
    chain: list[BaseException] = []
    cause: BaseException | None = error
    while cause is not None and cause not in chain:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    text = " ".join(str(e) for e in chain)
    found = re.search(r"\[(?:SSL|X509)[^\]]*\] ([^(]+)", text)
    reason = found.group(1) if found else str(error).rpartition(">: ")[2] or type(error).__name__
    reason = " ".join(re.sub(r"\(_ssl\.c:\d+\)", "", reason).split())
    ca = named.get("tls_ca_file", "--tls-ca-file")
    cert = named.get("tls_client_cert", "--tls-cert")
    timed_out = str(error).startswith("Timed out")
    reached = timed_out or any(isinstance(e, (CommClosedError, TimeoutError)) for e in chain)
    if not reached and security is not None and security.tls_client_cert:
        # Raised by ssl while loading the client's own files, before any connection.
        if not _loads_as_ca(security.tls_ca_file):
            return f"{ca} holds no CA certificate in PEM format ({reason}); pass the CA's certificate"
        key = named.get("tls_client_key") or cert
        return (
            f"cannot load the TLS client certificate {cert} with its key {key} ({reason}); "
            "both must be PEM files and the key must belong to the certificate"
        )
    scheme = parse_address(address)[0]
    if timed_out or scheme != "tls":
        hint = ""
        if scheme == "tcp" and not timed_out:
            hint = f"; if it requires TLS, use tls://HOST:PORT with {TLS_FLAGS}"
        return (
            f"cannot reach the Dask scheduler at {address} ({reason}); "
            f"check --scheduler-address and that `dask scheduler` is running{hint}"
        )
    if "verify failed" in reason:
        return (
            f"the Dask scheduler at {address} presented a certificate that {ca} does not verify "
            f"({reason}); pass the CA that signed the scheduler's certificate"
        )
    if "wrong version number" in reason:
        return (
            f"the Dask scheduler at {address} does not speak TLS ({reason}); "
            "use its tcp:// address, or start it with --protocol tls"
        )
    # The scheduler checks the client's certificate after the client's side of the handshake:
    # the refusal arrives as an alert (unknown ca, certificate expired) or as a bare EOF.
    return (
        f"the Dask scheduler at {address} refused the TLS connection ({reason}); "
        f"{cert} must be valid and signed by a CA that the scheduler trusts"
    )


def _loads_as_ca(ca: str) -> bool:
    try:
        ssl.create_default_context(**{"cadata" if "\n" in ca else "cafile": ca})
    except (OSError, ValueError):
        return False
    return True


def _passphrase_protected(key: str) -> bool:
    try:
        text = key if "\n" in key else Path(key).read_text(errors="replace")
    except OSError:
        return False
    return bool(re.search(r"^-----BEGIN ENCRYPTED|^Proc-Type: 4,ENCRYPTED", text, re.MULTILINE))


def check_scheduler(address: str, security: Security, timeout: float) -> None:
    """Refuse an address where something other than a Dask scheduler listens.

    ``Client`` waits for the scheduler's handshake without a limit (a server that accepts and
    stays silent holds it forever) and reads whatever comes back as Dask frames (an HTTP
    server's answer becomes a length of exabytes). A Dask scheduler speaks first: the length
    of its handshake, as soon as it accepts. One connection made here reads those 8 bytes
    within ``timeout``. Connection errors (``OSError``) are left to the caller.
    """
    scheme, location = parse_address(address)
    if scheme not in ("tcp", "tls"):
        return
    host, port = parse_host_port(location)
    # Loading the client's own files fails here, before any connection, as in Client.
    context = security.get_connection_args("client")["ssl_context"] if scheme == "tls" else None
    with socket.create_connection((host, port), timeout=timeout) as raw:
        raw.settimeout(timeout)
        try:
            first = _first_bytes(raw, 8, context, host)
        except TimeoutError:
            raise UserError(
                f"{address} did not answer within {timeout:g} s, as a Dask scheduler does at once; "
                "check --scheduler-address (distributed.comm.timeouts.connect sets the wait)"
            ) from None
        except ssl.SSLError as e:  # reached, and refused: as Client reports it
            raise CommClosedError(str(e)) from e
    if len(first) < 8 or struct.unpack("<Q", first)[0] > MAX_HANDSHAKE_BYTES:
        raise UserError(
            f"{address} is not a Dask scheduler (it answered {first[:8]!r}); check --scheduler-address"
        )


MAX_HANDSHAKE_BYTES = 1 << 24


def _first_bytes(raw: socket.socket, count: int, context: ssl.SSLContext | None, host: str) -> bytes:
    """Up to ``count`` bytes the server sends first, over TLS when a ``context`` is given."""
    connection = raw if context is None else context.wrap_socket(raw, server_hostname=host)
    first = b""
    while len(first) < count:
        received = connection.recv(count - len(first))
        if not received:
            break
        first += received
    return first


def connect(cluster_config: dict[str, Any], tensor_parallel_size: int) -> tuple[Client, SpecCluster | None]:
    """A client on the configured scheduler, or on a new cluster that the caller closes.

    The scheduler at ``cluster.scheduler-address`` is given ``distributed.comm.timeouts.connect``
    (30 s by default) to answer, or ``cluster.startup-timeout`` when shorter; a refused TLS
    handshake fails at once. ``cluster.type`` slurm or pbs submits one job per rank
    (`daskdp.jobqueue`); local starts the ranks on this host.
    """
    address = cluster_config["scheduler-address"]
    kind = cluster_config.get("type") or "local"
    if address and kind != "local":
        raise UserError(f"--scheduler-address and --cluster {kind} exclude each other; pass one")
    if kind != "local":
        from daskdp import jobqueue

        return jobqueue.start(cluster_config, tensor_parallel_size)
    if address:
        security, named = client_security(cluster_config, address)
        timeout = parse_timedelta(dask.config.get("distributed.comm.timeouts.connect"), default="seconds")
        if cluster_config.get("startup-timeout"):
            timeout = min(timeout, cluster_config["startup-timeout"])
        try:
            if security is not None:  # else a configured security-loader gives Client its own
                check_scheduler(address, security, timeout)
            client = Client(address, security=security, timeout=timeout)
        except OSError as e:
            raise UserError(_connect_error(address, e, security, named)) from None
        return client, None
    ranks = cluster_config["workers"] or default_ranks(tensor_parallel_size)
    if int(ranks) < 1:
        raise UserError(f"--workers must be at least 1, got {ranks}")
    cluster = RankedLocalCluster(
        ranks=int(ranks),
        tensor_parallel_size=tensor_parallel_size,
        host=cluster_config["host"],
        dashboard_address=cluster_config["dashboard-address"],
    )
    return Client(cluster), cluster
