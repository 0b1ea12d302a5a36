"""The output directory: its default name, the lock that keeps one run in it, the checks before
a run writes there, and clearing an earlier run's results."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import posixpath
import tempfile
from collections.abc import Iterator

from daskdp.errors import UserError
from daskdp.inputs.formats import COMPRESSIONS, FORMATS
from daskdp.output.chunks import is_temporary, read_records
from daskdp.output.manifest import read_manifest
from daskdp.output.schema import CHUNK_FILE, CHUNKS_DIR, MANIFEST_FILE, REPORT_FILE, SUMMARY_FILE


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
    """Refuse an output that is a file, holds files daskdp did not write, or holds the results
    of an earlier run without ``--resume`` or ``--overwrite``."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(output)
    check_writable(fs, path, output)
    if not fs.exists(path):
        return
    owned, foreign = daskdp_entries(fs, path)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise UserError(
            f"output directory {output} holds files that no daskdp run wrote ({shown}); "
            "daskdp never deletes them: choose another -o/--output, or move them away"
        )
    if MANIFEST_FILE in owned and not (resume or overwrite):  # owned only when it reads as one
        raise UserError(
            f"output directory {output} holds the results of an earlier run; pass --resume to "
            "continue it, --overwrite to replace it, or choose another -o/--output"
        )


def check_writable(fs, path: str, output: str) -> None:
    """Refuse a local output that cannot be made or written (a read-only mount, a path under
    a regular file), before a cluster starts for it; nothing is created here."""
    from fsspec.implementations.local import LocalFileSystem

    if fs.exists(path) and not fs.isdir(path):
        raise UserError(f"output {output} is a file, not a directory; choose another -o/--output")
    if not isinstance(fs, LocalFileSystem):
        return  # object stores: the first write tells
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UserError(
            f"cannot create output {output}: {existing} is a file, not a directory; choose another -o/--output"
        )
    try:
        with tempfile.TemporaryFile(dir=existing, prefix=".daskdp-probe-"):
            pass
    except OSError as e:
        raise UserError(
            f"cannot write output {output} ({e.strerror or e} in {existing}); choose another -o/--output"
        ) from None


def daskdp_entries(fs, path: str) -> tuple[list[str], list[str]]:
    """The entries of the directory ``path``: those a daskdp run wrote, and all others.

    A run writes its manifest, the chunk files it names (by chunk record, or by their number
    below the manifest's chunk count: a chunk's file is written before its record), the
    summary, the report, ``_chunks/`` and hidden temporary files beside each of them. Without a
    manifest, only leftovers of a run that stopped before writing one are daskdp's.
    """
    entries = sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False))
    manifest = read_manifest(fs.unstrip_protocol(path))
    names = {CHUNKS_DIR}
    if manifest is not None:
        names |= {MANIFEST_FILE, SUMMARY_FILE, REPORT_FILE}
        names |= {CHUNK_FILE.format(c) for c in range(int(manifest.get("chunks", 0)))}
        names |= {record["file"] for record in read_records(fs.unstrip_protocol(path)).values()}
    owned = [e for e in entries if e in names or is_temporary(e)]
    return owned, [e for e in entries if e not in owned]


@contextlib.contextmanager
def output_lock(output: str) -> Iterator[None]:
    """Hold ``output`` for this run; refuse it while another run on this host holds it.

    Two runs writing one directory would overwrite each other's chunks and manifest. The lock
    is a file in the temporary directory named after the output's resolved path (so a symlink,
    ``dir//.`` and ``dir`` are one directory), held with ``filelock``: the system releases it
    when its process ends, killed or not (a killed run leaves the empty file, which the next
    run takes). Runs on other hosts writing one shared directory are not seen.
    """
    import filelock

    key = hashlib.sha256(resolved(output).encode()).hexdigest()[:16]
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


def resolved(output: str) -> str:
    """One name for every spelling of the directory ``output``: symlinks and ``.`` resolved."""
    import fsspec
    from fsspec.implementations.local import LocalFileSystem

    fs, path = fsspec.core.url_to_fs(output)
    if isinstance(fs, LocalFileSystem):
        return os.path.realpath(path)
    return fs.unstrip_protocol(posixpath.normpath(path))


def output_error(error: OSError, output: str | None = None) -> str:
    """One line for a write to the output directory (``output``, else the directory of the
    file that failed) that failed: a full disk above all."""
    if output is None:
        output = os.path.dirname(str(error.filename or "")).removesuffix(f"/{CHUNKS_DIR}")
    if error.errno == errno.ENOSPC:
        return f"no space left on the device of {output or 'the output directory'}; free some space"
    return f"cannot write to {output or 'the output directory'} ({error.strerror or error})"


def has_results(output: str) -> bool:
    import fsspec

    fs, path = fsspec.core.url_to_fs(output)
    return fs.exists(path) and bool(fs.ls(path, detail=False))


def clear_output(output: str) -> None:
    """Remove what earlier daskdp runs wrote in ``output`` (``check_output`` refused the rest)."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(output)
    if fs.exists(path):
        owned, _ = daskdp_entries(fs, path)
        for entry in owned:
            fs.rm(posixpath.join(path, entry), recursive=True)
