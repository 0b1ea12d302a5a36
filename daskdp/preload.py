"""Imported by the forkserver that starts the ranks of a host without GPUs (`daskdp.cluster`):
every rank forked from it starts with vLLM and the modules of its tasks already imported."""

import dask.dataframe  # noqa: F401  (reading and partitioning the input)

import daskdp.generation  # noqa: F401
import daskdp.io  # noqa: F401
from daskdp.plugin import import_vllm_ahead

import_vllm_ahead()
