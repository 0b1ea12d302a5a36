"""Load balance: chunks sized and spread by estimated cost, and dynamic partitioning."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from conftest import TINY_ENGINE, TINY_MODEL, daskdp_cli, read_results, run_oracle
from daskdp import plan
from daskdp.engine.stealing import ChunkQueue
from daskdp.errors import RunError
from daskdp.inputs import survey as surveys
from daskdp.output import schema
from daskdp.output.summary import check_finished

LONG, SHORT = 48, 4


@pytest.fixture(scope="module")
def skewed(tmp_path_factory):
    """2,000 rows grouped by length as datasets often arrive: 1,800 short, then 200 long."""
    directory = tmp_path_factory.mktemp("skewed")
    source = directory / "prompts.jsonl"
    rows = [
        {"id": f"r{i}", "prompt": f"Question {i}: say something about topic {i % 37}.", "max_tokens": n}
        for i, n in enumerate([SHORT] * 1800 + [LONG] * 200)
    ]
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return source


def run(source, out, client, *flags) -> pd.DataFrame:
    done = daskdp_cli(
        "run",
        source,
        "-o",
        out,
        "--scheduler-address",
        client.scheduler.address,
        "--ignore-eos",
        "--quiet",
        *flags,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return read_results(out).sort_values("id", ignore_index=True)


def partitions_of(out) -> dict[str, int]:
    """The partition each row of a finished run's output was planned in, by id."""
    summary = json.loads((out / schema.SUMMARY_FILE).read_text())
    planned = {chunk["chunk"]: chunk["partition"] for chunk in summary["chunks"]}
    return {
        row_id: planned[int(file.stem.removeprefix("part-"))]
        for file in out.glob("part-*.parquet")
        for row_id in pd.read_parquet(file, columns=["id"])["id"]
    }


def test_balanced_ranks_get_equal_work_from_skewed_input(skewed, tmp_path, cluster):
    """One partition per rank, each with about half the work (prompt and output tokens): an even
    split of the rows would give the second rank all the long rows (twice the first one's work)."""
    _, client = cluster
    out = tmp_path / "out"
    results = run(skewed, out, client)
    assert len(results) == 2000 and results["id"].is_unique and results["error"].isna().all()
    assert list(results["output_tokens"]) == list(results["max_tokens"])
    partitions = results["id"].map(partitions_of(out))
    work = (results["prompt_tokens"] + results["output_tokens"]).groupby(partitions).sum()
    assert len(work) == 2
    assert work.max() / work.min() < 1.1, work.to_dict()
    summary = json.loads((out / schema.SUMMARY_FILE).read_text())
    assert {chunk["rank"] for chunk in summary["chunks"]} == {0, 1}


def test_dynamic_partitioning_gives_the_same_rows(skewed, tmp_path, cluster):
    """Smaller partitions handed out as ranks free up: every row once, the same texts, both ranks busy."""
    _, client = cluster
    balanced = run(skewed, tmp_path / "balanced", client)
    dynamic = run(skewed, tmp_path / "dynamic", client, "--partitioning", "dynamic")
    assert len(set(partitions_of(tmp_path / "balanced").values())) == 2  # one per rank
    assert len(set(partitions_of(tmp_path / "dynamic").values())) > 4  # several per rank
    assert list(dynamic["id"]) == list(balanced["id"])
    assert list(dynamic["generated_text"]) == list(balanced["generated_text"])
    assert set(dynamic["rank"]) == {0, 1}


def test_bad_partitioning_is_one_line(skewed):
    done = daskdp_cli("run", skewed, "--partitioning", "random")
    assert done.returncode == 2
    assert "--partitioning: invalid choice: 'random'" in done.stderr


def test_costly_rows_make_smaller_chunks():
    """Uniform costs keep --chunk-size chunks; long rows at the end shrink them until no chunk
    holds more than 1/8 of a rank's share, but not below 64 rows."""
    uniform = np.full(20_000, 40)
    assert plan.chunk_layout(uniform, ranks=2, chunk_size=1024).chunk_rows == 1000
    skewed = np.concatenate([np.full(18_000, 10), np.full(2_000, 210)])
    layout = plan.chunk_layout(skewed, ranks=2, chunk_size=1024)
    chunk_costs = np.add.reduceat(skewed, np.arange(0, len(skewed), layout.chunk_rows))
    assert chunk_costs.max() <= skewed.sum() / 16
    assert 64 <= layout.chunk_rows < 1000
    assert plan.chunk_layout(np.array([1, 1, 1, 1000]), ranks=2, chunk_size=1024).chunk_rows == 2


def test_chunks_are_spread_costliest_first():
    """Each chunk goes to the cheapest group so far; groups come costliest first, chunks in input order."""
    costs = np.array([1, 1, 1, 1, 9, 4])
    assert plan.assign(costs, list(range(6)), 2) == [[4], [0, 1, 2, 3, 5]]
    assert plan.assign(costs, [0, 1], 4) == [[0], [1]]  # no more groups than chunks


def test_row_costs_are_prompt_and_output_tokens():
    part = pd.DataFrame(
        {
            "prompt": ["x" * 40, None, "y" * 8],
            "messages": [None, [{"role": "user", "content": "z" * 20}], None],
            "max_tokens": [None, 7, "bad"],
        }
    )
    assert list(surveys.row_costs(part, ("prompt", "messages"), 100)) == [110, 12, 102]


@pytest.fixture(scope="module")
def shared_prefixes(tmp_path_factory):
    """600 rows, each one of 4 long system prompts and a short question, the prompts shuffled;
    and 3 bad rows (a number, a null, an empty prompt) that become error rows."""
    directory = tmp_path_factory.mktemp("prefixes")
    heads = [
        f"System {k}: " + " ".join(f"rule {j} of policy {k}: be kind." for j in range(20)) for k in range(4)
    ]
    rows = [
        {"id": f"q{i}", "head": i * 7 % 4, "prompt": f"{heads[i * 7 % 4]} Question {i}?"} for i in range(600)
    ]
    rows[100:100] = [{"id": f"bad{i}", "head": -1, "prompt": p} for i, p in enumerate([42, None, ""])]
    source = directory / "prompts.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return source


def test_rows_sharing_a_prefix_meet_on_one_rank(shared_prefixes, tmp_path, cluster):
    """Prefix locality: each system prompt's rows go to one rank's partition (one may straddle two),
    the same texts as without it, and a resumed run redoes only the chunk that is missing."""
    _, client = cluster
    out = tmp_path / "out"
    local = run(shared_prefixes, out, client, "--max-tokens", 4)
    plain = run(shared_prefixes, tmp_path / "plain", client, "--max-tokens", 4, "--no-prefix-locality")
    assert json.loads((out / schema.MANIFEST_FILE).read_text())["row_order"] == "prefix"
    assert json.loads((tmp_path / "plain" / schema.MANIFEST_FILE).read_text())["row_order"] == "input"
    assert list(local["id"]) == list(plain["id"]) and local["id"].is_unique and len(local) == 603
    assert list(local["generated_text"].fillna("")) == list(plain["generated_text"].fillna(""))
    assert sorted(local.loc[local["error"].notna(), "id"]) == ["bad0", "bad1", "bad2"]
    local_partitions = local["id"].map(partitions_of(out))
    plain_partitions = plain["id"].map(partitions_of(tmp_path / "plain"))
    heads = local["head"] >= 0
    partitions_per_head = local_partitions[heads].groupby(local["head"][heads]).nunique()
    assert sorted(partitions_per_head) in ([1, 1, 1, 1], [1, 1, 1, 2]), partitions_per_head.to_dict()
    assert sorted(plain_partitions[heads].groupby(plain["head"][heads]).nunique()) == [2, 2, 2, 2]
    local = local[heads]
    summary = json.loads((out / schema.SUMMARY_FILE).read_text())
    assert summary["prefix_cache_hit_rate"] > 0.5

    lost = sorted(out.glob("part-*.parquet"))[1]
    lost_ids = set(pd.read_parquet(lost)["id"])
    lost.unlink()
    resumed = run(shared_prefixes, out, client, "--max-tokens", 4, "--resume")
    resumed = resumed[resumed["head"] >= 0]
    assert list(resumed["id"]) == list(local["id"])
    assert list(resumed["generated_text"]) == list(local["generated_text"])
    summary = json.loads((out / schema.SUMMARY_FILE).read_text())
    assert summary["rows_generated"] == len(lost_ids) and summary["rows_skipped"] == 603 - len(lost_ids)


def test_only_long_shared_prefixes_reorder_rows():
    prompts = pd.DataFrame({"prompt": ["a" * 2000, "b" * 2000, "short", "short"]})
    prefixed, keys = surveys.prefix_keys(prompts, ("prompt", "messages"))
    assert list(prefixed) == [0, 1]  # the short prompts have no long prefix, even equal ones
    survey = surveys.Survey([4], "", np.ones(4, dtype=np.float32), prefixed, keys)
    assert not survey.shares_prefixes()
    grouped = surveys.Survey(
        [4],
        "",
        np.array([1, 2, 3, 4]),
        np.arange(4),
        np.array([[5, 1], [9, 2], [5, 3], [9, 4]], dtype=np.uint64),
    )
    assert grouped.shares_prefixes()
    slots, costs = grouped.arrangement(by_prefix=True)
    assert list(slots) == [0, 2, 1, 3] and list(costs) == [1, 3, 2, 4]


def test_a_queue_gives_away_the_back_half_of_what_is_unstarted():
    """Work stealing's split: the engine takes chunks from the front, a rank without work gets
    the back half (rounded up), and nothing is handed out twice."""
    queue = ChunkQueue((n, pd.DataFrame({"id": range(10)})) for n in range(6))
    taken = iter(queue)
    assert next(taken)[0] == 0
    assert queue.rows() == 50
    assert queue.give_away() == [3, 4, 5]
    assert [n for n, _ in taken] == [1, 2]
    assert queue.give_away() == [] and queue.rows() == 0


# An engine of 24 sequences takes 48 requests ahead: all 5 chunks of 8 rows enter it at once
# (the queue is found empty), 3 run and 2 wait. A request to give work away comes after the
# first step.
STEAL_FROM_ENGINE = r"""
import asyncio, json, os, sys, threading
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
import pandas as pd
from vllm import LLM, SamplingParams
from daskdp import config
from daskdp.engine import loop as chunk_loop
from daskdp.engine.loop import step_chunks
from daskdp.engine.stealing import ChunkQueue, give_away
from daskdp.engine.requests import GenerationRequest
from daskdp.engine.rows import Chunk

chunk_loop.IN_ENGINE_SHARE = 0.01  # two batches ahead, as for a task much larger than them
spec = json.load(sys.stdin)
llm = LLM(model=spec["model"], **spec["engine"], max_num_seqs=24)
sampling = config.load(None, overrides={"sampling.max-tokens": 32, "sampling.ignore-eos": True})["sampling"]
request = GenerationRequest(sampling=sampling)
prompts = [f"Prompt {i}: tell me about topic {i * 13 % 97}." for i in range(40)]
rows = pd.DataFrame({"id": range(40), "prompt": prompts})
queue = ChunkQueue((n, rows.iloc[8 * n : 8 * n + 8]) for n in range(5))
answers, finished, seen = [], {}, []
gates = [(threading.Event(), threading.Event()) for _ in range(2)]  # (reached, asked)


class Report:
    def advance(self, rows, tokens):
        pass

    def due(self):
        return True

    def send(self):
        # Gate 0: after the first step. Gate 1: a step after chunks 0, 1 and 2 finished, when
        # chunk 3 (added again) has started. Each holds the loop until a request is in.
        seen.append(len(finished))
        gate = 0 if len(seen) == 1 else 1 if seen[-2:] == [3, 3] else None
        if gate is not None and not gates[gate][0].is_set():
            gates[gate][0].set()
            gates[gate][1].wait(60)


def ask(gate):
    gates[gate][0].wait(60)
    asking = threading.Thread(target=lambda: answers.append(asyncio.run(give_away("task"))))
    asking.start()
    while not queue.asked and asking.is_alive():
        pass
    gates[gate][1].set()
    asking.join()


with queue.shared("task"):
    chunks = (Chunk(n, part) for n, part in queue)
    loop = threading.Thread(
        target=step_chunks, args=(llm, chunks, request, Report(), lambda c: finished.update({c.number: c}), queue)
    )
    loop.start()
    gates[0][0].wait(60)
    in_queue, unstarted_rows = len(queue.chunks), queue.rows()
    ask(0)
    ask(1)
    loop.join()
plain = llm.generate(prompts, SamplingParams(max_tokens=32, ignore_eos=True, temperature=0), use_tqdm=False)
texts = {n: [samples[0].text for samples in chunk.samples] for n, chunk in finished.items()}
tokens = {n: [samples[0].tokens for samples in chunk.samples] for n, chunk in finished.items()}
print("ORACLE" + json.dumps({
    "in_queue": in_queue, "unstarted_rows": unstarted_rows, "answers": answers, "texts": texts, "tokens": tokens,
    "plain": [o.outputs[0].text for o in plain],
}))
"""


def test_an_idle_rank_takes_chunks_that_entered_the_engine_but_did_not_start():
    """Work stealing reaches into the engine: with every chunk already in the busy rank's engine
    (its queue empty), a request to give work away takes the back half of the chunks none of
    whose requests had started (their requests aborted there); a chunk with a started request
    is never given. Every chunk is finished by exactly one side, the ones taken back and added
    again with the same greedy texts as plain vLLM."""
    result = run_oracle(STEAL_FROM_ENGINE, {"model": str(TINY_MODEL), "engine": TINY_ENGINE})
    assert result["in_queue"] == 0  # every chunk had entered the engine
    assert result["unstarted_rows"] == 16  # chunks 3 and 4 waited in its scheduler
    assert result["answers"] == [[4], []]  # the back half of [3, 4]; then chunk 3 had started
    assert sorted(result["texts"], key=int) == ["0", "1", "2", "3"]  # chunk 4 never finished here
    for n, texts in result["texts"].items():
        assert texts == result["plain"][8 * int(n) : 8 * int(n) + 8], f"chunk {n}"
        assert result["tokens"][n] == [32] * 8


def test_a_run_missing_rows_does_not_pass_as_finished():
    """The last guard of "every row once": a run whose chunks do not cover the input fails,
    resumable, naming how many rows have no result."""
    summary = {"rows": 1000, "rows_done": 900, "timed_out_rows": 0, "error_rows": 0}
    with pytest.raises(RunError, match="100 of 1,000 rows have no result") as raised:
        check_finished(summary, max_error_rate=None)
    assert raised.value.resumable
    check_finished(summary | {"rows_done": 1000}, max_error_rate=None)
