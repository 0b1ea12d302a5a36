"""What the side-by-side benchmarks share: workloads, daskdp's settings and rank environment,
running ``daskdp run`` in a fresh process, checking rows, and printing medians.

Each benchmark (``overhead.py``, ``launcher.py``, ``ray_data.py``, ``prefix.py``) runs every side
as a fresh process, alternated ``a, b, a, b ...``, times it from process start to exit, checks
that every input row came back exactly once, and prints the median and spread of each side and
the ratio of the medians against its target. Run them from the repository's root with the venv's
python; this module is imported from beside them, not installed.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = REPO / ".venv" / "bin"
PYTHON = str(VENV_BIN / "python") if (VENV_BIN / "python").exists() else sys.executable
DASKDP = [str(VENV_BIN / "daskdp")] if (VENV_BIN / "daskdp").exists() else [PYTHON, "-m", "daskdp"]
TIMEOUT = 3600
# One compute thread per process, as daskdp's ranks have (see NOTES: Threads).
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "VLLM_CPU_OMP_THREADS_BIND")


# --- workloads -------------------------------------------------------------------------------


def make_prompts(rows: int) -> pd.DataFrame:
    """``rows`` distinct short prompts (about 26 tokens each for the tiny model) with ids ``0 .. rows-1``."""
    subjects = ["rivers", "bees", "the moon", "prime numbers", "volcanoes", "tea", "glaciers", "owls"]
    asks = ["Write a short note about", "List three facts on", "Explain to a child:", "Describe"]
    prompts = [
        f"{asks[i % len(asks)]} {subjects[i // len(asks) % len(subjects)]}, item {i} of topic {i * 7919 % 997}."
        for i in range(rows)
    ]
    return pd.DataFrame({"id": range(rows), "prompt": prompts})


# --- daskdp's settings and the environment of its ranks ------------------------------------------


# Every benchmark runs the packaged tiny model, named, so figures stay comparable across
# changes of daskdp's default model.
MODEL = "tiny"


def settings(
    max_tokens: int, config_file: str | os.PathLike | None = None, overrides: dict | None = None
) -> tuple[str, dict, dict]:
    """Model, engine arguments and sampling settings as ``daskdp run --model tiny --max-tokens N --ignore-eos`` resolves them here.

    ``overrides``: more configuration keys, as flags give them (``{"lora.adapters": {...}}``).
    """
    from daskdp import config
    from daskdp.clusters.ranks import visible_gpus

    resolved = config.load(
        config_file,
        overrides={
            "model": MODEL,
            "sampling.max-tokens": max_tokens,
            "sampling.ignore-eos": True,
            **(overrides or {}),
        },
    )
    model, engine_args = config.engine_arguments(resolved, gpu_host=bool(visible_gpus()))
    from daskdp.engine.requests import SAMPLING_KEYS

    # SamplingParams' own keywords: structured-output settings are built apart (a benchmark's own)
    sampling = {key.replace("-", "_"): resolved["sampling"][key] for key in SAMPLING_KEYS}
    sampling["stop"] = list(sampling["stop"] or []) or None
    return model, engine_args, sampling


def nanny_environment() -> dict[str, str]:
    """What a Dask nanny puts in its worker's environment before spawning it, but glibc's settings.

    ``distributed.nanny.pre-spawn-environ`` (``OMP_NUM_THREADS``, ``MKL_NUM_THREADS``, ... each
    unless already set in the environment), ``PYTHONHASHSEED=6640`` and
    ``distributed.nanny.environ``. These must be in a process's environment when it starts, so a
    baseline gets them from its parent. Not ``MALLOC_TRIM_THRESHOLD_``: a baseline runs with
    glibc's defaults, as its users run it; a daskdp rank has the nanny's value and undoes its
    cost to generation (`daskdp.engine.engine.keep_buffers_on_heap`).
    """
    import dask.config
    import distributed  # noqa: F401  (distributed's defaults join Dask's configuration)

    import daskdp.config  # noqa: F401  (daskdp's defaults join Dask's configuration)

    # distributed.nanny._get_env_variables: the configured values unless the environment has them.
    pre_spawn = {
        key: os.environ.get(key, str(value))
        for key, value in dask.config.get("distributed.nanny.pre-spawn-environ").items()
        if value is not None and not key.startswith("MALLOC_")
    }
    if pre_spawn.get("PYTHONHASHSEED") in (None, "0"):
        pre_spawn["PYTHONHASHSEED"] = "6640"
    nanny_environ = {k: str(v) for k, v in (dask.config.get("distributed.nanny.environ") or {}).items()}
    return {**pre_spawn, **nanny_environ}


def rank_variables(rank: int, ranks: int) -> dict[str, str]:
    """What a daskdp rank sets in its own process before importing vLLM, rank ``rank`` of ``ranks``.

    ``daskdp.clusters.ranks.rank_environments(ranks, 1)[rank]`` (one compute thread,
    ``OMP_NUM_THREADS=1`` and ``MKL_NUM_THREADS=1``, on the rank's own cores
    ``VLLM_CPU_OMP_THREADS_BIND``; vLLM's logging at ERROR), then what the engine plugin sets
    before ``LLM(...)``: ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` and the ``VLLM_DP_*`` variables of
    an independent rank (rank 0 of size 1: dense models refuse a data-parallel group).
    """
    from daskdp.clusters.ranks import DataParallelEnv, rank_environments

    return {
        **rank_environments(ranks, 1)[rank],
        **DataParallelEnv().environ(),
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    }


def worker_environment(rank: int = 0, ranks: int = 1) -> dict[str, str]:
    """The whole environment a daskdp rank has when it builds its engine, on top of this process's."""
    return {**os.environ, **nanny_environment(), **rank_variables(rank, ranks)}


def threads(env: dict[str, str]) -> dict[str, str]:
    """The variables of ``env`` that decide threads and cores, for the report."""
    return {key: env[key] for key in THREAD_VARIABLES if key in env}


# --- running the sides ---------------------------------------------------------------------------


def cpu_seconds() -> float:
    """CPU time of this process's finished children, their own children included."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def daskdp_command(source: Path, output: Path, workers: int, max_tokens: int, *extra: str) -> list[str]:
    """``daskdp run SOURCE -o OUTPUT --model tiny --workers N --max-tokens M --ignore-eos --quiet --overwrite EXTRA``."""
    return [
        *DASKDP,
        "run",
        str(source),
        "-o",
        str(output),
        "--model",
        MODEL,
        "--workers",
        str(workers),
        "--max-tokens",
        str(max_tokens),
        "--ignore-eos",
        "--quiet",
        "--overwrite",
        *extra,
    ]


def shown(command: Sequence[str], names: dict[Path, str]) -> str:
    """A command as the report prints it, with temporary paths named (``{source: "PROMPTS"}``)."""
    words = {str(path): name for path, name in names.items()}
    return " ".join(words.get(word, word) for word in command)


def run_daskdp(
    command: list[str],
    output: Path,
    env: dict[str, str] | None = None,
    ranks: int | None = None,
    cwd: str | os.PathLike | None = None,
) -> dict:
    """Run a ``daskdp run`` command as a fresh process; its time, CPU, phases and ``_summary.json``.

    Phases, from the summary: ``start`` (process start to the cluster's start: imports,
    configuration, the input's schema), ``run()`` (cluster start, engine load, generation and
    writing, cluster shutdown), each rank's busy time inside it (generation and writing of its
    partitions), and ``exit`` (summary written to process gone). ``rank_seconds``: each rank's
    busy seconds (of ``ranks`` ranks when given). ``cwd``: where it runs (``python -m daskdp``
    imports the ``daskdp`` found there first).
    """
    cpu = cpu_seconds()
    launched = time.time()
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=TIMEOUT, cwd=cwd)
    seconds = time.perf_counter() - started
    exited = time.time()
    if done.returncode != 0:
        raise SystemExit(f"daskdp failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    summary = json.loads((output / "_summary.json").read_text())
    busy = busy_seconds(summary, ranks)
    phases = {
        "start": summary["started"] - launched,
        "run()": summary["wall_seconds"],
    }
    if len(busy) == 1:
        phases["of which rank busy"] = busy[0]
    else:
        phases.update({f"busy r{rank}": seconds for rank, seconds in enumerate(busy)})
    phases["exit"] = exited - summary["finished"]
    run = {"seconds": seconds, "cpu": cpu_seconds() - cpu, "phases": phases, "summary": summary}
    return run | {"rank_seconds": busy}


def busy_seconds(summary: dict, ranks: int | None = None) -> list[float]:
    """Each rank's busy seconds from a ``_summary.json`` (``summary["ranks"][r]["busy_seconds"]``).

    With ``ranks``, one value for each of ranks ``0 .. ranks-1``: 0 for a rank the summary does
    not list (it generated nothing).
    """
    listed = {int(rank): float(stats["busy_seconds"]) for rank, stats in summary["ranks"].items()}
    if ranks is None:
        return [listed[rank] for rank in sorted(listed)]
    return [listed.get(rank, 0.0) for rank in range(ranks)]


def run_process(
    command: list[str], env: dict[str, str], name: str, check: bool = True
) -> tuple[dict, subprocess.CompletedProcess]:
    """Run a baseline as a fresh process: its time, CPU and exit time, and the finished process.

    With ``check``, a failed process ends the benchmark with its stderr.
    """
    cpu = cpu_seconds()
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=TIMEOUT)
    seconds = time.perf_counter() - started
    exited = time.time()
    if check and done.returncode != 0:
        raise SystemExit(f"{name} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return {"seconds": seconds, "cpu": cpu_seconds() - cpu, "exited": exited}, done


def phase_lines(stdout: str, prefix: str = "PHASES") -> list[dict]:
    """The JSON reports a baseline printed, one line each starting with ``prefix``."""
    return [json.loads(line.removeprefix(prefix)) for line in stdout.splitlines() if line.startswith(prefix)]


@contextmanager
def work_directory(prefix: str, keep: bool) -> Iterator[Path]:
    """A new temporary directory, removed at the end, or with ``keep`` kept and its path printed."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        if keep:
            print(f"kept          {path}")
        else:
            shutil.rmtree(path, ignore_errors=True)


def help_has(flag: str) -> bool:
    """Whether this daskdp's ``daskdp run --help`` lists ``flag`` (flags still being added)."""
    done = subprocess.run([*DASKDP, "run", "--help"], capture_output=True, text=True, timeout=300)
    return flag in done.stdout


# --- results -------------------------------------------------------------------------------------


def read_shards(output: Path) -> pd.DataFrame:
    """Every ``part-*.parquet`` of a results directory, in file order."""
    shards = sorted(output.glob("part-*.parquet"))
    if not shards:
        raise SystemExit(f"no shards in {output}")
    return pd.concat([pd.read_parquet(shard) for shard in shards], ignore_index=True)


def check_rows(name: str, results: pd.DataFrame, rows: int, tokens: int | pd.Series) -> pd.DataFrame:
    """Every input row exactly once, generated, with its ``tokens``; sorted by id.

    ``tokens`` is the output tokens every row must have (``ignore_eos``): one number, or a
    Series of them indexed by id.
    """
    ids = results["id"].astype("int64")
    if len(results) != rows or sorted(ids) != list(range(rows)):
        raise SystemExit(
            f"{name} did not produce all rows: {len(results)} rows with {ids.nunique()} distinct ids, "
            f"expected {rows}"
        )
    results = results.assign(id=ids).sort_values("id", ignore_index=True)
    problems = []
    if "error" in results and results["error"].notna().any():
        problems.append(f"{int(results['error'].notna().sum())} rows with an error")
    if results["generated_text"].isna().any():
        problems.append(f"{int(results['generated_text'].isna().sum())} rows without text")
    expected = tokens if isinstance(tokens, int) else tokens.sort_index().to_numpy()
    wrong = int((results["output_tokens"].fillna(-1).to_numpy(dtype="int64") != expected).sum())
    if wrong:
        want = f"{tokens} tokens" if isinstance(tokens, int) else "their max_tokens tokens"
        problems.append(f"{wrong} rows not of {want}")
    if problems:
        raise SystemExit(f"{name} did not produce all rows: " + "; ".join(problems))
    return results


def run_daskdp_checked(
    command: list[str], output: Path, name: str, rows: int, tokens: int | pd.Series, ranks: int | None = None
) -> tuple[dict, pd.DataFrame]:
    """``run_daskdp``, then ``check_rows`` on the results it wrote, named ``name``: the run and its rows."""
    run = run_daskdp(command, output, ranks=ranks)
    return run, check_rows(name, read_shards(output), rows, tokens)


def texts_differ(a: pd.DataFrame, b: pd.DataFrame) -> str:
    """``identical``, or how many rows differ, for two results sorted by id (greedy decoding)."""
    differ = int((a["generated_text"].to_numpy() != b["generated_text"].to_numpy()).sum())
    return "identical" if not differ else f"{differ} rows differ"


# --- the report ----------------------------------------------------------------------------------


def spread(times: Sequence[float]) -> str:
    return f"median {statistics.median(times):7.2f} s   spread {min(times):.2f}-{max(times):.2f} s"


def details(run: dict) -> str:
    phases = ", ".join(f"{name} {seconds:.2f}" for name, seconds in run["phases"].items())
    return f"cpu {run['cpu']:6.2f} s   [{phases}]"


def ratio(a: Sequence[float], b: Sequence[float]) -> tuple[float, str]:
    """The ratio b/a of the medians, and the ratio of each round."""
    per_round = "  ".join(f"{y / x:.3f}" for x, y in zip(a, b, strict=True))
    return statistics.median(b) / statistics.median(a), per_round


def verdict(value: float, target: float) -> str:
    return "met" if value <= target else "NOT met"


def imbalance(seconds: Sequence[float], ranks: int) -> float:
    """Makespan over the ideal: the longest rank's seconds over the total spread evenly on ``ranks``."""
    ideal = sum(seconds) / ranks
    return max(seconds) / ideal if ideal > 0 else float("nan")


class Sides:
    """The runs of each side of a benchmark, printed as they come, then their medians and ratios.

    ``labels``: each side's name by its key, ``{"a": "baseline", "b": "daskdp"}``, side ``a`` the
    one the others are compared with; ``width``: their column (default the longest label).
    """

    def __init__(self, labels: dict[str, str], width: int | None = None) -> None:
        self.labels = labels
        self.width = width or max(map(len, labels.values()))
        self.runs: dict[str, list[dict]] = {key: [] for key in labels}

    def record(self, round_: int, key: str, run: dict, note: str = "") -> None:
        """Add a run to side ``key`` and print its seconds, ``note`` and where they went."""
        self.runs[key].append(run)
        print(
            f"round {round_}  ({key}) {self.labels[key]:<{self.width}} {run['seconds']:7.2f} s   "
            f"{note}{details(run)}",
            flush=True,
        )

    def times(self, key: str) -> list[float]:
        """Side ``key``'s seconds, round by round."""
        return [run["seconds"] for run in self.runs[key]]

    def speed(self, key: str, rows: int) -> str:
        """Median and spread of side ``key``'s times, and its rows/s at the median, for ``rows`` rows."""
        times = self.times(key)
        return f"{spread(times)}   {rows / statistics.median(times):8,.0f} rows/s"

    def report(self, rows: int) -> dict[str, float]:
        """Print each side's speed, then each other side's median over ``a``'s; those ratios."""
        print()
        for key, label in self.labels.items():
            print(f"({key}) {label:<{self.width}}  {self.speed(key, rows)}")
        ratios = {}
        for key in list(self.labels)[1:]:
            ratios[key], per_round = ratio(self.times("a"), self.times(key))
            print(f"ratio {key}/a     {ratios[key]:.3f} (medians)   per round: {per_round}")
        return ratios
