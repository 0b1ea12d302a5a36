"""Look at a finished run: the tables and figures behind ``daskdp report`` and the notebook.

The summary's chunks, ranks and speed are this invocation's (a resumed run shows what it
generated itself); the lengths, finish reasons and error rows are the whole output's.
Figures are plain :class:`matplotlib.figure.Figure` objects, drawn without pyplot (no global
state, no display needed); matplotlib is imported only by the functions that draw.
"""

from __future__ import annotations

import base64
import datetime
import html
import os
from io import BytesIO
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from daskdp.errors import UserError
from daskdp.output.read import chunk_files, read_summary
from daskdp.output.schema import (
    ALL_RESULT_COLUMNS,
    GENERATE,
    LOGPROB_COLUMNS,
    REPORT_FILE,
    SUMMARY_FILE,
    result_meta,
)
from daskdp.output.summary import (
    as_text,
    counted_tokens,
    format_table,
    rank_totals,
    summary_chunks,
    summary_table,
)

__all__ = [
    "error_table",
    "finish_reasons_figure",
    "format_table",
    "labels_figure",
    "lengths_figure",
    "load",
    "norms_figure",
    "sample_table",
    "scores_figure",
    "summary_table",
    "throughput_figure",
    "timeline_figure",
    "write_report",
]

if TYPE_CHECKING:
    import pyarrow.compute
    from fsspec import AbstractFileSystem
    from matplotlib.figure import Figure

# What the figures and the error table need: no prompts or generated text, so a large run fits in memory.
ANALYSIS_COLUMNS = ["id", "rank", "prompt_tokens", "output_tokens", "finish_reason", "error", "finished_at"]
# A pooling task's own figures read these too (embeddings: their norms, read chunk by chunk).
TASK_ANALYSIS_COLUMNS = {"classify": ["label"], "score": ["score"]}
MAX_NORM_ROWS = 20_000  # embeddings whose norms the report reads, whole chunks evenly spaced
MAX_TIMELINE_POINTS = 100_000
MAX_REPORT_ROWS = 100_000  # the figures of larger runs read a sample of chunks: memory stays flat
MAX_LABELLED_CHUNKS = 40
MAX_LANES = 8
ERROR_ROWS_SHOWN = 100


def load(
    path: str | os.PathLike, columns: list[str] | None = None, max_rows: int | None = None
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The results (a pandas DataFrame) and the summary of the run in ``path``.

    Parameters
    ----------
    path
        The output directory of a finished ``daskdp run``; any fsspec URL.
    columns
        Read only these result columns (those missing from the results are skipped).
    max_rows
        Read about this many rows at most: evenly spaced whole chunks, for figures of
        distributions that need not read every row of a large run.

    Examples
    --------
    >>> results, summary = daskdp.report.load("prompts.out")  # doctest: +SKIP
    """
    results, summary, _, _ = _load(path, columns, max_rows)
    return results, summary


def _load(
    path: str | os.PathLike, columns: list[str] | None, max_rows: int | None
) -> tuple[pd.DataFrame, dict[str, Any], AbstractFileSystem, list[str]]:
    """`load`, and the filesystem and every chunk file of ``path``, for reading more of them."""
    try:
        summary = read_summary(path)
    except (FileNotFoundError, NotADirectoryError):
        raise UserError(
            f"{os.fspath(path)} is not the output of a finished daskdp run (no {SUMMARY_FILE}); "
            "give the -o/--output directory of `daskdp run`"
        ) from None
    fs, files = chunk_files(path)
    read = files
    if max_rows is not None and len(files) * summary["chunk_rows"] > max_rows:
        keep = max(1, max_rows // summary["chunk_rows"])
        read = [files[i] for i in np.linspace(0, len(files) - 1, keep).round().astype(int)]
    return _read_chunks(fs, read, columns), summary, fs, files


def _read_chunks(
    fs: AbstractFileSystem,
    files: list[str],
    columns: list[str] | None = None,
    filters: pyarrow.compute.Expression | None = None,
) -> pd.DataFrame:
    """Chunk files read into one pandas DataFrame, only the rows ``filters`` keeps.

    With pandas, not Dask, which spends milliseconds a file planning what it reads in one.
    """
    import pyarrow.parquet as pq

    if not files:  # no chunk finished: every one timed out
        frame = result_meta(pd.DataFrame({"id": pd.Series(dtype=object)}))
        return frame if columns is None else frame[[column for column in columns if column in frame]]
    if columns is not None:
        names = pq.read_schema(files[0], filesystem=fs).names
        columns = [column for column in columns if column in names]
    return pd.read_parquet(files, columns=columns, filters=filters, filesystem=fs).reset_index(drop=True)


def timeline_figure(results: pd.DataFrame, summary: dict[str, Any]) -> Figure:
    """Which chunk ran when on which rank, with each row's finish time as a point.

    A rank keeps its engine full across chunk boundaries, so its chunks overlap in time: each
    chunk is a thin bar in a lane of its rank's band, no two overlapping in a lane (up to 8
    lanes; beyond that, a chunk shares the lane that freed first). Idle ranks show as gaps,
    stragglers as bars that end late. Chunks are numbered when there are at most 40; rows an
    earlier run finished have no point, and above 100,000 points a random sample is drawn.
    """
    chunks = summary_chunks(summary)
    if chunks.empty:
        return _message_figure("Chunks on ranks", _nothing_generated(summary))
    ranks = sorted(chunks["rank"].unique())
    position = {rank: i for i, rank in enumerate(ranks)}
    chunks["lane"] = _lanes(chunks)
    lanes = chunks.groupby("rank")["lane"].transform("max") + 1
    chunks["height"] = 0.8 / lanes
    chunks["y"] = chunks["rank"].map(position) - 0.4 + chunks["lane"] * chunks["height"]
    start = chunks["started"].min()
    span = chunks["finished"].max() - start
    labelled = len(chunks) <= MAX_LABELLED_CHUNKS

    fig = _figure(9, 1.8 + len(ranks) * (0.25 + 0.12 * lanes.max()), bottom=0.8)
    ax = fig.subplots()
    for (_, lane), bars in chunks.groupby(["rank", "lane"]):
        ax.broken_barh(
            list(zip(bars["started"] - start, bars["finished"] - bars["started"], strict=True)),
            (bars["y"].iloc[0], bars["height"].iloc[0] * 0.85),
            facecolor=("#9ecae1", "#4292c6")[lane % 2],
            edgecolor="white" if labelled else "none",
            linewidth=0.5,
        )
    if labelled:
        for bar in chunks.itertuples():
            ax.annotate(
                str(bar.chunk),
                (bar.started - start, bar.y + bar.height * 0.425),
                xytext=(2, 0),
                textcoords="offset points",
                va="center",
                fontsize=6,
                annotation_clip=True,
            )
    finished = _numbers(results, ["rank", "finished_at"]).dropna()
    finished = finished[finished["finished_at"] >= summary["started"]]  # this invocation's rows
    if len(finished) > MAX_TIMELINE_POINTS:
        finished = finished.sample(MAX_TIMELINE_POINTS, random_state=0)
    jitter = np.random.default_rng(0).uniform(-0.4, 0.4, len(finished))
    ax.plot(
        finished["finished_at"] - start,
        finished["rank"].map(position) + jitter,
        ".",
        color="#e6550d",
        markersize=2,
        alpha=0.5,
        label=f"a row finished ({len(finished):,} rows)",
    )
    ax.set_yticks(range(len(ranks)), [f"rank {rank}" for rank in ranks])
    ax.set_ylim(len(ranks) - 0.5, -0.5)
    ax.set_xlim(left=0)
    ax.set_xlabel("seconds since the first chunk started")
    ax.set_title(
        f"{len(chunks):,} chunks on ranks: {span:,.1f} s generating, {summary['wall_seconds']:,.1f} s wall time"
    )
    fig.legend(loc="lower right", fontsize=8, frameon=False)
    return fig


def throughput_figure(summary: dict[str, Any]) -> Figure:
    """Output tokens (prompt tokens, for a pooling task) per second of busy time, per rank,
    from the chunks it generated."""
    per_rank = rank_totals(summary)
    counted = counted_tokens(summary)
    if per_rank.empty:
        return _message_figure(f"{counted.title()} tokens per second per rank", _nothing_generated(summary))
    fig = _figure(max(4.5, 1.5 + 0.6 * len(per_rank)), 3.5, left=1.1)
    ax = fig.subplots()
    bars = ax.bar([f"rank {rank}" for rank in per_rank.index], per_rank["tokens_per_second"], color="#3182bd")
    ax.bar_label(bars, labels=[f"{rate:,.0f}" for rate in per_rank["tokens_per_second"]], fontsize=8)
    ax.yaxis.set_major_formatter("{x:,.0f}")
    ax.set_ylabel(f"{counted} tokens / s of busy time")
    ax.set_title(f"{counted.title()} tokens per second per rank")
    ax.margins(y=0.15)
    return fig


def lengths_figure(results: pd.DataFrame) -> Figure:
    """Distributions of prompt and output lengths, in tokens, of the rows without an error
    (prompt lengths only for a pooling task, which has no output)."""
    columns = [c for c in ("prompt_tokens", "output_tokens") if c in results]
    fine = _numbers(results[results["error"].isna()], columns)
    fig = _figure(9 if len(columns) == 2 else 5, 3.5)
    axes = np.atleast_1d(fig.subplots(1, len(columns)))
    for ax, column, name in zip(axes, fine.columns, ["Prompt", "Output"][: len(columns)], strict=True):
        values = fine[column].dropna()
        ax.set_xlabel("tokens")
        ax.set_ylabel("rows")
        ax.yaxis.get_major_locator().set_params(integer=True)
        if values.empty:
            ax.set_title(f"{name} length")
            ax.text(0.5, 0.5, "no rows without an error", ha="center", va="center", transform=ax.transAxes)
            continue
        low, high = values.min(), values.max()
        bins = np.arange(low - 0.5, high + 1.5) if high - low <= 60 else 50
        ax.hist(values, bins=bins, color="#3182bd")
        ax.set_xlim(left=0)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_title(f"{name} length (median {values.median():,.0f}, max {high:,.0f})")
    return fig


def finish_reasons_figure(results: pd.DataFrame) -> Figure:
    """Rows by finish reason (``stop``, ``length``), error rows counted as ``error``."""
    if results.empty:
        return _message_figure("Finish reasons", "No rows in the results: no chunk has finished")
    reasons = results["finish_reason"].astype(object).where(results["error"].isna(), "error")
    counts = reasons.fillna("none").value_counts().sort_values()
    fig = _figure(6, 1.4 + 0.4 * len(counts))
    ax = fig.subplots()
    colors = ["#de2d26" if reason == "error" else "#3182bd" for reason in counts.index]
    bars = ax.barh(counts.index, counts.to_numpy(), color=colors)
    ax.bar_label(bars, labels=[f"{n:,} ({n / len(results):.0%})" for n in counts], fontsize=8, padding=2)
    ax.set_xlabel("rows")
    ax.set_title("Finish reasons")
    ax.margins(x=0.2)
    return fig


def norms_figure(norms: np.ndarray, dimension: int | None) -> Figure:
    """The embeddings' L2 norms (all 1 when normalised), and their one dimension."""
    fig = _figure(6, 3.5)
    ax = fig.subplots()
    ax.set_xlabel("L2 norm")
    ax.set_ylabel("rows")
    if not len(norms):
        ax.set_title("Embedding norms")
        ax.text(0.5, 0.5, "no rows without an error", ha="center", va="center", transform=ax.transAxes)
        return fig
    ax.hist(norms, bins=50 if np.ptp(norms) > 1e-6 else 1, color="#3182bd")
    ax.set_title(
        f"Norms of {len(norms):,} embeddings of dimension {dimension} "
        f"(median {np.median(norms):.4g}, {norms.min():.4g} to {norms.max():.4g})"
    )
    return fig


def labels_figure(results: pd.DataFrame) -> Figure:
    """Rows by predicted label, error rows counted as ``error``."""
    labels = results["label"].astype(object).where(results["error"].isna(), "error")
    return _counts_figure("Labels", labels.fillna("none").value_counts().sort_values(), len(results))


def scores_figure(results: pd.DataFrame) -> Figure:
    """The distribution of the scores of the rows without an error."""
    scores = _numbers(results[results["error"].isna()], ["score"])["score"].dropna()
    fig = _figure(6, 3.5)
    ax = fig.subplots()
    ax.set_xlabel("score")
    ax.set_ylabel("rows")
    if scores.empty:
        ax.set_title("Scores")
        ax.text(0.5, 0.5, "no rows without an error", ha="center", va="center", transform=ax.transAxes)
        return fig
    ax.hist(scores, bins=50, color="#3182bd")
    ax.set_title(f"Scores of {len(scores):,} rows (median {scores.median():.4g})")
    return fig


def _counts_figure(title: str, counts: pd.Series, total: int) -> Figure:
    fig = _figure(6, 1.4 + 0.4 * len(counts))
    ax = fig.subplots()
    colors = ["#de2d26" if name == "error" else "#3182bd" for name in counts.index]
    bars = ax.barh(counts.index, counts.to_numpy(), color=colors)
    ax.bar_label(bars, labels=[f"{n:,} ({n / total:.0%})" for n in counts], fontsize=8, padding=2)
    ax.set_xlabel("rows")
    ax.set_title(title)
    ax.margins(x=0.2)
    return fig


def embedding_norms(fs: AbstractFileSystem, files: list[str], max_rows: int = MAX_NORM_ROWS) -> np.ndarray:
    """The L2 norms of the embeddings of evenly spaced chunk files, about ``max_rows`` at most,
    read one file at a time: the vectors of a large run never meet in memory."""
    import pyarrow.parquet as pq

    if not files:
        return np.zeros(0)
    rows = pq.read_metadata(files[0], filesystem=fs).num_rows or 1
    keep = max(1, min(len(files), max_rows // rows))
    norms = []
    for i in np.unique(np.linspace(0, len(files) - 1, keep).round().astype(int)):
        column = pq.read_table(files[i], columns=["embedding"], filesystem=fs).column("embedding")
        column = column.combine_chunks().drop_null()
        if len(column):
            vectors = column.flatten().to_numpy().reshape(len(column), -1)
            norms.append(np.linalg.norm(vectors.astype(np.float64), axis=1))
    return np.concatenate(norms) if norms else np.zeros(0)


def error_table(results: pd.DataFrame) -> pd.DataFrame:
    """The rows with an error: their id and the reason."""
    columns = [c for c in ("id", "error") if c in results.columns]
    return results.loc[results["error"].notna(), columns].reset_index(drop=True)


def sample_table(results: pd.DataFrame, n: int = 10, seed: int = 0) -> pd.DataFrame:
    """``n`` rows without an error, drawn at random: their input columns beside the generated text."""
    fine = results[results["error"].isna()]
    inputs = [c for c in results.columns if c not in ALL_RESULT_COLUMNS]
    outputs = [c for c in ("generated_text", "label", "score") if c in results]
    picked = fine.sample(min(n, len(fine)), random_state=seed).sort_index()
    if "embedding" in results:  # a vector's first values, not 1,024 of them
        picked = picked.assign(embedding=picked["embedding"].map(_first_values))
        outputs.append("embedding")
    if "probs" in results:
        picked = picked.assign(probs=picked["probs"].map(_first_values))
        outputs.append("probs")
    return picked[[*inputs, *outputs]].reset_index(drop=True)


def _first_values(vector: Any, n: int = 4) -> str:
    values = ", ".join(f"{v:.4f}" for v in list(vector)[:n])
    return f"[{values}{', ...' if len(vector) > n else ''}]"


def write_report(path: str | os.PathLike, sample_rows: int = 10) -> str:
    """Write ``_report.html`` into the results directory ``path``; return where it is.

    The report is one self-contained file: the summary table, the figures as embedded PNGs,
    the error rows and a sample of generations from the first chunk. Only the columns the
    figures need are read in full, so large runs fit in memory.

    Examples
    --------
    >>> daskdp.report.write_report("prompts.out")  # doctest: +SKIP
    'prompts.out/_report.html'
    """
    import fsspec
    import pyarrow.compute
    import pyarrow.parquet as pq

    task = _read_task(path)
    columns = ANALYSIS_COLUMNS + TASK_ANALYSIS_COLUMNS.get(task, [])
    results, summary, fs, files = _load(path, columns, max_rows=MAX_REPORT_ROWS)
    if len(results):
        # The first chunk without its logprobs: tens of thousands of objects the table does not show.
        names = pq.read_schema(files[0], filesystem=fs).names
        columns = [name for name in names if name not in LOGPROB_COLUMNS]
        sample = sample_table(_read_chunks(fs, files[:1], columns), sample_rows)
        samples = (
            f"<p>{len(sample):,} rows without an error from the first chunk, beside their input.</p>"
            + sample.to_html(index=False, na_rep="")
        )
    else:
        samples = "<p>None: no chunk has finished.</p>"
    # Every error row, not only those of the figures' rows; chunks without one are not read.
    with_error = pyarrow.compute.field("error").is_valid()
    errors = error_table(_read_chunks(fs, files, ["id", "error"], filters=with_error))
    sampled = len(results) < summary["rows_done"]
    started = datetime.datetime.fromtimestamp(summary["started"]).astimezone()
    figures = [
        ("Chunks on ranks over time", _TIMELINE_NOTE, timeline_figure(results, summary)),
        ("Throughput per rank", _THROUGHPUT_NOTE, throughput_figure(summary)),
        ("Prompt and output lengths", _LENGTHS_NOTE, lengths_figure(results)),
        *_task_figures(task, results, summary, fs, files),
    ]
    shown = f"; the first {ERROR_ROWS_SHOWN:,}" if len(errors) > ERROR_ROWS_SHOWN else ""
    sections = [
        f"<h1>daskdp run: {html.escape(str(summary['output']))}</h1>",
        _definitions(
            {
                "input": summary["input"],
                "model": summary["model"],
                "started": started.isoformat(sep=" ", timespec="seconds"),
                "chunks": f"of {summary['chunk_rows']:,} rows",
                "task": task,
                **(
                    {
                        "output rows": f"{summary.get('output_rows', summary['rows_done']):,}, a row per sample",
                        "sampling": _settings(summary["sampling"]),
                    }
                    if task == GENERATE
                    else {"pooling": _settings(summary["pooling"])}
                ),
                **({"dimension": summary["dimension"]} if "dimension" in summary else {}),
                "engine": _settings(summary["engine"]),
            }
        ),
        "<h2>Summary</h2>",
        as_text(summary_table(summary)).to_html(),
        f"<p>The figures below read {len(results):,} of the {summary['rows_done']:,} rows: whole chunks "
        "evenly spaced through the output.</p>"
        if sampled
        else "",
        *(f"<h2>{title}</h2><p>{note}</p>{_png(figure)}" for title, note, figure in figures),
        f"<h2>Error rows ({len(errors):,}{shown})</h2>",
        errors.head(ERROR_ROWS_SHOWN).to_html(index=False) if len(errors) else "<p>None.</p>",
        "<h2>Sample of generations</h2>",
        samples,
    ]
    page = _PAGE.format(title=html.escape(f"daskdp report: {summary['output']}"), body="\n".join(sections))
    target = f"{os.fspath(path).rstrip('/')}/{REPORT_FILE}"
    with fsspec.open(target, "w", encoding="utf-8") as f:
        f.write(page)
    return target


def _read_task(path: str | os.PathLike) -> str:
    try:
        return read_summary(path).get("task", GENERATE)
    except (FileNotFoundError, NotADirectoryError):
        return GENERATE  # `_load` says what is missing


def _task_figures(
    task: str, results: pd.DataFrame, summary: dict[str, Any], fs: AbstractFileSystem, files: list[str]
) -> list[tuple[str, str, Figure]]:
    """The figures of what the task wrote: finish reasons, embedding norms, labels or scores."""
    if task == "embed":
        norms = embedding_norms(fs, files)
        return [("Embedding norms", _NORMS_NOTE, norms_figure(norms, summary.get("dimension")))]
    if task == "classify":
        return [("Labels", "Rows by the label of their most probable class.", labels_figure(results))]
    if task == "score":
        return [("Scores", "The score of each pair; error rows left out.", scores_figure(results))]
    return [("Finish reasons", _REASONS_NOTE, finish_reasons_figure(results))]


def _lanes(chunks: pd.DataFrame) -> np.ndarray:
    """Each chunk's lane in its rank's band, so that no two chunks in a lane overlap in time.

    Beyond ``MAX_LANES`` lanes, a chunk goes to its rank's lane that frees first.
    """
    ranks, started, finished = (chunks[c].to_numpy() for c in ("rank", "started", "finished"))
    lanes = np.zeros(len(chunks), dtype=int)
    ends: dict[int, list[float]] = {}  # by rank, when each lane's last chunk finishes
    for i in np.argsort(started, kind="stable"):
        rank_ends = ends.setdefault(ranks[i], [])
        lane = next((k for k, end in enumerate(rank_ends) if end <= started[i]), None)
        if lane is None and len(rank_ends) < MAX_LANES:
            lane = len(rank_ends)
            rank_ends.append(finished[i])
        elif lane is None:
            lane = int(np.argmin(rank_ends))
        rank_ends[lane] = max(rank_ends[lane], finished[i])
        lanes[i] = lane
    return lanes


def _nothing_generated(summary: dict[str, Any]) -> str:
    return (
        f"No chunk finished in this run: {summary['rows_skipped']:,} of {summary['rows']:,} rows "
        f"had been finished by an earlier run, {summary['timed_out_rows']:,} timed out"
    )


def _message_figure(title: str, message: str) -> Figure:
    """A figure that says why there is nothing to draw."""
    fig = _figure(9, 1.6)
    ax = fig.subplots()
    ax.set_axis_off()
    ax.set_title(title)
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes)
    return fig


def _figure(width: float, height: float, *, left: float = 0.8, bottom: float = 0.6) -> Figure:
    """A figure of ``width`` x ``height`` inches with fixed margins (``left``, ``bottom`` in inches).

    Margins fitted to the text (matplotlib's layout engines) took half of a report's time.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    fig.subplots_adjust(
        left=left / width, right=1 - 0.3 / width, bottom=bottom / height, top=1 - 0.45 / height, wspace=0.25
    )
    return fig


def _numbers(frame: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """``columns`` of ``frame`` as float64, nulls as NaN, for matplotlib."""
    return pd.DataFrame({c: frame[c].to_numpy(dtype="float64", na_value=np.nan) for c in columns})


def _png(figure: Figure) -> str:
    buffer = BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return f'<img src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}">'


def _settings(settings: dict[str, Any]) -> str:
    return ", ".join(f"{key}={value}" for key, value in settings.items())


def _definitions(items: dict[str, str]) -> str:
    rows = "".join(f"<dt>{key}</dt><dd>{html.escape(str(value))}</dd>" for key, value in items.items())
    return f"<dl>{rows}</dl>"


_TIMELINE_NOTE = (
    "The chunks this run generated: each bar is one chunk (numbered when there are few) in a lane "
    "of the rank that generated it; a rank's chunks overlap because it starts the next chunk while "
    "the last rows of one finish. Each dot is a row finishing. A rank with nothing after its bars "
    "was idle while others worked; bars ending late are stragglers."
)
_THROUGHPUT_NOTE = (
    "Output tokens each rank generated in this run, divided by the seconds it had a chunk running."
)
_LENGTHS_NOTE = "Tokens in each prompt (after the chat template) and in each output; error rows left out."
_NORMS_NOTE = (
    "The L2 norm of each embedding (1 when normalised), read from evenly spaced chunks; error rows "
    "left out. A norm far from the rest marks a text the model handles differently."
)
_REASONS_NOTE = "<code>stop</code>: EOS or a stop string; <code>length</code>: the max-tokens limit."
_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 960px; margin: 2em auto; padding: 0 1em; }}
table {{ border-collapse: collapse; font-size: 0.9em; }}
th, td {{ border: 1px solid #ccc; padding: 0.2em 0.6em; vertical-align: top; }}
td {{ max-width: 40em; overflow-wrap: anywhere; }}
dt {{ font-weight: bold; float: left; width: 6em; }}
dd {{ margin-left: 7em; }}
img {{ max-width: 100%; }}
</style>
</head>
<body>
{body}
</body>
</html>
"""
