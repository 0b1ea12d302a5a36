"""Imported by the forkserver that starts the ranks of a host without GPUs (`daskdp.forkserver`):
every rank forked from it starts with vLLM and the modules of its tasks already imported."""

import atexit
import gc
import os

import dask.dataframe  # noqa: F401  (reading and partitioning the input)

import daskdp.generation  # noqa: F401
import daskdp.io  # noqa: F401
from daskdp.plugin import import_vllm_ahead

import_vllm_ahead()

# The forkserver has nothing to clean up. `release_forkserver` kills it; when its parent exits
# without releasing it, it exits at once instead of running vLLM's and torch's exit handlers,
# which kept the parent's output open for 2 to 5 s. (Its ranks end with os._exit.)
atexit.register(os._exit, 0)

# Forked ranks share these modules' memory until they write to it; a collection walking them
# would write to every object's header (copying the pages) for nothing: they stay alive.
gc.freeze()
