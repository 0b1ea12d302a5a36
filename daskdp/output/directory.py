"""The output directory: its default name, the lock that keeps one run in it, the checks before
a run writes there, and clearing an earlier run's results."""

from __future__ import annotations

import contextlib
import hashlib
import os
import posixpath
import tempfile
from collections.abc import Iterator

from daskdp.errors import UserError
from daskdp.inputs.read import COMPRESSIONS, FORMATS
from daskdp.output.schema import CHUNKS_DIR, MANIFEST_FILE, REPORT_FILE, SUMMARY_FILE


def default_output(source: str) -> str:
    """``<input stem>.out`` beside the input; ``daskdp.out`` beside a glob's files."""
    import fsspec

    source = source.rstrip("/")
    if fsspec.core.has_magic(source):
        return posixpath.join(posixpath.dirname(source), "daskdp.out")
    directory, name = posixpath.split(source)
    stem = name
    while posixpath.splitext(stem)[1].lower() in set(FORMATS) | COMPRESSIONS:
        stem = posixpath.splitext(stem)[0]
    return posixpath.join(directory, f"{stem}.out")


def check_output(output: str, resume: bool, overwrite: bool) -> None:
    """Refuse an output that is a file, holds other files, or holds results without a flag."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(output)
    if not fs.exists(path):
        return
    if not fs.isdir(path):
        raise UserError(f"output {output} is a file, not a directory; choose another -o/--output")
    entries = [posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False)]
    foreign = [e for e in entries if not _is_daskdp_file(e)]
    if foreign:
        raise UserError(
            f"output directory {output} holds files daskdp did not write ({', '.join(foreign[:3])}); "
            "choose another -o/--output"
        )
    if entries and not (resume or overwrite):
        raise UserError(
            f"output directory {output} holds the results of an earlier run; pass --resume to "
            "continue it, --overwrite to replace it, or choose another -o/--output"
        )


@contextlib.contextmanager
def output_lock(output: str) -> Iterator[None]:
    """Hold ``output`` for this run; refuse it while another run on this host holds it.

    Two runs writing one directory would overwrite each other's chunks and manifest. The lock
    is a file in the temporary directory named after the output's URL, held with ``filelock``:
    the system releases it when its process ends, killed or not (a killed run leaves the empty
    file, which the next run takes). Runs on other hosts writing one shared directory are not
    seen.
    """
    import filelock
    import fsspec

    fs, path = fsspec.core.url_to_fs(output)
    key = hashlib.sha256(fs.unstrip_protocol(path).encode()).hexdigest()[:16]
    lock = filelock.FileLock(os.path.join(tempfile.gettempdir(), f"daskdp-output-{key}.lock"))
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        raise UserError(
            f"output {output} is being written by another daskdp run on this host; wait for it "
            "to finish or choose another -o/--output"
        ) from None
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):  # nothing left behind; removed while still held
            os.unlink(lock.lock_file)
        lock.release()


def has_results(output: str) -> bool:
    import fsspec

    fs, path = fsspec.core.url_to_fs(output)
    return fs.exists(path) and bool(fs.ls(path, detail=False))


def clear_output(output: str) -> None:
    """Remove the results of an earlier run (``check_output`` allowed them)."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(output)
    if fs.exists(path):
        for entry in fs.ls(path, detail=False):
            fs.rm(entry, recursive=True)


def _is_daskdp_file(name: str) -> bool:
    if name in (SUMMARY_FILE, REPORT_FILE, MANIFEST_FILE, CHUNKS_DIR):
        return True
    return name.lstrip(".").startswith("part-") and ".parquet" in name
