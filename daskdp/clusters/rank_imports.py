"""What the ranks of a host without GPUs start with already imported: the forkserver imports it
(through `daskdp.clusters.forkserver_preload`), and every rank forked from it inherits vLLM and
the modules of its tasks."""

import atexit
import gc
import os

import dask.dataframe  # noqa: F401  (reading and partitioning the input)

import daskdp.engine.loop  # noqa: F401
import daskdp.engine.plugin  # noqa: F401  (the workers' Dask preload)
import daskdp.inputs.read  # noqa: F401
from daskdp.engine.engine import import_vllm_ahead

import_vllm_ahead()

# The forkserver has nothing to clean up. `release_forkserver` kills it; when its parent exits
# without releasing it, it exits at once instead of running vLLM's and torch's exit handlers,
# which kept the parent's output open for seconds. (Its ranks end with os._exit.)
atexit.register(os._exit, 0)

# Forked ranks share these modules' memory until they write to it; a collection walking them
# would write to every object's header (copying the pages) for nothing: they stay alive.
gc.freeze()
