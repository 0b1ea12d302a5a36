"""The forkserver that local ranks on a host without GPUs are forked from, with vLLM imported.

Ranks forked from it start with vLLM imported: one import for the host instead of one per rank,
each slowing the others on shared cores. multiprocessing's forkserver imports
`daskdp.clusters.forkserver_preload`, which imports `daskdp.clusters.rank_imports` one module
deeper (its docstring says why).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.forkserver
import multiprocessing.resource_tracker
import os
import signal
import tempfile
import threading
from collections.abc import Iterator
from typing import Any

import dask.config
from distributed.proctitle import enable_proctitle_on_children

from daskdp.clusters.ranks import CPU_RANK_THREADS, quiet_environment, visible_gpus

PRELOAD = "daskdp.clusters.forkserver_preload"
# multiprocessing makes the forkserver's socket TMPDIR/pymp-XXXXXXXX/listener-XXXXXXXX, and an
# AF_UNIX path holds at most 107 bytes: less than an HPC job's TMPDIR often leaves.
SOCKET_DIRECTORY_ROOM = 107 - len("/pymp-XXXXXXXX/listener-XXXXXXXX")
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

    Each call holds it until :func:`release_forkserver`.
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
    multiprocessing.get_context("forkserver").set_forkserver_preload([PRELOAD])
    # As a nanny does for the workers it starts: they show as `dask worker [...]` in ps and top.
    enable_proctitle_on_children()
    # Started first: it unblocks SIGINT once it runs, which would end `_sigint_held` early.
    multiprocessing.resource_tracker.ensure_running()
    with (
        _environment({**pre_spawn, **quiet_environment(), **CPU_RANK_THREADS}),
        _sigint_held(),
        _short_socket_directory(),
    ):
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
def _sigint_held() -> Iterator[None]:
    """Start processes with Ctrl-C held back: the terminal sends SIGINT to the whole process
    group, and the process that started them stops them itself.

    The forkserver starts with SIGINT blocked and ignores it before it imports anything
    (`daskdp.clusters.forkserver_preload`); its ranks inherit that. (Killed mid-import, it made
    each worker waiting for it log a traceback.) This process gets a Ctrl-C of those instants
    once they are over: blocked, not ignored, which lost it.
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # other threads do not start it: `start_forkserver` runs on the main thread
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


@contextlib.contextmanager
def _short_socket_directory() -> Iterator[None]:
    """Put the forkserver's socket in a short temporary directory when TMPDIR is too long for one."""
    saved = tempfile.tempdir
    if len(tempfile.gettempdir()) > SOCKET_DIRECTORY_ROOM:
        short = [d for d in ("/tmp", "/var/tmp", "/dev/shm") if os.access(d, os.W_OK | os.X_OK)]
        tempfile.tempdir = short[0] if short else saved
    try:
        yield
    finally:
        tempfile.tempdir = saved


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
