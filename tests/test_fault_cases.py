"""Faults a new user found on a fresh clone, each reproduced with the real CLI, engine and cluster.

One output directory under two names, ``--overwrite`` over a user's files, null and repeated
ids, text that is not UTF-8, malformed JSON Lines, an output that cannot be written, a
scheduler address where something else listens, a full disk and a stopped rank.
"""

from __future__ import annotations

import json

import pandas as pd
import pytest

from conftest import daskdp_cli, error_line, read_results
from daskdp.output.directory import output_lock

pytestmark = pytest.mark.slow


@pytest.fixture
def good_input(tmp_path):
    source = tmp_path / "prompts.parquet"
    pd.DataFrame(
        {"id": [f"r{i}" for i in range(6)], "prompt": [f"Question {i}?" for i in range(6)]}
    ).to_parquet(source)
    return source


# One directory under two names -----------------------------------------------------------------


@pytest.mark.parametrize("spelling", ["symlink", "dot"])
def test_one_directory_under_two_names_is_one_directory(tmp_path, good_input, spelling):
    """While a run holds ``conc2/``, a run into a symlink to it, or into ``conc2//.``, is refused."""
    out = tmp_path / "conc2"
    out.mkdir()
    if spelling == "symlink":
        other = tmp_path / "conc2link"
        other.symlink_to(out, target_is_directory=True)
    else:
        other = f"{out}//."
    with output_lock(str(out)):
        done = daskdp_cli("run", good_input, "-o", other)
    error_line(done, "another daskdp run", "-o/--output")
    assert list(out.iterdir()) == []


# --overwrite and a user's files ----------------------------------------------------------------

USERS_FILES = {
    "part-000099.parquet": b"the user's own shard",
    "part-00000-abc.snappy.parquet": b"a Spark shard",
    "part-000000.parquet.bak": b"a backup",
}


@pytest.mark.parametrize("flag", [None, "--overwrite", "--resume"])
def test_a_users_parquet_files_are_never_deleted(tmp_path, good_input, flag):
    """A directory with no daskdp manifest and the user's ``part-*`` files: refused with the
    files named, whatever the flag; it is not called the results of an earlier run."""
    out = tmp_path / "theirs"
    out.mkdir()
    for name, content in USERS_FILES.items():
        (out / name).write_bytes(content)
    done = daskdp_cli("run", good_input, "-o", out, *([flag] if flag else []))
    line = error_line(done, str(out), "no daskdp run wrote", *USERS_FILES)
    assert "earlier run" not in line
    assert {p.name: p.read_bytes() for p in out.iterdir()} == USERS_FILES


def test_overwrite_deletes_only_what_daskdp_wrote(tmp_path, good_input):
    """--overwrite over a finished run's directory replaces it; with a file of the user's beside
    the run's files it refuses, naming that file, and deletes nothing."""
    out = tmp_path / "out"
    done = daskdp_cli("run", good_input, "-o", out, "--max-tokens", "4", "--quiet")
    assert done.returncode == 0, done.stderr[-3000:]
    written = sorted(p.name for p in out.iterdir())
    assert "_manifest.json" in written and "_summary.json" in written

    (out / "notes.txt").write_text("mine")
    (out / "part-000099.parquet").write_bytes(b"mine too")
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    done = daskdp_cli("run", good_input, "-o", out, "--overwrite")
    error_line(done, str(out), "no daskdp run wrote", "notes.txt", "part-000099.parquet")
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before

    (out / "notes.txt").unlink()
    (out / "part-000099.parquet").unlink()
    (out / "._manifest.json.tmp-0123456789abcdef0123456789abcdef").write_text("{")  # a stopped write
    done = daskdp_cli("run", good_input, "-o", out, "--max-tokens", "4", "--quiet", "--overwrite")
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == written
    rows = read_results(out)
    assert sorted(rows["id"]) == [f"r{i}" for i in range(6)]
    assert json.loads((out / "_summary.json").read_text())["rows"] == 6
