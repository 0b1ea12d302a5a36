"""Look at a finished run: the tables and figures behind ``daskdp report`` and the notebook.

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

from daskdp import io
from daskdp.errors import UserError
from daskdp.generation import RESULT_DTYPES

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# What the figures and the error table need: no prompts or generated text, so a large run fits in memory.
ANALYSIS_COLUMNS = ["id", "rank", "prompt_tokens", "output_tokens", "finish_reason", "error", "finished_at"]
MAX_TIMELINE_POINTS = 100_000
ERROR_ROWS_SHOWN = 100


def load(path: str | os.PathLike, columns: list[str] | None = None) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The results (a pandas DataFrame) and the summary of the run in ``path``.

    Parameters
    ----------
    path
        The output directory of a finished ``daskdp run``; any fsspec URL.
    columns
        Read only these result columns (those missing from the results are skipped).

    Examples
    --------
    >>> results, summary = daskdp.report.load("prompts.out")  # doctest: +SKIP
    """
    from daskdp.api import read_results, read_summary

    try:
        summary = read_summary(path)
    except (FileNotFoundError, NotADirectoryError):
        raise UserError(
            f"{os.fspath(path)} is not the output of a finished daskdp run (no {io.SUMMARY_FILE}); "
            "give the -o/--output directory of `daskdp run`"
        ) from None
    frame = read_results(path)
    if columns is not None:
        frame = frame[[c for c in columns if c in frame.columns]]
    return frame.compute().reset_index(drop=True), summary


def summary_table(summary: dict[str, Any]) -> pd.DataFrame:
    """The run's totals and each rank's share, one row each.

    The run's ``seconds`` are its wall time (cluster start and engine loading included); a
    rank's are its busy time, generating and writing its partitions.
    """
    per_rank = _per_rank(summary)
    run = {
        "rows": summary["rows"],
        "error rows": summary["error_rows"],
        "prompt tokens": summary["prompt_tokens"],
        "output tokens": summary["output_tokens"],
        "seconds": summary["wall_seconds"],
        "output tok/s": summary["output_tokens_per_second"],
    }
    ranks = pd.DataFrame(
        {
            "rows": per_rank["rows"],
            "error rows": per_rank["error_rows"],
            "output tokens": per_rank["output_tokens"],
            "seconds": per_rank["busy_seconds"],
            "output tok/s": per_rank["tokens_per_second"],
        }
    ).set_axis([f"rank {rank} (busy)" for rank in per_rank.index])
    table = pd.concat([pd.DataFrame([run], index=["run (wall)"]), ranks])
    counts = ["rows", "error rows", "prompt tokens", "output tokens"]
    return table.astype(dict.fromkeys(counts, "Int64")).round({"seconds": 1, "output tok/s": 1})


def format_table(table: pd.DataFrame) -> str:
    """``table`` as aligned text, as ``daskdp report`` prints it."""
    return _as_text(table).to_string()


def timeline_figure(results: pd.DataFrame, summary: dict[str, Any]) -> Figure:
    """Which partition ran when on which rank, with each row's finish time as a point.

    Idle ranks show as gaps after their bars, stragglers as bars that end late. Rows without
    a finish time (error rows) have no point; above 100,000 rows a random sample is drawn.
    """
    from matplotlib.figure import Figure

    partitions = pd.DataFrame(summary["partitions"])
    ranks = sorted(int(rank) for rank in summary["ranks"])
    start = partitions["started"].min()
    span = partitions["finished"].max() - start
    fig = Figure(figsize=(9, 1.6 + 0.45 * len(ranks)), layout="constrained")
    ax = fig.subplots()
    for part in partitions.itertuples():
        ax.broken_barh(
            [(part.started - start, part.finished - part.started)],
            (part.rank - 0.35, 0.7),
            facecolor="#c6dbef",
            edgecolor="#3182bd",
        )
        ax.annotate(
            f"partition {part.partition}",
            (part.started - start, part.rank - 0.35),
            xytext=(2, 2),
            textcoords="offset points",
            va="bottom",
            fontsize=8,
        )
    finished = _numbers(results, ["rank", "finished_at"]).dropna()
    if len(finished) > MAX_TIMELINE_POINTS:
        finished = finished.sample(MAX_TIMELINE_POINTS, random_state=0)
    jitter = np.random.default_rng(0).uniform(-0.25, 0.25, len(finished))
    ax.plot(
        finished["finished_at"] - start,
        finished["rank"] + jitter,
        ".",
        color="#e6550d",
        markersize=3,
        alpha=0.6,
        label=f"a row finished ({len(finished):,} rows)",
    )
    ax.set_yticks(ranks, [f"rank {rank}" for rank in ranks])
    ax.set_ylim(max(ranks) + 0.6, min(ranks) - 0.6)
    ax.set_xlim(left=0)
    ax.set_xlabel("seconds since the first partition started")
    ax.set_title(f"Partitions on ranks: {span:,.1f} s generating, {summary['wall_seconds']:,.1f} s wall time")
    fig.legend(loc="outside lower right", fontsize=8, frameon=False)
    return fig


def throughput_figure(summary: dict[str, Any]) -> Figure:
    """Output tokens per second of busy time, per rank."""
    from matplotlib.figure import Figure

    per_rank = _per_rank(summary)
    fig = Figure(figsize=(max(4.5, 1 + 0.6 * len(per_rank)), 3.5), layout="constrained")
    ax = fig.subplots()
    bars = ax.bar([f"rank {rank}" for rank in per_rank.index], per_rank["tokens_per_second"], color="#3182bd")
    ax.bar_label(bars, labels=[f"{rate:,.0f}" for rate in per_rank["tokens_per_second"]], fontsize=8)
    ax.yaxis.set_major_formatter("{x:,.0f}")
    ax.set_ylabel("output tokens / s of busy time")
    ax.set_title("Output tokens per second per rank")
    ax.margins(y=0.15)
    return fig


def lengths_figure(results: pd.DataFrame) -> Figure:
    """Distributions of prompt and output lengths, in tokens, of the rows without an error."""
    from matplotlib.figure import Figure

    fine = _numbers(results[results["error"].isna()], ["prompt_tokens", "output_tokens"])
    fig = Figure(figsize=(9, 3.5), layout="constrained")
    for ax, column, name in zip(fig.subplots(1, 2), fine.columns, ["Prompt", "Output"], strict=True):
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
    from matplotlib.figure import Figure

    reasons = results["finish_reason"].astype(object).where(results["error"].isna(), "error")
    counts = reasons.fillna("none").value_counts().sort_values()
    fig = Figure(figsize=(6, 1.4 + 0.4 * len(counts)), layout="constrained")
    ax = fig.subplots()
    colors = ["#de2d26" if reason == "error" else "#3182bd" for reason in counts.index]
    bars = ax.barh(counts.index, counts.to_numpy(), color=colors)
    ax.bar_label(bars, labels=[f"{n:,} ({n / len(results):.0%})" for n in counts], fontsize=8, padding=2)
    ax.set_xlabel("rows")
    ax.set_title("Finish reasons")
    ax.margins(x=0.2)
    return fig


def error_table(results: pd.DataFrame) -> pd.DataFrame:
    """The rows with an error: their id and the reason."""
    columns = [c for c in ("id", "error") if c in results.columns]
    return results.loc[results["error"].notna(), columns].reset_index(drop=True)


def sample_table(results: pd.DataFrame, n: int = 10, seed: int = 0) -> pd.DataFrame:
    """``n`` rows without an error, drawn at random: their input columns beside the generated text."""
    fine = results[results["error"].isna()]
    inputs = [c for c in results.columns if c not in RESULT_DTYPES]
    picked = fine.sample(min(n, len(fine)), random_state=seed).sort_index()
    return picked[[*inputs, "generated_text"]].reset_index(drop=True)


def write_report(path: str | os.PathLike, sample_rows: int = 10) -> str:
    """Write ``_report.html`` into the results directory ``path``; return where it is.

    The report is one self-contained file: the summary table, the figures as embedded PNGs,
    the error rows and a sample of generations from the first shard. Only the columns the
    figures need are read in full, so large runs fit in memory.

    Examples
    --------
    >>> daskdp.report.write_report("prompts.out")  # doctest: +SKIP
    'prompts.out/_report.html'
    """
    import fsspec

    from daskdp.api import read_results

    results, summary = load(path, ANALYSIS_COLUMNS)
    sample = sample_table(read_results(path).partitions[0].compute(), sample_rows)
    errors = error_table(results)
    started = datetime.datetime.fromtimestamp(summary["started"]).astimezone()
    figures = [
        ("Ranks over time", _TIMELINE_NOTE, timeline_figure(results, summary)),
        ("Throughput per rank", _THROUGHPUT_NOTE, throughput_figure(summary)),
        ("Prompt and output lengths", _LENGTHS_NOTE, lengths_figure(results)),
        ("Finish reasons", _REASONS_NOTE, finish_reasons_figure(results)),
    ]
    shown = f"; the first {ERROR_ROWS_SHOWN:,}" if len(errors) > ERROR_ROWS_SHOWN else ""
    sections = [
        f"<h1>daskdp run: {html.escape(str(summary['output']))}</h1>",
        _definitions(
            {
                "input": summary["input"],
                "model": summary["model"],
                "started": started.isoformat(sep=" ", timespec="seconds"),
                "sampling": _settings(summary["sampling"]),
                "engine": _settings(summary["engine"]),
            }
        ),
        "<h2>Summary</h2>",
        _as_text(summary_table(summary)).to_html(),
        *(f"<h2>{title}</h2><p>{note}</p>{_png(figure)}" for title, note, figure in figures),
        f"<h2>Error rows ({len(errors):,}{shown})</h2>",
        errors.head(ERROR_ROWS_SHOWN).to_html(index=False) if len(errors) else "<p>None.</p>",
        "<h2>Sample of generations</h2>",
        f"<p>{len(sample):,} rows without an error from the first shard, beside their input.</p>",
        sample.to_html(index=False, na_rep=""),
    ]
    page = _PAGE.format(title=html.escape(f"daskdp report: {summary['output']}"), body="\n".join(sections))
    target = f"{os.fspath(path).rstrip('/')}/{io.REPORT_FILE}"
    with fsspec.open(target, "w", encoding="utf-8") as f:
        f.write(page)
    return target


def _per_rank(summary: dict[str, Any]) -> pd.DataFrame:
    """Rows, error rows, output tokens, busy seconds and output tokens/s by rank."""
    partitions = pd.DataFrame(summary["partitions"])
    sums = partitions.groupby("rank")[["error_rows", "output_tokens"]].sum()
    ranks = pd.DataFrame.from_dict(summary["ranks"], orient="index")
    ranks.index = ranks.index.astype(int)
    per_rank = ranks.join(sums).sort_index()
    busy = per_rank["busy_seconds"]
    return per_rank.assign(tokens_per_second=(per_rank["output_tokens"] / busy.where(busy > 0)).fillna(0.0))


def _numbers(frame: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """``columns`` of ``frame`` as float64, nulls as NaN, for matplotlib."""
    return pd.DataFrame({c: frame[c].to_numpy(dtype="float64", na_value=np.nan) for c in columns})


def _as_text(table: pd.DataFrame) -> pd.DataFrame:
    """Numbers as text: thousands separated, floats to one decimal, nothing where missing."""

    def cell(value: Any) -> str:
        if pd.isna(value):
            return ""
        return f"{value:,.1f}" if isinstance(value, float) else f"{value:,}"

    return table.astype(object).map(cell)


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
    "Each bar is one partition on the rank that generated it; each dot is a row finishing. "
    "A rank with nothing after its bar was idle while others worked; a bar ending late is a straggler."
)
_THROUGHPUT_NOTE = "Output tokens generated by each rank, divided by the seconds its partitions ran."
_LENGTHS_NOTE = "Tokens in each prompt (after the chat template) and in each output; error rows left out."
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
