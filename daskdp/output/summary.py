"""The run's summary: built from the chunk records, written to ``_summary.json``, checked, and
shown as ONE table (`summary_table`) that ``daskdp run``, ``daskdp report`` and the HTML report
all print."""

from __future__ import annotations

import itertools
import json
import math
import posixpath
import time
from typing import TYPE_CHECKING, Any

import pandas as pd

from daskdp.errors import RunError
from daskdp.output.chunks import read_records
from daskdp.output.manifest import redacted
from daskdp.output.schema import SUMMARY_FILE, TIMED_OUT

if TYPE_CHECKING:
    from daskdp.plan import Layout


def summarize(
    records: pd.DataFrame,
    earlier: dict[int, dict[str, Any]],
    output: str,
    layout: Layout,
    source: str,
    model: str,
    settings: dict[str, Any],
    started: float,
) -> dict[str, Any]:
    """The run's summary: totals over the output, and this run's chunks, ranks and speed."""
    wall = time.time() - started
    finished = read_records(output)
    generated = [record for chunk, record in finished.items() if chunk not in earlier]
    timed_out = records[records["status"] == TIMED_OUT]
    output_tokens = sum(record["output_tokens"] for record in generated)
    prompt_tokens = sum(record["prompt_tokens"] for record in generated)
    task = settings["run"]["task"]
    return {
        "input": source,
        "output": output,
        "model": model,
        "task": task,
        **({"sampling": settings["sampling"]} if task == "generate" else {"pooling": settings["pooling"]}),
        **({"dimension": embedding_dimension(output)} if task == "embed" else {}),
        "engine": redacted(settings["engine"]),
        "started": started,
        "finished": time.time(),
        "wall_seconds": round(wall, 3),
        "rows": layout.rows,
        "rows_done": sum(record["rows"] for record in finished.values()),
        # A row per sample (n per prompt), one per failed request: the rows of the chunk files.
        "output_rows": sum(record.get("output_rows", record["rows"]) for record in finished.values()),
        "rows_generated": sum(record["rows"] for record in generated),
        "rows_skipped": sum(record["rows"] for record in earlier.values()),
        "error_rows": sum(record["error_rows"] for record in finished.values()),
        "timed_out_rows": int(timed_out["timed_out_rows"].sum()),
        "timed_out_ids": [i for ids in timed_out["timed_out_ids"] for i in ids],
        "prompt_tokens": prompt_tokens,
        "output_tokens": output_tokens,
        "output_tokens_per_second": round(output_tokens / wall, 1) if wall else 0.0,
        "prompt_tokens_per_second": round(prompt_tokens / wall, 1) if wall else 0.0,
        "prefix_cache_hit_rate": hit_rate(generated),
        **structured_totals(finished.values()),
        "chunk_rows": layout.chunk_rows,
        "chunks": [
            {key: record[key] for key in CHUNK_SUMMARY_KEYS}
            for record in sorted(generated, key=lambda record: record["chunk"])
        ],
        "ranks": busy_by_rank(generated),
    }


def embedding_dimension(output: str) -> int | None:
    """The run's one embedding dimension, from the Arrow type of a chunk file's ``embedding``."""
    import pyarrow.parquet as pq

    from daskdp.output.read import chunk_files

    fs, files = chunk_files(output)
    if not files:
        return None
    return pq.read_schema(files[0], filesystem=fs).field("embedding").type.list_size


def counted_tokens(summary: dict[str, Any]) -> str:
    """The tokens a run's speed is counted in: output tokens when generating, prompt tokens
    when pooling (no output)."""
    return "output" if summary.get("task", "generate") == "generate" else "prompt"


CHUNK_SUMMARY_KEYS = (
    "chunk",
    "partition",
    "rank",
    "worker",
    "rows",
    "error_rows",
    "prompt_tokens",
    "output_tokens",
    "started",
    "finished",
)

CHUNK_COLUMNS = [key for key in CHUNK_SUMMARY_KEYS if key != "partition"]


def busy_by_rank(records: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Rows and busy seconds by rank; chunks that overlap in time count once."""
    ranks: dict[int, dict[str, Any]] = {}
    for rank, chunks in itertools.groupby(
        sorted(records, key=lambda r: (r["rank"], r["started"])), key=lambda r: r["rank"]
    ):
        chunks = list(chunks)
        busy, end = 0.0, -math.inf
        for record in chunks:
            busy += max(0.0, record["finished"] - max(record["started"], end))
            end = max(end, record["finished"])
        ranks[int(rank)] = {
            "rows": sum(r["rows"] for r in chunks),
            "busy_seconds": round(busy, 3),
            "output_tokens": sum(r["output_tokens"] for r in chunks),
            "prefix_cache_hit_rate": hit_rate(chunks),
        }
    return ranks


def structured_totals(records) -> dict[str, Any]:
    """Over the whole output: rows generated under a JSON Schema, regex or choice, how many of
    their texts parse and validate (JSON), match (regex) or are one of the choices, and that
    share (None without such rows). Summed from the chunk records, which the ranks count."""
    records = list(records)
    rows = sum(record.get("structured_rows", 0) for record in records)
    valid = sum(record.get("structured_valid", 0) for record in records)
    return {
        "structured_rows": rows,
        "structured_valid": valid,
        "structured_valid_rate": round(valid / rows, 4) if rows else None,
    }


def hit_rate(records: list[dict[str, Any]]) -> float | None:
    """The fraction of prompt tokens found in the engines' prefix caches; None without lookups."""
    queries = sum(record.get("prefix_cache_queries", 0) for record in records)
    hits = sum(record.get("prefix_cache_hits", 0) for record in records)
    return round(hits / queries, 4) if queries else None


def check_finished(summary: dict[str, Any], max_error_rate: float | None) -> None:
    """Fail a run that left timed-out rows or rows without a result, or more error rows than
    ``max_error_rate`` allows."""
    if summary["timed_out_rows"]:
        ids = summary["timed_out_ids"]
        shown = ", ".join(ids[:10]) + (f" and {len(ids) - 10} more" if len(ids) > 10 else "")
        raise RunError(
            f"{summary['timed_out_rows']} rows timed out after --chunk-timeout and its retries "
            f"(ids {shown}); raise --chunk-timeout",
            resumable=True,
            summary=summary,
        )
    if summary["rows_done"] < summary["rows"]:  # never expected: a chunk no rank wrote
        raise RunError(
            f"{summary['rows'] - summary['rows_done']:,} of {summary['rows']:,} rows have no result "
            "(their chunks were not written)",
            resumable=True,
            summary=summary,
        )
    if max_error_rate is not None and summary["error_rows"] > max_error_rate * summary["rows"]:
        raise RunError(
            f"{summary['error_rows']:,} of {summary['rows']:,} rows are errors, more than "
            f"--max-error-rate {max_error_rate:g} allows; their reasons are in the error column",
            summary=summary,
        )


def write_summary(summary: dict[str, Any], output: str) -> None:
    import fsspec

    fs, path = fsspec.core.url_to_fs(output)
    fs.makedirs(path, exist_ok=True)
    with fs.open(posixpath.join(path, SUMMARY_FILE), "w") as f:
        json.dump(summary, f, indent=2, default=str)
        f.write("\n")


def summary_table(summary: dict[str, Any]) -> pd.DataFrame:
    """The run's totals and each rank's share, one row each.

    The run's ``rows`` are the input's: ``generated`` by this invocation, ``skipped`` because
    the earlier run it resumed had finished them, or ``timed out``; its ``error rows`` are
    the whole output's. Its ``seconds`` are its wall time (cluster start and engine loading
    included); a rank's are its busy time, while it had a chunk to generate or write.
    """
    per_rank = rank_totals(summary)
    counted = counted_tokens(summary)  # output tokens, or prompt tokens for a pooling task
    rate = f"{counted} tok/s"
    run = {
        "rows": summary["rows"],
        "generated": summary["rows_generated"],
        "skipped": summary["rows_skipped"],
        "timed out": summary["timed_out_rows"],
        "error rows": summary["error_rows"],
        "chunks": len(summary["chunks"]),
        "prompt tokens": summary["prompt_tokens"],
        "output tokens": summary["output_tokens"],
        "seconds": summary["wall_seconds"],
        rate: summary[f"{counted}_tokens_per_second"],
    }
    if counted == "prompt":
        del run["output tokens"]
    ranks = pd.DataFrame(
        {
            "generated": per_rank["rows"],
            "error rows": per_rank["error_rows"],
            "chunks": per_rank["chunks"],
            f"{counted} tokens": per_rank[f"{counted}_tokens"],
            "seconds": per_rank["busy_seconds"],
            rate: per_rank["tokens_per_second"],
        }
    ).set_axis([f"rank {rank} (busy)" for rank in per_rank.index])
    if summary.get("structured_rows"):  # only runs with structured output have these columns
        run["structured"] = summary["structured_rows"]
        run["valid structured"] = summary["structured_valid"]
    table = pd.concat([pd.DataFrame([run], index=["run (wall)"]), ranks])
    counts = [column for column in run if column not in ("seconds", rate)]
    return table.astype(dict.fromkeys(counts, "Int64")).round({"seconds": 1, rate: 1})


def format_table(table: pd.DataFrame) -> str:
    """``table`` as aligned text, as ``daskdp report`` prints it."""
    return as_text(table).to_string()


def format_summary(summary: dict[str, Any]) -> str:
    """The end-of-run text ``daskdp run`` prints: `summary_table`'s run row, one figure a line,
    then its ranks' rows."""
    table = as_text(summary_table(summary))
    lines = [f"{name:<15} {value:>12}" for name, value in table.iloc[0].items()]
    if summary.get("prefix_cache_hit_rate") is not None:
        hit_rate = f"{summary['prefix_cache_hit_rate']:.1%}"
        lines.append(f"{'prefix cache':<15} {hit_rate:>12}   (prompt tokens found cached)")
    if summary.get("output_rows", summary["rows_done"]) != summary["rows_done"]:
        samples = f"{summary['output_rows']:,}"
        lines.append(f"{'output rows':<15} {samples:>12}   (a row per sample)")
    if summary.get("structured_valid_rate") is not None:
        valid = f"{summary['structured_valid_rate']:.1%}"
        lines.append(f"{'valid output':<15} {valid:>12}   (structured rows whose text parses and validates)")
    ranks = table.iloc[1:]
    if len(ranks):
        lines.append(ranks.loc[:, (ranks != "").any()].to_string())
    lines.append(f"results in {summary['output']}")
    return "\n".join(lines)


def summary_chunks(summary: dict[str, Any]) -> pd.DataFrame:
    """The chunks this invocation generated, one row each."""
    chunks = pd.DataFrame(summary["chunks"], columns=CHUNK_COLUMNS)
    if chunks["prompt_tokens"].isna().all():  # a summary from before chunks counted them
        chunks["prompt_tokens"] = 0
    return chunks.astype(
        {
            "rank": int,
            "rows": int,
            "error_rows": int,
            "prompt_tokens": int,
            "output_tokens": int,
            "started": float,
            "finished": float,
        }
    )


def rank_totals(summary: dict[str, Any]) -> pd.DataFrame:
    """Rows, chunks, error rows, prompt and output tokens, busy seconds and tokens/s (output
    tokens; prompt tokens when pooling) by rank."""
    per_rank = (
        summary_chunks(summary)
        .groupby("rank")
        .agg(
            rows=("rows", "sum"),
            chunks=("chunk", "size"),
            error_rows=("error_rows", "sum"),
            prompt_tokens=("prompt_tokens", "sum"),
            output_tokens=("output_tokens", "sum"),
        )
    )
    busy = {int(rank): stats["busy_seconds"] for rank, stats in summary["ranks"].items()}
    per_rank["busy_seconds"] = per_rank.index.map(busy).astype(float)
    counted = per_rank[f"{counted_tokens(summary)}_tokens"]
    rate = counted / per_rank["busy_seconds"].where(per_rank["busy_seconds"] > 0)
    return per_rank.assign(tokens_per_second=rate.fillna(0.0))


def as_text(table: pd.DataFrame) -> pd.DataFrame:
    """Numbers as text: thousands separated, floats to one decimal, nothing where missing."""

    def cell(value: Any) -> str:
        if pd.isna(value):
            return ""
        return f"{value:,.1f}" if isinstance(value, float) else f"{value:,}"

    return table.astype(object).map(cell)


def format_samples(results: pd.DataFrame, prompt_column: str, messages_column: str, n: int = 3) -> str:
    """The first ``n`` rows without an error (sample 0 of each), each prompt beside its generation, one line each:
    what ``daskdp run`` shows after its summary."""
    fine = results[results["error"].isna()]
    if "sample" in fine:  # one sample of each prompt: three prompts, not three samples of one
        fine = fine[fine["sample"] == 0]
    fine = fine.head(n)
    lines = []
    for _, row in fine.iterrows():
        prompt = row.get(prompt_column)
        if not isinstance(prompt, str):
            conversation = row.get(messages_column)
            prompt = (
                str(conversation[-1]["content"]) if conversation is not None and len(conversation) else ""
            )
        lines.append(f"> {one_line(prompt, 60)}\n  {one_line(row['generated_text'], 100)}")
    return "\n".join(lines)


def one_line(text: Any, width: int) -> str:
    """``text`` on one line, cut to ``width`` characters with an ellipsis."""
    flat = " ".join(str(text if text is not None else "").split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"
