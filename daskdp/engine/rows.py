"""Engine outputs -> output rows: a chunk's rows, their results as the engine finishes them, the
result columns (`daskdp.output.schema`) and the chunk's record. The one place output rows are built."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import pandas as pd

from daskdp.engine.requests import add_requests, scores_by_cosine
from daskdp.engine.structured import count_valid, row_constraints
from daskdp.inputs.openai import REQUEST_ERROR
from daskdp.output.schema import GENERATE, LOGPROB_COLUMNS, arrow_type, result_dtypes

if TYPE_CHECKING:
    from vllm import LLM

    from daskdp.engine.requests import GenerationRequest


class Chunk:
    """Rows generated and written together, and their results as they come from the engine.

    Results are kept per request (input row); a request with n samples becomes n output rows
    (`results`), one that failed stays one row.
    """

    def __init__(self, number: int, rows: pd.DataFrame, attempt: int = 1):
        self.number, self.rows, self.attempt = number, rows, attempt
        n = len(rows)
        self.errors = np.full(n, None, dtype=object)
        self.samples = np.full(n, None, dtype=object)  # per request: its list of `Sample`
        self.prompt_logprobs = np.full(n, None, dtype=object)  # per request: `Logprobs` or None
        if REQUEST_ERROR in rows:  # requests the reader found bad (an OpenAI Batch line)
            found = rows[REQUEST_ERROR].to_numpy(dtype=object)
            self.errors[:] = np.where(pd.isna(found), None, found)
        self.prompt_tokens = np.zeros(n, dtype=np.int64)
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
        self.constraints: list = [None] * n  # each row's structured constraint, if any

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
        if self.task == GENERATE:
            self.constraints = row_constraints(self.rows, request.sampling, self.errors)
        self.prompt_tokens[:], self.pending = add_requests(
            llm, self.rows, request, self.errors, self.constraints
        )
        return len(self.rows) - len(set(self.pending.values()))

    def finish_row(self, request_id: str, output: Any) -> tuple[int, int]:
        """Take a finished request's output (all its samples); return the rows it finished (0 for
        the first text of a pair) and their tokens: output tokens when generating, prompt tokens
        when pooling."""
        i = self.pending.pop(request_id)
        if self.task != GENERATE:
            return self._finish_pooled(i, output)
        completions = sorted(output.outputs, key=lambda completion: completion.index)
        self.samples[i] = [
            Sample(
                completion.text,
                len(completion.token_ids),
                completion.finish_reason,
                completion.cumulative_logprob,
                Logprobs.of(completion.logprobs),
            )
            for completion in completions
        ]
        self.prompt_logprobs[i] = Logprobs.of(output.prompt_logprobs)
        self.finished_at[i] = time.time()
        if output.metrics is not None:  # with the engine's stats on (disable_log_stats=False)
            self.first_token[i] = output.metrics.first_token_latency
            self.queued[i] = output.metrics.scheduled_ts - output.metrics.queued_ts
        return 1, sum(sample.tokens for sample in self.samples[i])

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

    @property
    def output_tokens(self) -> int:
        return sum(sample.tokens for samples in self.samples if samples for sample in samples)

    def results(self, rank: int, worker: str) -> pd.DataFrame:
        """The chunk's rows with their result columns: when generating, one row per sample of each
        request, one (``sample`` null) per request without samples; when pooling, one per row."""
        task = self.task
        if task == GENERATE:
            counts = np.array([len(s) if s else 1 for s in self.samples], dtype=np.int64)
            request = np.repeat(np.arange(len(self.rows)), counts)  # each output row's request
        else:
            request = np.arange(len(self.rows))
        n = len(request)
        columns = {
            "position": self.rows["position"].to_numpy()[request],
            "prompt_tokens": self.prompt_tokens[request],
            "rank": np.full(n, rank),
            "worker": np.full(n, worker, dtype=object),
            "error": self.errors[request],
            "started_at": np.full(n, self.started),
            "finished_at": self.finished_at[request],
        }
        if task == GENERATE:
            columns |= self._generated_columns(request)
        else:
            columns |= self._pooled_columns()
        rows = self.rows if n == len(self.rows) else self.rows.iloc[request]
        return rows.drop(columns=REQUEST_ERROR, errors="ignore").assign(
            **{
                name: result_array(name, columns[name], dtype)
                for name, dtype in result_dtypes(task, self.dimension).items()
            }
        )

    def _generated_columns(self, request: np.ndarray) -> dict[str, Any]:
        """Generation's own columns, a row per sample (``request``: each output row's request)."""
        samples = [s for samples in self.samples for s in (samples or [None])]
        numbers = [k for samples in self.samples for k in (range(len(samples)) if samples else [None])]
        first = np.array([k == 0 for k in numbers])
        return {
            "generated_text": [s.text if s else None for s in samples],
            "output_tokens": [s.tokens if s else 0 for s in samples],
            "finish_reason": [s.finish_reason if s else None for s in samples],
            "time_to_first_token": self.first_token[request],
            "queue_seconds": self.queued[request],
            "sample": numbers,
            "logprobs": [s.logprobs if s else None for s in samples],
            "cumulative_logprob": [s.cumulative_logprob if s else None for s in samples],
            "prompt_logprobs": np.where(first, self.prompt_logprobs[request], None),
        }

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
        request = [i for i, samples in enumerate(self.samples) for _ in (samples or [None])]
        texts = [s.text if s else None for samples in self.samples for s in (samples or [None])]
        structured_rows, structured_valid = count_valid(
            [self.constraints[i] for i in request], texts, self.errors[request]
        )
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
            "output_tokens": self.output_tokens,
            "output_rows": int(sum(len(s) if s else 1 for s in self.samples)),
            "timed_out_rows": len(unfinished),
            "timed_out_ids": [str(ids.iloc[i]) for i in unfinished],
            "prefix_cache_queries": self.prefix_cache[0],
            "prefix_cache_hits": self.prefix_cache[1],
            "structured_rows": structured_rows,
            "structured_valid": structured_valid,
            "rank": rank,
            "worker": worker,
            "partition": partition,
            "attempts": self.attempt,
            "started": self.started,
            "finished": time.time(),
        }


class Logprobs(NamedTuple):
    """One sequence's logprobs (a sample's or a prompt's), compact: per position the range of its
    entries; per entry (the position's token first, then vLLM's top alternatives) its id,
    logprob, rank and text."""

    starts: np.ndarray
    ends: np.ndarray
    token_ids: np.ndarray
    logprobs: np.ndarray
    ranks: np.ndarray
    tokens: list

    @classmethod
    def of(cls, logprobs: Any) -> Logprobs | None:
        """From vLLM's ``FlatLogprobs`` (or its list of dicts); None when none were asked for."""
        if logprobs is None:
            return None
        from vllm.logprobs import FlatLogprobs

        if not isinstance(logprobs, FlatLogprobs):
            flat = FlatLogprobs()
            flat.extend(logprobs)
            logprobs = flat
        return cls(
            np.asarray(logprobs.start_indices, dtype=np.int64),
            np.asarray(logprobs.end_indices, dtype=np.int64),
            np.asarray(logprobs.token_ids, dtype=np.int32),
            np.asarray(logprobs.logprobs, dtype=np.float32),
            _ranks(logprobs.ranks),
            list(logprobs.decoded_tokens),
        )


def _ranks(ranks: list) -> np.ndarray:
    try:
        return np.asarray(ranks, dtype=np.int32)
    except TypeError:  # a rank vLLM did not compute (None)
        return np.asarray([-1 if r is None else r for r in ranks], dtype=np.int32)


class Sample(NamedTuple):
    """One of a request's n generations."""

    text: str
    tokens: int
    finish_reason: str | None
    cumulative_logprob: float | None
    logprobs: Logprobs | None


def result_array(name: str, values: Any, dtype: Any) -> Any:
    """A result column's values as the array its dtype holds; the logprobs columns as Arrow data,
    which the writer stores with no Python object per token (the lazy API makes them objects)."""
    if name in LOGPROB_COLUMNS:
        return pd.arrays.ArrowExtensionArray(logprobs_array(values))
    return pd.array(values, dtype=dtype)


def logprobs_array(sequences: list[Logprobs | None]):
    """One Arrow list of token logprobs per sequence (null for None), built column-wise from the
    sequences' flat arrays: no Python object per token."""
    import pyarrow as pa

    kind = arrow_type("logprobs")
    token, alternative = kind.value_type, kind.value_type.field("top").type.value_type
    present = [s for s in sequences if s is not None]
    lengths = np.array([len(s.starts) if s is not None else 0 for s in sequences], dtype=np.int64)
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    missing = pa.array([s is None for s in sequences])
    entries = sum(len(s.token_ids) for s in present)
    if not entries:  # no logprobs asked for, or only prompts of one token (no logprob)
        return pa.ListArray.from_arrays(offsets, pa.nulls(int(lengths.sum()), token), type=kind, mask=missing)
    shift = np.cumsum([0] + [len(s.token_ids) for s in present[:-1]])
    starts = np.concatenate([s.starts + k for s, k in zip(present, shift, strict=True)])
    counts = np.concatenate([s.ends + k for s, k in zip(present, shift, strict=True)]) - starts
    fields = (
        np.concatenate([s.token_ids for s in present]),
        pa.array([t for s in present for t in s.tokens], pa.string()),
        np.concatenate([s.logprobs for s in present]),
        np.concatenate([s.ranks for s in present]),
    )

    def structs(index: np.ndarray, kind, more=(), mask=None):
        ids, tokens, logprobs, ranks = fields
        columns = [pa.array(ids[index]), tokens.take(pa.array(index)), pa.array(logprobs[index])]
        return pa.StructArray.from_arrays(
            [*columns, pa.array(ranks[index]), *more], fields=list(kind), mask=mask
        )

    # A position's own token is its first entry. Its alternatives are all its entries without
    # the repeat of its own token when that is among the top K, as in vLLM's dicts.
    position = np.repeat(np.arange(len(starts)), counts)  # each entry's position
    own = starts[position]
    ids = fields[0]
    kept = np.flatnonzero((np.arange(entries) == own) | (ids != ids[own]))
    top_offsets = np.concatenate([[0], np.cumsum(np.bincount(position[kept], minlength=len(starts)))])
    top = pa.ListArray.from_arrays(pa.array(top_offsets.astype(np.int32)), structs(kept, alternative))
    empty = counts == 0  # the prompt's first token, which has no logprob
    positions = structs(np.where(empty, 0, starts), token, [top], mask=pa.array(empty))
    return pa.ListArray.from_arrays(offsets, positions, type=kind, mask=missing)
