"""Engine outputs -> output rows: a chunk's rows, their results as the engine finishes them, the
result columns (`daskdp.output.schema`) and the chunk's record. The one place output rows are built."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from daskdp.engine.requests import add_requests, scores_by_cosine
from daskdp.output.schema import GENERATE, result_dtypes

if TYPE_CHECKING:
    from vllm import LLM

    from daskdp.engine.requests import GenerationRequest


class Chunk:
    """Rows generated and written together, and their results as they come from the engine."""

    def __init__(self, number: int, rows: pd.DataFrame, attempt: int = 1):
        self.number, self.rows, self.attempt = number, rows, attempt
        n = len(rows)
        self.errors = np.full(n, None, dtype=object)
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
        self.task = GENERATE
        self.pooled = np.full(n, None, dtype=object)  # pooling tasks: each row's vector or score
        self.by_cosine = False  # score: pairs scored by the cosine of their two embeddings
        self.halves: dict[int, Any] = {}  # score by cosine: the first embedding of a pair
        self.dimension: int | None = None  # embed: the run's one embedding dimension
        self.labels: dict[int, str] = {}  # classify: the model's id2label

    def enqueue(self, llm: LLM, request: GenerationRequest) -> int:
        """Render and check every row, then add the good ones to the engine; return the rows
        already finished (errors)."""
        self.started = time.time()
        self.task = request.task
        if self.task == "embed":
            self.dimension = request.pooling["dimensions"] or llm.model_config.embedding_size
        elif self.task == "classify":
            labels = getattr(llm.model_config.hf_config, "id2label", None) or {}
            self.labels = {int(k): str(v) for k, v in labels.items()}
        elif self.task == "score":
            self.by_cosine = scores_by_cosine(llm)
        self.prompt_tokens[:], self.pending = add_requests(llm, self.rows, request, self.errors)
        return len(self.rows) - len(set(self.pending.values()))

    def finish_row(self, request_id: str, output: Any) -> tuple[int, int]:
        """Take a finished request's output; return the rows it finished (0 for the first
        text of a pair) and their tokens: output tokens for generation, prompt tokens for pooling."""
        i = self.pending.pop(request_id)
        if self.task != GENERATE:
            return self._finish_pooled(i, output)
        completion = output.outputs[0]
        self.texts[i] = completion.text
        self.output_tokens[i] = len(completion.token_ids)
        self.finish_reasons[i] = completion.finish_reason
        self.finished_at[i] = time.time()
        if output.metrics is not None:  # with the engine's stats on (disable_log_stats=False)
            self.first_token[i] = output.metrics.first_token_latency
            self.queued[i] = output.metrics.scheduled_ts - output.metrics.queued_ts
        return 1, len(completion.token_ids)

    def _finish_pooled(self, i: int, output: Any) -> tuple[int, int]:
        data = output.outputs.data
        if self.by_cosine:  # as LLM.score computes it, once both texts are in
            if i not in self.halves:
                self.halves[i] = data
                return 0, 0
            import torch.nn.functional as F

            data = F.cosine_similarity(self.halves.pop(i).float(), data.float(), dim=0)
        self.pooled[i] = float(data.squeeze()) if self.task == "score" else data.float().numpy()
        self.finished_at[i] = time.time()
        return 1, int(self.prompt_tokens[i])

    def give_up(self, reason: str) -> None:
        """Mark the rows still in the engine as errors."""
        for i in self.pending.values():
            self.errors[i] = reason
        self.pending = {}

    def results(self, rank: int, worker: str) -> pd.DataFrame:
        """The chunk's rows with their result columns."""
        n = len(self.rows)
        columns = {
            "prompt_tokens": self.prompt_tokens,
            "rank": np.full(n, rank),
            "worker": np.full(n, worker, dtype=object),
            "error": self.errors,
            "started_at": np.full(n, self.started),
            "finished_at": self.finished_at,
        }
        if self.task == GENERATE:
            columns |= {
                "generated_text": self.texts,
                "output_tokens": self.output_tokens,
                "finish_reason": self.finish_reasons,
                "time_to_first_token": self.first_token,
                "queue_seconds": self.queued,
            }
        else:
            columns |= self._pooled_columns()
        dtypes = result_dtypes(self.task, self.dimension)
        return self.rows.assign(
            **{name: pd.array(columns[name], dtype=dtype) for name, dtype in dtypes.items()}
        )

    def _pooled_columns(self) -> dict[str, Any]:
        """The pooling task's own columns, from each row's vector or score (None: an error row)."""
        import pyarrow as pa

        done = np.array([value is not None for value in self.pooled])
        if self.task == "embed":
            flat = np.zeros((len(self.rows), self.dimension or 0), dtype=np.float32)
            if done.any():
                flat[done] = np.stack(list(self.pooled[done]))
            vectors = pa.FixedSizeListArray.from_arrays(
                pa.array(flat.ravel()), self.dimension, mask=pa.array(~done)
            )
            return {"embedding": pd.arrays.ArrowExtensionArray(vectors)}
        if self.task == "classify":
            probs = pa.array([None if p is None else p for p in self.pooled], type=pa.list_(pa.float32()))
            labels = [
                None if p is None else self.labels.get(int(np.argmax(p)), str(int(np.argmax(p))))
                for p in self.pooled
            ]
            return {"probs": pd.arrays.ArrowExtensionArray(probs), "label": labels}
        return {"score": self.pooled}

    def record(self, rank: int, worker: str, partition: int, id_column: str) -> dict[str, Any]:
        """What the manifest keeps of this chunk."""
        ids = self.rows[id_column]
        unfinished = sorted(set(self.pending.values()))
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
