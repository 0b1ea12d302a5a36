"""Loading the engines from the client, shared by every strategy: the plugin registered on the
``GPU`` workers that do not hold its engine yet, within a timeout."""

from __future__ import annotations

import concurrent.futures
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from daskdp.clusters.ranks import wait_for_gpu_workers
from daskdp.engine.plugin import EnginePlugin, engine_status
from daskdp.errors import RunError

if TYPE_CHECKING:
    from distributed import Client


def ensure_engines(client: Client, plugin: EnginePlugin, timeout: float) -> list[str]:
    """Load ``plugin``'s engine on every ``GPU`` worker, unless they already hold it.

    Returns the addresses of the workers holding the engine, ordered by rank. A cluster kept
    warm between runs of the same model loads nothing.
    """
    gpu_workers = wait_for_gpu_workers(client, timeout)
    if plugin.data_parallel is not None:  # gang mode: the gang's members only
        gpu_workers = [address for address in gpu_workers if address in plugin.data_parallel]
    held = client.run(engine_status, workers=gpu_workers)
    if any(status is None or status[0] != plugin.fingerprint for status in held.values()):
        try:
            client.register_plugin(plugin)
        except Exception as e:
            raise RunError(f"the engine for {plugin.model} did not load: {engine_load_reason(e)}") from None
        held = client.run(engine_status, workers=gpu_workers)
    ranked = sorted((status[1], address) for address, status in held.items() if status is not None)
    return [address for _, address in ranked]


def engine_load_reason(error: BaseException) -> str:
    """The line of an engine's error that says what is wrong.

    vLLM's configuration errors come from pydantic: ``1 validation error for ParallelConfig``,
    then ``  Value error, <the reason> [type=value_error, ...]``.
    """
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    if re.match(r"\d+ validation errors? for ", lines[0]) and len(lines) > 1:
        return re.sub(r"^Value error, |\s*\[type=.*$", "", lines[1])
    return lines[0]


def load_engines(
    client: Client,
    plugin: EnginePlugin,
    timeout: float,
    *,
    what: str = "the engines",
    meanwhile: Callable[[], Any] | None = None,
) -> tuple[list[str], Any]:
    """`ensure_engines` within ``timeout`` seconds, in a thread while the client does
    ``meanwhile()`` (reads and splits the input); the ranks, and what ``meanwhile`` returned."""
    loader = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="daskdp-load")
    try:
        loading = loader.submit(ensure_engines, client, plugin, timeout)
        done = meanwhile() if meanwhile is not None else None
        try:
            return loading.result(timeout=timeout), done
        except concurrent.futures.TimeoutError:
            raise RunError(
                f"{what} did not load within {timeout:g} s; raise cluster.startup-timeout for a large model"
            ) from None
    finally:
        loader.shutdown(wait=False)
