"""`daskdp report`, the report `daskdp run` writes, and notebooks/analysis.ipynb, on a real run."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys

import pandas as pd
import pytest

from conftest import PARITY_PROMPTS, REPO, daskdp_cli
from daskdp import io
from daskdp.generation import RESULT_DTYPES

NOTEBOOK = REPO / "notebooks" / "analysis.ipynb"
FIGURES = 4  # ranks over time, tokens/s per rank, lengths, finish reasons
BAD_ROWS = [
    {"id": "bad-null", "prompt": None},
    {"id": "bad-empty", "prompt": ""},
    {"id": "bad-int", "prompt": 42},
]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One `daskdp run` on two ranks, with a few rows that cannot be generated."""
    directory = tmp_path_factory.mktemp("report")
    source = directory / "prompts.jsonl"
    rows = [{"id": f"ok-{i}", "prompt": prompt} for i, prompt in enumerate(PARITY_PROMPTS[:30])] + BAD_ROWS
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = directory / "out"
    done = daskdp_cli("run", source, "-o", out, "--workers", 2, "--max-tokens", 16, "--quiet")
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
    assert done.stdout.strip().splitlines()[-1] == f"report in {out}/{io.REPORT_FILE}"
    assert len(embedded_pngs((out / io.REPORT_FILE).read_text())) == FIGURES
    io.check_output(str(out), overwrite=True)  # the report is daskdp's own file, not a stranger's
    assert len(pd.read_parquet(out)) == 30 + len(BAD_ROWS)  # Parquet readers skip it


@pytest.mark.slow
def test_report_command(run):
    """`daskdp report OUT` prints the table and writes a self-contained HTML report."""
    out, _ = run
    (out / io.REPORT_FILE).unlink()
    done = daskdp_cli("report", out)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "run (wall)" in done.stdout and "rank 1 (busy)" in done.stdout
    assert done.stdout.strip().splitlines()[-1] == f"report in {out}/{io.REPORT_FILE}"

    report = (out / io.REPORT_FILE).read_text()
    pngs = embedded_pngs(report)
    assert len(pngs) == FIGURES
    assert all(png.startswith(b"\x89PNG") and len(png) > 5_000 for png in pngs)
    assert "bad-null" in report and "prompt is null" in report and "prompt is int, not text" in report
    assert "Sample of generations" in report and "ok-" in report


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
    """The notebook, committed without outputs, runs on DASKDP_RESULTS and shows every figure."""
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
    images = [output for output in outputs if "image/png" in output.get("data", {})]
    assert len(images) == FIGURES
    tables = "".join(output.get("data", {}).get("text/html", "") for output in outputs)
    assert "rank 1 (busy)" in tables and "bad-null" in tables
    assert "ex-000" in code[-1].outputs[-1]["data"]["text/html"]  # the lazy API's first rows


def test_all_errors_on_one_rank(tmp_path):
    """A run whose every row failed, on one rank, with no finish times: still a full report."""
    from daskdp.report import format_table, load, summary_table, write_report

    n = 3
    results = pd.DataFrame({"id": range(n), "prompt": [None, "", None]}).assign(
        **{name: pd.Series([None] * n, dtype=dtype) for name, dtype in RESULT_DTYPES.items()}
    )
    results = results.assign(
        error=pd.array(["prompt is null", "prompt is empty", "prompt is null"], dtype="string"),
        rank=pd.array([0] * n, dtype="Int64"),
        prompt_tokens=pd.array([0] * n, dtype="Int64"),
        output_tokens=pd.array([0] * n, dtype="Int64"),
        started_at=5.0,
    )
    results.to_parquet(tmp_path / io.SHARD_PATTERN.format(0))
    partition = {"partition": 0, "rank": 0, "worker": "tcp://w", "rows": n, "error_rows": n}
    summary = {
        "input": "p.jsonl",
        "output": str(tmp_path),
        "model": "m",
        "sampling": {},
        "engine": {},
        "started": 0.0,
        "finished": 6.0,
        "wall_seconds": 6.0,
        "rows": n,
        "error_rows": n,
        "prompt_tokens": 0,
        "output_tokens": 0,
        "output_tokens_per_second": 0.0,
        "partitions": [partition | {"output_tokens": 0, "started": 5.0, "finished": 5.0}],
        "ranks": {"0": {"rows": n, "busy_seconds": 0.0}},
    }
    io.write_summary(summary, str(tmp_path))

    assert write_report(tmp_path) == f"{tmp_path}/{io.REPORT_FILE}"
    report = (tmp_path / io.REPORT_FILE).read_text()
    assert len(embedded_pngs(report)) == FIGURES
    assert report.count("prompt is null") == 2
    table = format_table(summary_table(load(tmp_path)[1]))
    assert table.splitlines()[1].split() == ["run", "(wall)", "3", "3", "0", "0", "6.0", "0.0"]


def test_help_loads_no_plotting():
    """`import daskdp` and `daskdp report --help` import neither matplotlib nor the engine."""
    code = (
        "import sys\nfrom daskdp.cli import main\ntry:\n    main(['report', '--help'])\nexcept SystemExit:\n"
        "    pass\nassert not {'matplotlib', 'vllm', 'torch'} & set(sys.modules), 'heavy imports'"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "daskdp report prompts.out" in done.stdout
