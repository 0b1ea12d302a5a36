"""Engine outputs -> output rows: a chunk's rows, their results as the engine finishes them, the
result columns (`daskdp.output.schema`) and the chunk's record. The one place output rows are built."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from daskdp.engine.requests import add_requests
from daskdp.inputs.openai import REQUEST_ERROR
from daskdp.output.schema import RESULT_DTYPES

if TYPE_CHECKING:
    from vllm import LLM

    from daskdp.engine.requests import GenerationRequest


class Chunk:
    """Rows generated and written together, and their results as they come from the engine."""

    def __init__(self, number: int, rows: pd.DataFrame, attempt: int = 1):
        self.number, self.rows, self.attempt = number, rows, attempt
        n = len(rows)
        self.errors = np.full(n, None, dtype=object)
        if REQUEST_ERROR in rows:  # requests the reader found bad (an OpenAI Batch line)
            found = rows[REQUEST_ERROR].to_numpy(dtype=object)
            self.errors[:] = np.where(pd.isna(found), None, found)
        self.texts = np.full(n, None, dtype=object)
        self.finish_reasons = np.full(n, None, dtype=object)
        self.prompt_tokens = np.zeros(n, dtype=np.int64)
        self.output_tokens = np.zeros(n, dtype=np.int64)
        self.finished_at = np.full(n, np.nan)
        self.first_token = np.full(n, np.nan)
        self.queued = np.full(n, np.nan)
        self.pending: dict[str, int] = {}  # row by request id, while in the engine
        self.started = time.time()
        self.head_since: float | None = None  # when it became the oldest chunk in the engine
        self.prefix_cache = (0, 0)  # the engine's prefix-cache queries and hits, in tokens

    def enqueue(self, llm: LLM, request: GenerationRequest) -> None:
        """Render and check every row, then add the good ones to the engine."""
        self.started = time.time()
        self.prompt_tokens[:], self.pending = add_requests(llm, self.rows, request, self.errors)

    def finish_row(self, request_id: str, output: Any) -> int:
        """Take a finished request's output; return its number of output tokens."""
        i = self.pending.pop(request_id)
        completion = output.outputs[0]
        self.texts[i] = completion.text
        self.output_tokens[i] = len(completion.token_ids)
        self.finish_reasons[i] = completion.finish_reason
        self.finished_at[i] = time.time()
        if output.metrics is not None:  # with the engine's stats on (disable_log_stats=False)
            self.first_token[i] = output.metrics.first_token_latency
            self.queued[i] = output.metrics.scheduled_ts - output.metrics.queued_ts
        return len(completion.token_ids)

    def give_up(self, reason: str) -> None:
        """Mark the rows still in the engine as errors."""
        for i in self.pending.values():
            self.errors[i] = reason
        self.pending = {}

    def results(self, rank: int, worker: str) -> pd.DataFrame:
        """The chunk's rows with their result columns."""
        n = len(self.rows)
        columns = {
            "position": self.rows["position"].to_numpy(),
            "generated_text": self.texts,
            "prompt_tokens": self.prompt_tokens,
            "output_tokens": self.output_tokens,
            "finish_reason": self.finish_reasons,
            "rank": np.full(n, rank),
            "worker": np.full(n, worker, dtype=object),
            "error": self.errors,
            "started_at": np.full(n, self.started),
            "finished_at": self.finished_at,
            "time_to_first_token": self.first_token,
            "queue_seconds": self.queued,
        }
        return self.rows.drop(columns=REQUEST_ERROR, errors="ignore").assign(
            **{name: pd.array(columns[name], dtype=dtype) for name, dtype in RESULT_DTYPES.items()}
        )

    def record(self, rank: int, worker: str, partition: int, id_column: str) -> dict[str, Any]:
        """What the manifest keeps of this chunk."""
        ids = self.rows[id_column]
        unfinished = sorted(self.pending.values())
        return {
            "chunk": self.number,
            "status": "",
            "rows": len(self.rows),
            "first_row": int(self.rows.index[0]),
            "last_row": int(self.rows.index[-1]),
            "first_id": str(ids.iloc[0]),
            "last_id": str(ids.iloc[-1]),
            "error_rows": int(sum(e is not None for e in self.errors)),
            "prompt_tokens": int(self.prompt_tokens.sum()),
            "output_tokens": int(self.output_tokens.sum()),
            "timed_out_rows": len(unfinished),
            "timed_out_ids": [str(ids.iloc[i]) for i in unfinished],
            "prefix_cache_queries": self.prefix_cache[0],
            "prefix_cache_hits": self.prefix_cache[1],
            "rank": rank,
            "worker": worker,
            "partition": partition,
            "attempts": self.attempt,
            "started": self.started,
            "finished": time.time(),
        }
