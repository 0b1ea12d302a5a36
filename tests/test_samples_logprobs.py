"""n samples and logprobs per row (issue 22): parity with plain vLLM, the rows a user counts on
(every (id, sample) once, a failed request one row), the refusals, and a killed n = 4 run resumed.

Every parity check of the module is answered by ONE plain-vLLM subprocess (`oracle`); the
generations run on the session's warm cluster through the lazy API.
"""

from __future__ import annotations

import json
import os
import signal

import pandas as pd
import pytest
from test_faults import assert_gone, family, start_run, wait_for_chunks

import daskdp
from conftest import TINY_ENGINE, TINY_MODEL, daskdp_cli, error_line, read_results, run_oracle
from daskdp.errors import UserError

MAX_TOKENS = 8
LOGPROBS, PROMPT_LOGPROBS = 2, 1  # run-wide
# Sampled rows: each its own n, temperature and seed (and one top_p, one top_k), as columns.
SAMPLED = [
    {"id": "s0", "prompt": "Tell me about the sea.", "n": 3, "temperature": 0.8, "seed": 11},
    {"id": "s1", "prompt": "A story of two cats", "n": 2, "temperature": 1.0, "seed": 5, "top_p": 0.9},
    {"id": "s2", "prompt": "Why is the sky blue?", "n": 4, "temperature": 0.7, "seed": 3, "top_k": 20},
]
# Greedy rows (the run's temperature 0): one with its own top_logprobs, one with a stop string.
GREEDY = [
    {"id": "g0", "prompt": "List three colours.", "top_logprobs": 5},
    {"id": "g1", "prompt": "Count to ten."},
]
STOPPED = {"id": "t0", "prompt": "Name a river in Europe."}  # its stop string comes from the oracle

ORACLE = r"""
import json, os, sys
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
from vllm import LLM, SamplingParams
spec = json.load(sys.stdin)
llm = LLM(model=spec["model"], **spec["engine"])

def logprobs(positions):
    if positions is None:
        return None
    return [None if p is None else [[i, l.logprob, l.rank] for i, l in p.items()] for p in positions]

def run(rows):
    params = [SamplingParams(**{**spec["sampling"], **row["params"]}) for row in rows]
    outs = llm.generate([row["prompt"] for row in rows], params, use_tqdm=False)
    return {
        row["id"]: {
            "samples": [
                [c.text, c.token_ids, logprobs(c.logprobs), c.cumulative_logprob]
                for c in sorted(o.outputs, key=lambda c: c.index)
            ],
            "prompt_logprobs": logprobs(o.prompt_logprobs),
        }
        for row, o in zip(rows, outs)
    }

out = run(spec["rows"])
# A stop string that the unstopped greedy text holds: the row generated with it must stop early.
free = run([spec["stopped"]])[spec["stopped"]["id"]]["samples"][0][0]
stop = free[3:5]
stopped = dict(spec["stopped"], params={**spec["stopped"]["params"], "stop": [stop]})
out.update(run([stopped]))
out["stop"] = {"string": stop, "unstopped": free}
print("ORACLE" + json.dumps(out))
"""


def engine_params(row: dict) -> dict:
    """The SamplingParams arguments a row's own columns set."""
    names = {"top_logprobs": "logprobs"}
    return {names.get(k, k): v for k, v in row.items() if k not in ("id", "prompt")}


@pytest.fixture(scope="module")
def oracle():
    """Plain vLLM on every row of the module, in one process."""
    spec = {
        "model": str(TINY_MODEL),
        "engine": TINY_ENGINE,
        "sampling": {"max_tokens": MAX_TOKENS, "logprobs": LOGPROBS, "prompt_logprobs": PROMPT_LOGPROBS},
        "rows": [
            {"id": row["id"], "prompt": row["prompt"], "params": {"temperature": 0.0, **engine_params(row)}}
            for row in SAMPLED + GREEDY
        ],
        "stopped": {**STOPPED, "params": {"temperature": 0.0}},
    }
    return run_oracle(ORACLE, spec)


@pytest.fixture(scope="module")
def results(cluster, oracle):
    """The module's rows through ``daskdp.generate`` (run-wide: greedy, logprobs and prompt logprobs),
    plus one row asking for n = 2 with greedy decoding."""
    _, client = cluster
    rows = [*SAMPLED, *GREEDY, {**STOPPED, "stop": oracle["stop"]["string"]}]
    rows.append({"id": "bad", "prompt": "Two greedy samples?", "n": 2})
    frame = pd.DataFrame(rows)
    lazy = daskdp.generate(
        frame, client=client, max_tokens=MAX_TOKENS, logprobs=LOGPROBS, prompt_logprobs=PROMPT_LOGPROBS
    )
    assert list(lazy.columns) == list(lazy._meta.columns)  # the meta names every result column
    computed = client.compute(lazy, resources={"GPU": 1}).result()
    nested = ["logprobs", "prompt_logprobs"]  # lists of dicts, as pd.read_parquet gives them
    assert computed.drop(columns=nested).dtypes.equals(lazy._meta.drop(columns=nested).dtypes)
    assert all(dtype == "object" for dtype in computed[nested].dtypes)
    return computed


def by_sample(results: pd.DataFrame, row_id: str) -> pd.DataFrame:
    return results[results["id"] == row_id].sort_values("sample")


def assert_logprobs_equal(ours, theirs, k: int | None = None) -> None:
    """Token by token: the same token and alternatives, logprobs within 1e-4; ``k``: the
    alternatives are the top k, plus the token itself when it is not among them."""
    assert (ours is None) == (theirs is None)
    if theirs is None:
        return
    assert len(ours) == len(theirs)
    for mine, position in zip(ours, theirs, strict=True):
        if position is None:  # the prompt's first token
            assert mine is None
            continue
        (token_id, logprob, rank), *_ = position
        assert (mine["token_id"], mine["rank"]) == (token_id, rank)
        assert abs(mine["logprob"] - logprob) < 1e-4
        top = {t["token_id"]: (t["logprob"], t["rank"]) for t in mine["top"]}
        assert set(top) == {i for i, _, _ in position}
        for i, expected, expected_rank in position:
            assert abs(top[i][0] - expected) < 1e-4 and top[i][1] == expected_rank
        if k is not None:  # the top k, and the token itself when it ranks below them
            assert len(mine["top"]) == (k if rank <= k else k + 1)
            others = [t["rank"] for t in mine["top"] if t["token_id"] != token_id or rank <= k]
            assert sorted(others) == list(range(1, k + 1))


def test_n_samples_with_a_seed_are_plain_vllms_samples(results, oracle):
    """Each sampled row has its n samples, 0..n-1, beside its repeated id and input columns;
    their texts are plain vLLM's with the same seed (and top_p / top_k)."""
    for row in SAMPLED:
        rows = by_sample(results, row["id"])
        assert list(rows["sample"]) == list(range(row["n"]))
        assert (rows["prompt"] == row["prompt"]).all() and rows["error"].isna().all()
        expected = oracle[row["id"]]["samples"]
        assert list(rows["generated_text"]) == [text for text, *_ in expected]
        assert list(rows["output_tokens"]) == [len(ids) for _, ids, *_ in expected]
    texts = by_sample(results, "s2")["generated_text"]
    assert texts.nunique() > 1, "the samples of a row should differ"


def test_logprobs_are_plain_vllms(results, oracle):
    """Every generated token's logprob, rank and alternatives (top K, K from the row's own
    top_logprobs or the run's) equal plain vLLM's within 1e-4, and the cumulative logprob too;
    prompt logprobs are on sample 0 only."""
    for row in SAMPLED + GREEDY:
        rows = by_sample(results, row["id"])
        k = row.get("top_logprobs", LOGPROBS)
        for (_, mine), (_, _, theirs, cumulative) in zip(
            rows.iterrows(), oracle[row["id"]]["samples"], strict=True
        ):
            assert len(mine["logprobs"]) == mine["output_tokens"]
            assert_logprobs_equal(mine["logprobs"], theirs, k)
            assert abs(mine["cumulative_logprob"] - cumulative) < 1e-3
        prompt = list(rows["prompt_logprobs"])
        assert_logprobs_equal(prompt[0], oracle[row["id"]]["prompt_logprobs"], PROMPT_LOGPROBS)
        assert all(p is None or p is pd.NA for p in prompt[1:])


def test_a_rows_stop_top_p_and_top_k_reach_the_engine(results, oracle):
    """The row with its own stop string stops where plain vLLM stops with it, short of the text
    without it."""
    (text,) = by_sample(results, STOPPED["id"])["generated_text"]
    expected = oracle[STOPPED["id"]]["samples"][0][0]
    assert text == expected
    assert len(text) < len(oracle["stop"]["unstopped"])


def test_n_above_one_with_greedy_decoding_is_one_error_row(results):
    rows = results[results["id"] == "bad"]
    assert len(rows) == 1
    (error,) = rows["error"]
    assert "n is 2 with temperature 0" in error and "greedy" in error
    assert rows["sample"].isna().all() and rows["generated_text"].isna().all()


def test_without_n_or_logprobs_every_row_is_sample_0_with_null_logprobs(cluster):
    _, client = cluster
    frame = pd.DataFrame({"prompt": ["One", "Two", "Three"]})
    lazy = daskdp.generate(frame, client=client, max_tokens=3)
    computed = client.compute(lazy, resources={"GPU": 1}).result()
    assert list(computed["sample"]) == [0, 0, 0]
    for column in ("logprobs", "cumulative_logprob", "prompt_logprobs"):
        assert computed[column].isna().all(), column


def test_run_wide_n_with_greedy_decoding_is_refused_in_one_line(tmp_path, cluster):
    source = tmp_path / "prompts.jsonl"
    source.write_text('{"prompt": "Hi"}\n')
    done = daskdp_cli("run", source, "--n", 4)
    line = error_line(done, "--n 4", "temperature 0", "--temperature")
    assert not (tmp_path / "prompts.out").exists(), line
    with pytest.raises(UserError, match="--n 3 with temperature 0"):
        daskdp.generate(pd.DataFrame({"prompt": ["Hi"]}), client=cluster[1], n=3)


@pytest.mark.parametrize("column", ["sample", "logprobs", "generated_text"])
def test_an_input_column_named_like_a_result_column_is_refused(tmp_path, column):
    source = tmp_path / "prompts.jsonl"
    source.write_text(json.dumps({"prompt": "Hi", column: 1}) + "\n")
    error_line(daskdp_cli("run", source), f"column '{column}' of {source}", "result column", "rename")
    assert not (tmp_path / "prompts.out").exists()


@pytest.mark.slow
def test_a_killed_n_4_run_resumes_with_every_sample_once(tmp_path, cluster):
    """SIGKILL a run of 4 samples per row once some chunks are written; --resume with another n is
    refused, and with the same settings finishes it with every (id, sample) exactly once; the
    chunk records count input rows."""
    rows = 80
    source = tmp_path / "prompts.parquet"
    pd.DataFrame(
        {
            "id": [f"r{i:03d}" for i in range(rows)],
            "prompt": [f"Story {i} about the sea." for i in range(rows)],
            "max_tokens": [16 + 2 * i for i in range(rows)],  # chunks finish one after another
        }
    ).to_parquet(source)
    output = tmp_path / "out"
    args = ["-o", output, "--chunk-size", 10, "--n", 4, "--temperature", 0.8, "--seed", 1, "--quiet"]
    process = start_run(source, *args, "--workers", 2)
    wait_for_chunks(output, 2, process)
    processes = family(process)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert_gone(processes)
    records = [json.loads(p.read_text()) for p in (output / "_chunks").glob("*.done.json")]
    assert records and all(r["rows"] == 10 and r["output_rows"] == 40 for r in records)

    address = ["--scheduler-address", cluster[1].scheduler.address]
    changed = [*args[:5], 2, *args[6:]]  # --n 2
    refused = daskdp_cli("run", source, *changed, *address, "--resume")
    error_line(refused, "cannot resume", "sampling.n: 4 then, 2 now")
    done = daskdp_cli("run", source, *args, *address, "--resume")
    assert done.returncode == 0, done.stderr[-3000:]
    results = read_results(output)
    pairs = sorted(zip(results["id"], results["sample"], strict=True))
    assert pairs == [(f"r{i:03d}", k) for i in range(rows) for k in range(4)]
    summary = json.loads((output / "_summary.json").read_text())
    assert summary["rows_skipped"] >= 20 and summary["rows"] == rows
    assert summary["output_rows"] == 4 * rows
