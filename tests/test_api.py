"""The Python API: lazy, usable with the usual Dask calls, and the same rows as the CLI."""

from __future__ import annotations

import subprocess
import sys

import pandas as pd
import pytest

import daskdp
from conftest import REPO, daskdp_cli, read_results

EXAMPLES = REPO / "examples" / "prompts.jsonl"


@pytest.fixture(scope="module")
def cli_results(tmp_path_factory, cluster):
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
        "--quiet",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return read_results(out).set_index("id").sort_index()


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
    written = daskdp.read_results(tmp_path / "out").compute()
    assert sorted(written["label"]) == list("abcdef") and (written["output_tokens"] == 3).all()


def test_run_prints_nothing_from_library_code(tmp_path, cluster):
    """daskdp.run reports through logging only; the summary is returned, not printed."""
    _, client = cluster
    code = (
        "import daskdp, sys\n"
        f"summary = daskdp.run({str(EXAMPLES)!r}, {str(tmp_path / 'out')!r}, "
        f"overrides={{'cluster.scheduler-address': {client.scheduler.address!r}, 'sampling.max-tokens': 4}})\n"
        "assert summary['rows'] == 200, summary\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout == ""
    assert daskdp.read_summary(tmp_path / "out")["rows"] == 200


def test_unknown_sampling_setting_is_named(cluster):
    _, client = cluster
    with pytest.raises(TypeError, match="max_token"):
        daskdp.generate(EXAMPLES, client=client, max_token=3)
