"""Strategies: how a plan's chunks reach the ranks' engines, behind one interface.

`independent.Independent`: every rank its own engine, partitions handed out as futures, work
stolen by ranks that ran dry. `gang.GangMode`: the ranks as one vLLM data-parallel group (MoE
with expert parallelism), one partition each, all or nothing. Both load their engines with
`engines.load_engines` and run the same chunk loop (`daskdp.engine.loop`) on the workers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, TextIO

if TYPE_CHECKING:
    import pandas as pd
    from distributed import Client

    from daskdp.engine.plugin import EnginePlugin
    from daskdp.engine.requests import GenerationRequest
    from daskdp.plan import Plan


@dataclass(frozen=True)
class Generation:
    """What a strategy is given: the plan's chunks to generate with ``plugin``'s engines on the
    client's cluster, into ``output``, by ``deadline`` (a ``time.time()``, or none)."""

    client: Client
    plan: Plan
    plugin: EnginePlugin
    request: GenerationRequest
    output: str
    startup_timeout: float
    deadline: float | None
    progress: TextIO | None


class Strategy(Protocol):
    def run(self, generation: Generation) -> pd.DataFrame:
        """Generate the plan's chunks into the output; the chunk records of every partition."""
        ...
