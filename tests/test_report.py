"""`daskdp report`, the report `daskdp run` writes, and notebooks/analysis.ipynb, on a real run."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import sys
import time
from io import BytesIO

import pandas as pd
import pytest

from conftest import PARITY_PROMPTS, REPO, daskdp_cli
from daskdp.output.directory import check_output
from daskdp.output.schema import CHUNK_FILE, REPORT_FILE, SUMMARY_FILE, result_dtypes
from daskdp.output.summary import write_summary

NOTEBOOK = REPO / "notebooks" / "analysis.ipynb"
FIGURES = 4  # ranks over time, tokens/s per rank, lengths, finish reasons
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
BAD_ROWS = [
    {"id": "bad-null", "prompt": None},
    {"id": "bad-empty", "prompt": ""},
    {"id": "bad-int", "prompt": 42},
]


@pytest.fixture(scope="module")
def run(tmp_path_factory, cluster):
    """One `daskdp run` on the two ranks of the shared warm cluster, with a few rows that cannot be
    generated."""
    directory = tmp_path_factory.mktemp("report")
    source = directory / "prompts.jsonl"
    rows = [{"id": f"ok-{i}", "prompt": prompt} for i, prompt in enumerate(PARITY_PROMPTS[:30])] + BAD_ROWS
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = directory / "out"
    address = cluster[1].scheduler.address
    done = daskdp_cli("run", source, "-o", out, "--scheduler-address", address, "--max-tokens", 16, "--quiet")
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done


def embedded_pngs(report: str) -> list[bytes]:
    return [
        base64.b64decode(data) for data in re.findall(r'<img src="data:image/png;base64,([^"]+)">', report)
    ]


@pytest.mark.slow
def test_run_writes_the_report(run):
    """`daskdp run` ends by writing the report and saying where; --overwrite accepts it later."""
    out, done = run
    assert done.stdout.strip().splitlines()[-1] == f"report in {out}/{REPORT_FILE}"
    assert len(embedded_pngs((out / REPORT_FILE).read_text())) == FIGURES
    check_output(str(out), resume=False, overwrite=True)  # the report is daskdp's own file, not a stranger's
    assert len(pd.read_parquet(out)) == 30 + len(BAD_ROWS)  # Parquet readers skip it


@pytest.mark.slow
def test_report_command(run):
    """`daskdp report OUT` prints the table and writes a self-contained HTML report."""
    out, _ = run
    (out / REPORT_FILE).unlink()
    done = daskdp_cli("report", out)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "run (wall)" in done.stdout and "rank 1 (busy)" in done.stdout
    assert done.stdout.strip().splitlines()[-1] == f"report in {out}/{REPORT_FILE}"

    report = (out / REPORT_FILE).read_text()
    pngs = embedded_pngs(report)
    assert len(pngs) == FIGURES
    assert all(png.startswith(b"\x89PNG") and len(png) > 5_000 for png in pngs)
    assert "bad-null" in report and "prompt is null" in report and "prompt is int, not text" in report
    assert "Sample of generations" in report and "ok-" in report


@pytest.mark.slow
def test_resumed_run_that_generated_nothing(run, tmp_path, cluster):
    """Resuming a finished run generates nothing; its report says so instead of failing."""
    out, _ = run
    _, client = cluster
    resumed = tmp_path / "out"
    shutil.copytree(out, resumed)
    source = out.parent / "prompts.jsonl"
    address = client.scheduler.address  # a warm cluster: the resume needs one to read the input
    done = daskdp_cli(
        "run",
        source,
        "-o",
        resumed,
        "--scheduler-address",
        address,
        "--max-tokens",
        16,
        "--quiet",
        "--resume",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((resumed / SUMMARY_FILE).read_text())
    assert (summary["rows_generated"], summary["rows_skipped"]) == (0, 30 + len(BAD_ROWS))
    assert summary["chunks"] == [] and summary["ranks"] == {}
    assert done.stdout.strip().splitlines()[-1] == f"report in {resumed}/{REPORT_FILE}"
    report = (resumed / REPORT_FILE).read_text()
    assert len(embedded_pngs(report)) == FIGURES
    assert "bad-null" in report and "rank 0 (busy)" not in report


@pytest.mark.slow
@pytest.mark.parametrize("what", ["missing", "empty directory", "prompts file"])
def test_report_refuses_what_is_not_a_run(tmp_path, what):
    """Anything but the output of a finished run: one line, exit code 2, no traceback."""
    path = {
        "missing": tmp_path / "nothing",
        "empty directory": tmp_path,
        "prompts file": tmp_path / "p.jsonl",
    }
    path["prompts file"].write_text('{"prompt": "hi"}\n')
    done = daskdp_cli("report", path[what])
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("daskdp: error: ") and done.stderr.count("\n") == 1, done.stderr
    assert "not the output of a finished daskdp run" in done.stderr


@pytest.mark.slow
def test_notebook_runs_top_to_bottom(run, monkeypatch):
    """The notebook, committed without outputs, runs on DASKDP_RESULTS and shows every figure.

    Its generation from the notebook shows Dask's progress widget, which hears from the
    scheduler while the rows are computed (nbclient keeps the widgets' state).
    """
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(not cell.outputs and cell.execution_count is None for cell in code), "clear the outputs"

    out, _ = run
    monkeypatch.setenv("DASKDP_RESULTS", str(out))
    NotebookClient(notebook, timeout=300, resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    outputs = [output for cell in code for output in cell.outputs]
    assert not [output for output in outputs if output.output_type == "error"]
    assert not [output for output in outputs if "Traceback" in output.get("text", "")]
    images = [output for output in outputs if "image/png" in output.get("data", {})]
    assert len(images) == FIGURES
    tables = "".join(output.get("data", {}).get("text/html", "") for output in outputs)
    assert "rank 1 (busy)" in tables and "bad-null" in tables

    generating = next(cell for cell in code if "progress(" in cell.source)
    views = [
        output.data[WIDGET_VIEW] for output in generating.outputs if WIDGET_VIEW in output.get("data", {})
    ]
    assert len(views) == 1, generating.outputs
    widgets = notebook.metadata["widgets"][WIDGET_STATE]["state"]
    assert widgets[views[0]["model_id"]]["model_name"] == "VBoxModel"  # distributed's MultiProgressWidget
    bars = [widget["state"] for widget in widgets.values() if widget["model_name"] == "FloatProgressModel"]
    assert bars and all(0 <= bar["value"] <= 1 for bar in bars)  # drawn from the scheduler's reports
    labels = "".join(str(widget["state"].get("value", "")) for widget in widgets.values())
    assert "generate_partition" in labels
    assert "q00" in generating.outputs[-1]["data"]["text/html"]  # the lazy API's first rows


def synthetic_run(path, results: pd.DataFrame, chunks: list[dict], **totals) -> dict:
    """An output directory as `daskdp run` leaves it: ``results`` as chunk 0, and a summary."""
    results.to_parquet(path / CHUNK_FILE.format(0))
    ranks: dict[str, dict] = {}
    for chunk in chunks:
        rank = ranks.setdefault(str(chunk["rank"]), {"rows": 0, "busy_seconds": 0.0})
        rank["rows"] += chunk["rows"]
        rank["busy_seconds"] += chunk["finished"] - chunk["started"]
    rows = len(results)
    summary = {
        "input": "p.jsonl",
        "output": str(path),
        "model": "m",
        "sampling": {},
        "engine": {},
        "started": 0.0,
        "finished": 6.0,
        "wall_seconds": 6.0,
        "rows": rows,
        "rows_done": rows,
        "rows_generated": rows,
        "rows_skipped": 0,
        "error_rows": int(results["error"].notna().sum()),
        "timed_out_rows": 0,
        "timed_out_ids": [],
        "prompt_tokens": int(results["prompt_tokens"].sum()),
        "output_tokens": int(results["output_tokens"].sum()),
        "output_tokens_per_second": 0.0,
        "chunk_rows": rows,
        "chunks": chunks,
        "ranks": ranks,
        **totals,
    }
    write_summary(summary, str(path))
    return summary


def results_frame(n: int, errors: list[str | None]) -> pd.DataFrame:
    results = pd.DataFrame({"id": range(n), "prompt": [f"p{i}" for i in range(n)]}).assign(
        **{
            name: pd.Series([None] * n, dtype=dtype)
            for name, dtype in result_dtypes().items()
            if name != "position"  # never null: set below
        }
    )
    return results.assign(
        position=range(n),
        error=pd.array(errors, dtype="string"),
        rank=pd.array([0] * n, dtype="Int64"),
        prompt_tokens=pd.array([0] * n, dtype="Int64"),
        output_tokens=pd.array([0] * n, dtype="Int64"),
        started_at=5.0,
    )


def test_all_errors_on_one_rank(tmp_path):
    """A run whose every row failed, on one rank, with no finish times: still a full report."""
    from daskdp.report import format_table, load, summary_table, write_report

    n = 3
    results = results_frame(n, ["prompt is null", "prompt is empty", "prompt is null"])
    chunk = {"chunk": 0, "rank": 0, "worker": "tcp://w", "rows": n, "error_rows": n, "output_tokens": 0}
    synthetic_run(tmp_path, results, [chunk | {"started": 5.0, "finished": 5.0}])

    assert write_report(tmp_path) == f"{tmp_path}/{REPORT_FILE}"
    report = (tmp_path / REPORT_FILE).read_text()
    assert len(embedded_pngs(report)) == FIGURES
    assert report.count("prompt is null") == 2
    table = format_table(summary_table(load(tmp_path)[1])).splitlines()
    assert table[0].split() == [
        *["rows", "generated", "skipped", "timed", "out", "error", "rows", "chunks"],
        *["prompt", "tokens", "output", "tokens", "seconds", "output", "tok/s"],
    ]
    assert table[1].split() == ["run", "(wall)", "3", "3", "0", "0", "3", "1", "0", "0", "6.0", "0.0"]
    assert table[2].split() == ["rank", "0", "(busy)", "3", "3", "1", "0", "0.0", "0.0"]


@pytest.mark.parametrize("ranks", [1, 4])
def test_thousands_of_chunks(tmp_path, ranks):
    """2,000 overlapping chunks: lanes, no per-chunk labels, and quickly drawn."""
    from daskdp.report import MAX_LANES, timeline_figure, write_report

    n, per_rank = 20, 2000 // ranks
    results = results_frame(n, [None] * n).assign(
        generated_text=pd.array(["text"] * n, dtype="string"),
        finish_reason=pd.array(["length"] * n, dtype="string"),
        output_tokens=pd.array([8] * n, dtype="Int64"),
        finished_at=pd.array([6.0] * n, dtype="Float64"),
    )
    chunks = [  # a rank starts a chunk every 0.01 s and each runs 0.025 s: three at a time
        {
            "chunk": rank * per_rank + i,
            "rank": rank,
            "worker": f"tcp://w{rank}",
            "rows": 10,
            "error_rows": 0,
            "output_tokens": 80,
            "started": 1.0 + 0.01 * i,
            "finished": 1.025 + 0.01 * i,
        }
        for rank in range(ranks)
        for i in range(per_rank)
    ]
    summary = synthetic_run(tmp_path, results, chunks, wall_seconds=7.0)

    started = time.process_time()
    figure = timeline_figure(results, summary)
    figure.savefig(BytesIO(), format="png")
    assert time.process_time() - started < 10
    ax = figure.axes[0]
    assert not ax.texts  # no chunk numbers
    assert [label.get_text() for label in ax.get_yticklabels()] == [f"rank {r}" for r in range(ranks)]
    assert len(ax.collections) == 3 * ranks < MAX_LANES * ranks  # one collection of bars per lane
    assert "2,000 chunks on ranks" in ax.get_title()

    started = time.process_time()
    write_report(tmp_path)
    assert time.process_time() - started < 30
    assert f"rank {ranks - 1} (busy)" in (tmp_path / REPORT_FILE).read_text()


@pytest.mark.parametrize("what", ["resumed", "timed out"])
def test_nothing_generated(tmp_path, what):
    """A resumed run with nothing left, or one whose every chunk timed out: figures say so."""
    from daskdp.report import format_table, summary_table, timeline_figure, write_report

    n = 3
    results = results_frame(n, [None] * n)
    if what == "resumed":
        totals = {"rows_generated": 0, "rows_skipped": n}
        message = f"{n} of {n} rows had been finished by an earlier run, 0 timed out"
    else:
        totals = {"rows_generated": 0, "rows_done": 0, "timed_out_rows": n, "timed_out_ids": ["0", "1", "2"]}
        message = f"0 of {n} rows had been finished by an earlier run, {n} timed out"
    summary = synthetic_run(tmp_path, results, [], prompt_tokens=0, output_tokens=0, **totals)
    if what == "timed out":
        (tmp_path / CHUNK_FILE.format(0)).unlink()

    assert [text.get_text() for text in timeline_figure(results, summary).axes[0].texts] == [
        f"No chunk finished in this run: {message}"
    ]
    write_report(tmp_path)
    report = (tmp_path / REPORT_FILE).read_text()
    assert len(embedded_pngs(report)) == FIGURES
    table = format_table(summary_table(summary)).splitlines()
    assert len(table) == 2 and "rank" not in table[1]  # no rank generated anything
    if what == "timed out":
        assert "None: no chunk has finished." in report


def test_help_loads_no_plotting():
    """`import daskdp` and `daskdp report --help` import neither matplotlib nor the engine."""
    code = (
        "import sys\nfrom daskdp.cli import main\ntry:\n    main(['report', '--help'])\nexcept SystemExit:\n"
        "    pass\nassert not {'matplotlib', 'vllm', 'torch'} & set(sys.modules), 'heavy imports'"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "daskdp report prompts.out" in done.stdout
