"""What `daskdp run` shows in the terminal: progress lines with rates and an ETA, the summary,
and sample generations beside their prompts (left out with --quiet)."""

from __future__ import annotations

import re

import pandas as pd
import pytest

from conftest import daskdp_cli
from daskdp.monitor import eta_text
from daskdp.output.summary import format_samples, one_line


def test_eta_reads_as_time_left():
    assert eta_text(0, 10.0) == "" and eta_text(100, 0.0) == ""
    assert eta_text(120, 10.0) == "12s"
    assert eta_text(2_450, 10.0) == "4m05s"
    assert eta_text(37_200, 10.0) == "1h02m"


def test_samples_are_one_line_each_prompt_beside_its_generation():
    results = pd.DataFrame(
        {
            "prompt": ["Why is the sky blue?", None, "Skipped: an error row", "Fourth"],
            "messages": [None, [{"role": "user", "content": "Hi\nthere"}], None, None],
            "generated_text": ["Because of\nRayleigh scattering.", "Hello!", None, "x" * 300],
            "error": [None, None, "prompt is empty", None],
        }
    )
    text = format_samples(results, "prompt", "messages")
    assert text.splitlines() == [
        "> Why is the sky blue?",
        "  Because of Rayleigh scattering.",
        "> Hi there",
        "  Hello!",
        "> Fourth",
        "  " + one_line("x" * 300, 100),
    ]
    assert one_line("x" * 300, 100).endswith("…") and len(one_line("x" * 300, 100)) == 100


@pytest.mark.slow
def test_run_shows_progress_summary_and_sample_generations(tmp_path, cluster):
    _, client = cluster
    prompts = [f"Tell me about the number {i}." for i in range(400)]
    source = tmp_path / "prompts.parquet"
    pd.DataFrame({"prompt": prompts}).to_parquet(source)
    common = ["--max-tokens", 160, "--ignore-eos", "--scheduler-address", client.scheduler.address]
    done = daskdp_cli("run", source, "-o", tmp_path / "out", *common)
    assert done.returncode == 0, done.stderr[-3000:]
    progress = [line for line in done.stderr.splitlines() if re.match(r"[\d,]+/400 rows, ", line)]
    assert progress and progress[-1].startswith("400/400 rows, "), done.stderr[-3000:]
    assert re.search(r"rank 0 [\d,]+ rows/s [\d,]+ tok/s; rank 1 [\d,]+ rows/s [\d,]+ tok/s", progress[-1])
    for line in progress[:-1]:  # lines with rows done and left: rows left at the recent rate
        if not line.startswith("0/") and " 0 rows/s" not in line:
            assert re.search(r", ETA (\d+h\d\dm|\d+m\d\ds|\d+s) \(", line), line
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["rows", "400"]
    start = lines.index("sample generations:")
    shown = lines[start + 1 : start + 7]
    assert [line[2:] for line in shown[::2]] == prompts[:3]
    written = pd.read_parquet(tmp_path / "out" / "part-000000.parquet")
    assert [line[2:] for line in shown[1::2]] == [
        one_line(text, 100) for text in written["generated_text"][:3]
    ]

    quiet = daskdp_cli("run", source, "-o", tmp_path / "quiet", *common, "--quiet")
    assert quiet.returncode == 0 and "sample generations" not in quiet.stdout and quiet.stderr == ""
