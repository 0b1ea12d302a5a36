"""What a user gets for bad input: the real `daskdp run` CLI in fresh processes, nothing mocked.

Part 1: bad files and settings stop the run with exit code 2 and one `daskdp: error:` line that
names the problem and the fix, without a traceback and without creating the output directory.
Part 2: bad rows inside good input come back as rows with `error` set; the others are generated.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pandas as pd
import pytest

from conftest import daskdp_cli, error_line, read_results
from daskdp.errors import UserError
from daskdp.output.directory import output_lock

pytestmark = pytest.mark.slow

GOOD_PROMPTS = ["Write a haiku about rivers.", "Explain prime numbers to a child."]


def write_jsonl(path, rows) -> None:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


@pytest.fixture
def good_input(tmp_path):
    """A valid prompts file, for cases where something else is wrong."""
    source = tmp_path / "prompts.parquet"
    pd.DataFrame({"prompt": GOOD_PROMPTS}).to_parquet(source)
    return source


# Part 1: bad input files and settings -------------------------------------------------------


def test_missing_input_file(tmp_path):
    """A path that does not exist is named, with the hint to check it."""
    source = tmp_path / "nope.parquet"
    done = daskdp_cli("run", source, "-o", tmp_path / "out")
    error_line(done, str(source), "does not exist", "check the path")
    assert not (tmp_path / "out").exists()


def test_parquet_without_prompt_column(tmp_path):
    """The message lists the columns the file has and points to --prompt-column."""
    source = tmp_path / "questions.parquet"
    pd.DataFrame({"question": GOOD_PROMPTS, "answer_key": [1, 2]}).to_parquet(source)
    done = daskdp_cli("run", source, "-o", tmp_path / "out")
    line = error_line(done, str(source), "'prompt'", "--prompt-column")
    assert "question" in line and "answer_key" in line
    assert not (tmp_path / "out").exists()


def test_empty_parquet(tmp_path):
    """A Parquet file with a prompt column but zero rows: nothing to generate."""
    source = tmp_path / "empty.parquet"
    pd.DataFrame({"prompt": pd.Series([], dtype=object)}).to_parquet(source)
    done = daskdp_cli("run", source, "-o", tmp_path / "out")
    error_line(done, str(source), "no rows")  # from the file's footer, before a cluster starts
    assert not (tmp_path / "out").exists()


def test_empty_jsonl(tmp_path, cluster):
    """An empty .jsonl file is reported as empty, not as a file missing its prompt column."""
    source = tmp_path / "empty.jsonl"
    source.write_text("")
    address = cluster[1].scheduler.address  # read on the shared warm cluster
    done = daskdp_cli("run", source, "-o", tmp_path / "out", "--scheduler-address", address)
    line = error_line(done, str(source), cluster_started=True)
    assert re.search(r"no rows|empty", line), line
    assert "--prompt-column" not in line, f"renaming a column cannot fix an empty file: {line!r}"
    assert not (tmp_path / "out").exists()


def test_parquet_file_holding_text(tmp_path):
    """A .parquet file that is plain text: cannot be read as Parquet; check the file."""
    source = tmp_path / "notes.parquet"
    source.write_text("these are my prompts\none per line\n")
    done = daskdp_cli("run", source, "-o", tmp_path / "out")
    error_line(done, str(source), "cannot read", "as Parquet", "what its name says")
    assert not (tmp_path / "out").exists()


def test_jsonl_file_holding_garbage(tmp_path):
    """A .jsonl file of random non-JSON text: cannot be read as JSON Lines; check the file."""
    source = tmp_path / "prompts.jsonl"
    source.write_text("prompt: hello\n{not json at all\n\x00\x01 random bytes ]]\n")
    done = daskdp_cli("run", source, "-o", tmp_path / "out")
    error_line(done, str(source), "cannot read", "as JSON Lines", "line 1 is not valid JSON")
    assert not (tmp_path / "out").exists()


def test_parquet_prompt_column_of_integers(tmp_path):
    """An int64 prompt column is refused up front, naming its type."""
    source = tmp_path / "numbers.parquet"
    pd.DataFrame({"prompt": [1, 2, 3]}).to_parquet(source)
    done = daskdp_cli("run", source, "-o", tmp_path / "out")
    error_line(done, str(source), "'prompt'", "int64", "not text", "--prompt-column")
    assert not (tmp_path / "out").exists()


def test_jsonl_prompt_column_of_numbers(tmp_path):
    """JSON numbers in every row's prompt are refused up front as not text."""
    source = tmp_path / "numbers.jsonl"
    write_jsonl(source, [{"prompt": 1}, {"prompt": 2.5}, {"prompt": -7}])
    done = daskdp_cli("run", source, "-o", tmp_path / "out")
    error_line(done, str(source), "'prompt'", "not text", "--prompt-column")
    assert not (tmp_path / "out").exists()


def test_missing_config_file(tmp_path, good_input):
    """A --config path that does not exist is named, with --config as the thing to fix."""
    config = tmp_path / "missing.yaml"
    done = daskdp_cli("run", good_input, "-o", tmp_path / "out", "--config", config)
    error_line(done, str(config), "does not exist", "--config")
    assert not (tmp_path / "out").exists()


def test_config_file_with_invalid_yaml(tmp_path, good_input):
    """A config file that is not YAML: the file and the line are named."""
    config = tmp_path / "broken.yaml"
    config.write_text("daskdp:\n  sampling:\n    max-tokens: [8\n  engine: {max-model-len: 128\n")
    done = daskdp_cli("run", good_input, "-o", tmp_path / "out", "--config", config)
    line = error_line(done, str(config), "not valid YAML", "fix the file")
    assert re.search(r"at line \d+", line), line
    assert not (tmp_path / "out").exists()


def test_non_empty_output_without_resume_or_overwrite(tmp_path, good_input):
    """Results of an earlier run (its manifest and the chunks it names) are kept unless --resume
    or --overwrite is given; the message names both; a resume whose settings differ is refused."""
    out = tmp_path / "out"
    out.mkdir()
    earlier = {
        "_manifest.json": json.dumps({"version": 1, "rows": 2, "chunks": 1, "settings": {}}).encode(),
        "part-000000.parquet": b"earlier shard",
        "_summary.json": b'{"rows": 2}\n',
    }
    for name, content in earlier.items():
        (out / name).write_bytes(content)
    done = daskdp_cli("run", good_input, "-o", out)
    error_line(done, str(out), "earlier run", "--resume", "--overwrite")
    done = daskdp_cli("run", good_input, "-o", out, "--resume")
    error_line(done, f"cannot resume {out}", "--overwrite")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == earlier


def test_output_that_another_run_is_writing(tmp_path, good_input):
    """A run into a directory that another run on this host is writing is refused at once and
    leaves it as it was; a run killed with SIGKILL leaves no lock behind."""
    out = tmp_path / "out"
    with output_lock(str(out)):
        done = daskdp_cli("run", good_input, "-o", out, "--overwrite")
    error_line(done, str(out), "another daskdp run", "-o/--output")
    assert not out.exists()

    hold = f"from daskdp.output.directory import output_lock; held = output_lock({str(out)!r}); held.__enter__(); print(1, flush=True); input()"
    holder = subprocess.Popen(
        [sys.executable, "-c", hold], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout.readline().strip() == "1"
    with pytest.raises(UserError, match="another daskdp run"), output_lock(str(out)):
        pass
    holder.kill()
    holder.wait()
    with output_lock(str(out)):
        pass


# Part 2: bad rows inside good input ---------------------------------------------------------

LONG_PROMPT = " ".join(["the quick brown fox jumps over a lazy dog"] * 250)  # ~2,250 words

# id -> (row, a word the row's error must contain; None for rows that must be generated)
MIXED_ROWS = {
    "good-0": ({"prompt": GOOD_PROMPTS[0]}, None),
    "good-1": ({"prompt": GOOD_PROMPTS[1]}, None),
    "good-2": ({"prompt": "Name three colours."}, None),
    "null": ({"prompt": None}, "null"),
    "empty": ({"prompt": ""}, "empty"),
    "blank": ({"prompt": " \t\n  "}, "empty"),
    "number": ({"prompt": 42}, "not text"),
    "too-long": ({"prompt": LONG_PROMPT}, "max_model_len"),
    "bad-max-tokens": ({"prompt": "Count to three.", "max_tokens": -3}, "max_tokens"),
    "chinese": ({"prompt": "请用中文介绍一下长城的历史。"}, None),
    "arabic": ({"prompt": "مرحبا بالعالم، كيف حالك اليوم؟"}, None),
    "emoji": ({"prompt": "Emoji party 🎉🐍🚀 and more 🤖👍🏽"}, None),
    "control": ({"prompt": "Tabs\tand a bell \x07 char\r\nand a new line"}, None),
    "html": ({"prompt": "<b>markup</b> &amp; <script>alert('x')</script><!-- c -->"}, None),
}


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory):
    """One run of 2 ranks over a JSONL mixing good rows with every kind of bad row."""
    tmp = tmp_path_factory.mktemp("mixed")
    source, config, out = tmp / "mixed.jsonl", tmp / "small.yaml", tmp / "out"
    write_jsonl(source, [{"id": row_id, **row} for row_id, (row, _) in MIXED_ROWS.items()])
    config.write_text("daskdp:\n  engine:\n    max-model-len: 128\n")
    done = daskdp_cli("run", source, "-o", out, "--max-tokens", 8, "--config", config, "--workers", 2)
    return done, out


def test_bad_rows_do_not_stop_the_run(mixed_run):
    """The run succeeds, without a traceback, and writes every input row exactly once."""
    done, out = mixed_run
    assert "Traceback" not in done.stdout + done.stderr, done.stderr[-3000:]
    assert done.returncode == 0, done.stderr[-3000:]
    results = read_results(out)
    assert sorted(results["id"]) == sorted(MIXED_ROWS)


def test_bad_rows_carry_a_short_error(mixed_run):
    """Each bad row has a one-line error naming its problem, and no generated text."""
    done, out = mixed_run
    assert done.returncode == 0, done.stderr[-3000:]
    results = read_results(out).set_index("id")
    for row_id, (_, word) in MIXED_ROWS.items():
        if word is None:
            continue
        error = results.at[row_id, "error"]
        assert isinstance(error, str) and error.strip(), f"{row_id}: no error"
        assert len(error) <= 200 and "\n" not in error, f"{row_id}: error not short: {error!r}"
        assert word in error, f"{row_id}: {word!r} not in {error!r}"
        assert pd.isna(results.at[row_id, "generated_text"]), row_id


def test_good_and_awkward_rows_are_generated(mixed_run):
    """Plain, non-Latin, emoji, control-character and HTML prompts all come back generated."""
    done, out = mixed_run
    assert done.returncode == 0, done.stderr[-3000:]
    results = read_results(out).set_index("id")
    for row_id, (row, word) in MIXED_ROWS.items():
        if word is not None:
            continue
        assert pd.isna(results.at[row_id, "error"]), f"{row_id}: {results.at[row_id, 'error']}"
        assert results.at[row_id, "prompt"] == row["prompt"], row_id
        assert results.at[row_id, "output_tokens"] > 0, row_id
        text = results.at[row_id, "generated_text"]
        assert isinstance(text, str) and text, f"{row_id}: empty generated_text"


def test_summary_counts_the_error_rows(mixed_run):
    """The summary on stdout (and in _summary.json) counts rows and error rows."""
    done, out = mixed_run
    assert done.returncode == 0, done.stderr[-3000:]
    bad = sum(word is not None for _, word in MIXED_ROWS.values())
    assert re.search(rf"^error rows\s+{bad}$", done.stdout, re.MULTILINE), done.stdout
    assert re.search(rf"^rows\s+{len(MIXED_ROWS)}$", done.stdout, re.MULTILINE), done.stdout
    summary = json.loads((out / "_summary.json").read_text())
    assert (summary["rows"], summary["error_rows"]) == (len(MIXED_ROWS), bad)
