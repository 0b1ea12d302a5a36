"""daskdp: offline LLM generation over many prompts on a Dask cluster of vLLM engines.

``import daskdp`` is cheap: Dask, vLLM and torch load only when a function needs them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = [
    "EnginePlugin",
    "RankedLocalCluster",
    "classify",
    "embed",
    "export",
    "generate",
    "read_manifest",
    "read_results",
    "read_summary",
    "run",
    "score",
]

_LOCATIONS = {
    "EnginePlugin": "daskdp.engine.plugin",
    "RankedLocalCluster": "daskdp.clusters.local",
    "classify": "daskdp.api",
    "embed": "daskdp.api",
    "export": "daskdp.output.export",
    "generate": "daskdp.api",
    "score": "daskdp.api",
    "read_manifest": "daskdp.api",
    "read_results": "daskdp.api",
    "read_summary": "daskdp.api",
    "run": "daskdp.runner",
}

if TYPE_CHECKING:
    from daskdp.api import classify, embed, generate, read_manifest, read_results, read_summary, score
    from daskdp.clusters.local import RankedLocalCluster
    from daskdp.engine.plugin import EnginePlugin
    from daskdp.output.export import export
    from daskdp.runner import run


def __getattr__(name: str) -> Any:
    if name in _LOCATIONS:
        import importlib

        return getattr(importlib.import_module(_LOCATIONS[name]), name)
    raise AttributeError(f"module 'daskdp' has no attribute {name!r}")
