"""The Python API: lazy, usable with the usual Dask calls, and the same rows as the CLI."""

from __future__ import annotations

import shutil
import subprocess
import sys

import dask.dataframe as dd
import pandas as pd
import pytest

import daskdp
from conftest import REPO, daskdp_cli, read_results

EXAMPLES = REPO / "examples" / "prompts.jsonl"
EXAMPLE_ROWS = len(EXAMPLES.read_text().splitlines())


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, cluster):
    """The examples through `daskdp run` on the shared cluster, in chunks of 16 rows."""
    _, client = cluster
    out = tmp_path_factory.mktemp("cli") / "out"
    done = daskdp_cli(
        "run",
        EXAMPLES,
        "-o",
        out,
        "--scheduler-address",
        client.scheduler.address,
        "--max-tokens",
        12,
        "--chunk-size",
        16,
        "--quiet",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def cli_results(cli_run):
    return read_results(cli_run).set_index("id").sort_index()


def test_generate_gives_the_same_rows_as_the_cli(cluster, cli_results):
    _, client = cluster
    results = daskdp.generate(EXAMPLES, client=client, max_tokens=12)
    assert results.npartitions == 2  # one partition per rank
    computed = client.compute(results, resources={"GPU": 1}).result().set_index("id").sort_index()
    assert list(computed.index) == list(cli_results.index)
    assert list(computed["generated_text"]) == list(cli_results["generated_text"])
    assert list(computed["topic"]) == list(cli_results["topic"])


def test_usual_dask_calls_work(cluster, tmp_path):
    _, client = cluster
    frame = pd.DataFrame({"prompt": [f"Question {i}?" for i in range(6)], "label": list("abcdef")})
    results = daskdp.generate(frame, client=client, max_tokens=3, ignore_eos=True)
    assert len(results.head(2, npartitions=-1)) == 2
    results.to_parquet(tmp_path / "out")
    written = dd.read_parquet(tmp_path / "out").compute()
    assert sorted(written["label"]) == list("abcdef") and (written["output_tokens"] == 3).all()


def test_read_results_reads_the_chunk_files_only(cli_run, tmp_path):
    """One partition per chunk file, in chunk order; `_chunks/` and hidden temporary files are not read."""
    out = tmp_path / "out"
    shutil.copytree(cli_run, out)
    chunk_files = sorted(out.glob("part-*.parquet"))
    shutil.copy(chunk_files[0], out / "_chunks" / "stray.parquet")  # dd.read_parquet(out) would read it
    shutil.copy(chunk_files[1], out / f".{chunk_files[1].name}.tmp-0123abcd")  # a write in progress

    results = daskdp.read_results(out)
    assert results.npartitions == len(chunk_files) > 1
    computed = results.compute().reset_index(drop=True)
    pd.testing.assert_frame_equal(computed, read_results(cli_run), check_dtype=False)  # Dask: string[pyarrow]

    manifest = daskdp.read_manifest(out)
    assert manifest["rows"] == EXAMPLE_ROWS and manifest["chunks"] == len(chunk_files)
    assert (
        manifest["input"] == str(EXAMPLES)
        and manifest["settings"]["model"] == daskdp.read_summary(out)["model"]
    )


def test_read_results_of_no_run(tmp_path):
    (tmp_path / "_summary.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="holds no part-"):
        daskdp.read_results(tmp_path)


def test_run_prints_nothing_from_library_code(tmp_path, cluster):
    """daskdp.run reports through logging only; the summary is returned, not printed."""
    _, client = cluster
    code = (
        "import daskdp, sys\n"
        f"summary = daskdp.run({str(EXAMPLES)!r}, {str(tmp_path / 'out')!r}, "
        f"overrides={{'cluster.scheduler-address': {client.scheduler.address!r}, 'sampling.max-tokens': 4}})\n"
        f"assert summary['rows'] == {EXAMPLE_ROWS}, summary\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout == ""
    assert daskdp.read_summary(tmp_path / "out")["rows"] == EXAMPLE_ROWS


def test_unknown_sampling_setting_is_named(cluster):
    _, client = cluster
    with pytest.raises(TypeError, match="max_token"):
        daskdp.generate(EXAMPLES, client=client, max_token=3)
