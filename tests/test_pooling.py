"""The pooling tasks (--task embed, classify, score) on the real engine: parity with plain
vLLM's ``LLM.embed``, ``LLM.classify`` and ``LLM.score``, every row exactly once, error rows, a
resume, and a run on two ranks whose chunks read back lazily.

The test models are built into a temporary directory by tools/make_pooling_models.py: a tiny
classifier with three labels and a tiny cross-encoder (one label); the packaged tiny Llama is
the embedding model. One plain-vLLM subprocess answers every parity question of the module,
started first so that it runs while the cluster's engines load.
"""

from __future__ import annotations

import importlib.util
import json
import re

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

import daskdp
from conftest import REPO, TINY_ENGINE, TINY_MODEL, count_engines, daskdp_cli, error_line, start_oracle
from daskdp import config
from daskdp.engine.plugin import EnginePlugin, engine_status
from daskdp.errors import RunError, UserError

TEXTS = [
    f"Sentence {i}: the {['river', 'moon', 'bread', 'chess'][i % 4]} is {i * 7 % 13} times calm."
    for i in range(40)
]
PAIRS_1 = TEXTS[:20]
PAIRS_2 = TEXTS[20:40]
LONG_TEXT = "rivers " * 3000  # more tokens than max_model_len 2048
KEEP = 50  # truncate-prompt-tokens
ERROR_ROWS = {"": "prompt is empty", None: "prompt is null", LONG_TEXT: "too long for max_model_len 2048"}

ORACLE = r"""
import json, os, sys
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
from vllm import LLM
spec = json.load(sys.stdin)
out = {}
llm = LLM(model=spec["embedder"], runner="pooling", **spec["engine"])
out["embed"] = [o.outputs.embedding for o in llm.embed(spec["texts"], use_tqdm=False)]
out["truncated"] = llm.embed([spec["long"]], use_tqdm=False, tokenization_kwargs={"truncate_prompt_tokens": spec["keep"]})[0].outputs.embedding
out["cosine"] = [o.outputs.score for o in llm.score(spec["pairs_1"], spec["pairs_2"], use_tqdm=False)]
del llm
llm = LLM(model=spec["classifier"], runner="pooling", **spec["engine"])
out["classify"] = [o.outputs.probs for o in llm.classify(spec["texts"], use_tqdm=False)]
del llm
llm = LLM(model=spec["cross_encoder"], runner="pooling", **spec["engine"])
out["cross"] = [o.outputs.score for o in llm.score(spec["pairs_1"], spec["pairs_2"], use_tqdm=False)]
print("ORACLE" + json.dumps(out))
"""


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The tiny classifier and cross-encoder, built as tools/make_pooling_models.py builds them."""
    spec = importlib.util.spec_from_file_location(
        "make_pooling_models", REPO / "tools" / "make_pooling_models.py"
    )
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    directory = tmp_path_factory.mktemp("models")
    built = {name: str(path) for name, path in tool.build_all(directory).items()}
    # As the oracle runs them: vLLM's CPU backend loads a float32 model in float16 unless told.
    (directory / "float32.yaml").write_text("daskdp:\n  engine:\n    dtype: float32\n")
    return built | {"config": str(directory / "float32.yaml")}


@pytest.fixture(scope="module")
def plain(models):
    """Plain vLLM's answers, from one oracle started now and read when a test needs them."""
    spec = {
        "embedder": str(TINY_MODEL),
        "classifier": models["classifier"],
        "cross_encoder": models["cross-encoder"],
        "engine": TINY_ENGINE,
        "texts": TEXTS,
        "pairs_1": PAIRS_1,
        "pairs_2": PAIRS_2,
        "long": LONG_TEXT,
        "keep": KEEP,
    }
    answers = start_oracle(ORACLE, spec)
    return lambda key: answers()[key]


def close(ours, theirs) -> None:
    """DECISIONS.md's parity: allclose(rtol 1e-5, atol 1e-6)."""
    ours, theirs = np.asarray(ours, dtype=np.float64), np.asarray(theirs, dtype=np.float64)
    assert ours.shape == theirs.shape
    assert np.allclose(ours, theirs, rtol=1e-5, atol=1e-6), np.abs(ours - theirs).max()


def computed(client, frame) -> pd.DataFrame:
    return client.compute(frame, resources={"GPU": 1}).result().sort_values("id").reset_index(drop=True)


def with_bad_rows(texts: list) -> pd.DataFrame:
    return pd.DataFrame({"prompt": [*texts, *ERROR_ROWS]})


def test_embed_matches_plain_vllm_with_one_row_each(cluster, plain):
    _, client = cluster
    lazy = daskdp.embed(with_bad_rows(TEXTS), client=client)
    assert lazy.npartitions == 2
    assert lazy.dtypes["embedding"] == pd.ArrowDtype(pa.list_(pa.float32(), 128))
    # The engines were loaded for embedding: a warm cluster's generation engines were replaced.
    held = {status[0] for status in client.run(engine_status).values()}
    settings = config.load(overrides={"run.task": "embed"})
    model, engine_args = config.engine_arguments(settings, gpu_host=False)
    pooling = config.pooling_options(settings)
    assert held == {EnginePlugin(model, engine_args, task="embed", pooling=pooling).fingerprint}
    assert EnginePlugin(model, engine_args, task="generate").fingerprint not in held
    results = computed(client, lazy)
    assert list(results["id"]) == list(range(len(TEXTS) + len(ERROR_ROWS)))
    fine, bad = results.iloc[: len(TEXTS)], results.iloc[len(TEXTS) :]
    assert fine["error"].isna().all()
    close(np.stack(fine["embedding"].to_numpy()), plain("embed"))
    for (_, row), reason in zip(bad.iterrows(), ERROR_ROWS.values(), strict=True):
        assert reason in row["error"] and pd.isna(row["embedding"])
    assert not {"generated_text", "output_tokens", "finish_reason"} & set(results.columns)

    truncated = computed(
        client,
        daskdp.embed(pd.DataFrame({"prompt": [LONG_TEXT]}), client=client, truncate_prompt_tokens=KEEP),
    )
    assert truncated["error"].isna().all() and truncated["prompt_tokens"].iloc[0] == KEEP
    close(truncated["embedding"].iloc[0], plain("truncated"))


def test_score_by_cosine_on_an_embedding_model(cluster, plain):
    _, client = cluster
    pairs = pd.DataFrame({"query": PAIRS_1 + ["a question"], "document": PAIRS_2 + [""]})
    with pytest.raises(UserError, match="no 'text_1' column for --task score"):
        daskdp.score(pairs, client=client)
    renamed = pairs.rename(columns={"query": "text_1", "document": "text_2"})
    results = computed(client, daskdp.score(renamed, client=client))
    assert results["score"].dtype == "Float64"
    close(results["score"].iloc[:-1], plain("cosine"))
    assert results["error"].iloc[-1] == "text_2 is empty" and pd.isna(results["score"].iloc[-1])


def test_run_on_two_ranks_resumes_and_reads_back_lazily(cluster, plain, tmp_path):
    """`daskdp.run` on the warm cluster: chunk files of embeddings, a resume that redoes only a
    lost chunk, every row once, and the chunks read back one partition each."""
    _, client = cluster
    source = tmp_path / "texts.parquet"
    with_bad_rows(TEXTS).to_parquet(source)
    out = tmp_path / "out"
    overrides = {
        "cluster.scheduler-address": client.scheduler.address,
        "run.task": "embed",
        "run.chunk-size": 8,
    }
    summary = daskdp.run(str(source), str(out), overrides=overrides)
    assert summary["task"] == "embed" and summary["dimension"] == 128
    assert summary["error_rows"] == len(ERROR_ROWS) and summary["output_tokens"] == 0
    assert set(summary["ranks"]) == {0, 1}
    chunks = sorted(out.glob("part-*.parquet"))
    assert len(chunks) == summary["rows"] // 8 + 1

    lost = chunks[2]  # a chunk lost midway: its file and record
    lost.unlink()
    (out / "_chunks" / f"{lost.stem.removeprefix('part-')}.done.json").unlink()
    with pytest.raises(
        UserError, match=r"differs from it in its task \(--task embed then, --task generate now\); run with"
    ):
        daskdp.run(str(source), str(out), overrides={**overrides, "run.task": "generate"}, resume=True)
    resumed = daskdp.run(str(source), str(out), overrides=overrides, resume=True)
    assert resumed["rows_generated"] == 8 and resumed["rows_skipped"] == summary["rows"] - 8

    lazy = daskdp.read_results(out)
    assert lazy.npartitions == len(chunks)
    results = lazy.compute().sort_values("id").reset_index(drop=True)
    assert list(results["id"]) == list(range(summary["rows"]))
    close(np.stack(results["embedding"].iloc[: len(TEXTS)].to_numpy()), plain("embed"))

    from daskdp.report import write_report

    page = open(write_report(out), encoding="utf-8").read()
    assert "<h2>Embedding norms</h2>" in page and "<dt>dimension</dt><dd>128</dd>" in page


def run_and_report(client, models, task: str, rows: pd.DataFrame, tmp_path, heading: str) -> pd.DataFrame:
    """``rows`` through ``daskdp.run`` on the warm cluster with the engines of ``task``'s test
    model; the report must show ``heading``. The results, by id."""
    from daskdp.report import write_report

    source, out = tmp_path / "rows.parquet", tmp_path / "out"
    rows.to_parquet(source)
    model = models["classifier" if task == "classify" else "cross-encoder"]
    overrides = {"cluster.scheduler-address": client.scheduler.address, "run.task": task, "model": model}
    daskdp.run(str(source), str(out), config_file=models["config"], overrides=overrides)
    assert heading in open(write_report(out), encoding="utf-8").read()
    return daskdp.read_results(out).compute().sort_values("id").reset_index(drop=True)


def test_classify_matches_plain_vllm(cluster, plain, models, tmp_path):
    _, client = cluster
    results = computed(
        client,
        daskdp.classify(
            with_bad_rows(TEXTS), models["classifier"], client=client, config_file=models["config"]
        ),
    )
    fine = results.iloc[: len(TEXTS)]
    probs = np.stack(fine["probs"].to_numpy())
    close(probs, plain("classify"))
    names = np.array(["negative", "neutral", "positive"])
    assert list(fine["label"]) == list(names[np.argmax(plain("classify"), axis=1)])
    assert results["label"].iloc[len(TEXTS) :].isna().all()

    # The same engines through `daskdp.run`: labels written, counted in the report.
    written = run_and_report(client, models, "classify", with_bad_rows(TEXTS), tmp_path, "<h2>Labels</h2>")
    assert list(written["label"].iloc[: len(TEXTS)]) == list(fine["label"])


def test_score_on_a_cross_encoder_matches_plain_vllm(cluster, plain, models, tmp_path):
    _, client = cluster
    pairs = pd.DataFrame({"text_1": PAIRS_1, "text_2": PAIRS_2})
    results = computed(
        client, daskdp.score(pairs, models["cross-encoder"], client=client, config_file=models["config"])
    )
    close(results["score"], plain("cross"))
    written = run_and_report(client, models, "score", pairs, tmp_path, "<h2>Scores</h2>")
    close(written["score"], plain("cross"))


@pytest.mark.slow  # loads (and refuses) an engine on both ranks
def test_a_model_that_cannot_serve_the_task_is_refused(cluster, models):
    _, client = cluster
    with pytest.raises(Exception, match="cannot serve --task embed .* give --model an embedding model"):
        daskdp.embed(pd.DataFrame({"prompt": TEXTS}), models["classifier"], client=client)
    assert set(client.run(count_engines).values()) == {0}  # the refused engines are freed


@pytest.mark.slow  # loads (and refuses) an engine on both ranks
def test_dimensions_the_model_refuses_fail_the_load_in_one_line(cluster):
    _, client = cluster
    with pytest.raises(RunError, match="does not support Matryoshka embeddings; dimensions must be unset"):
        daskdp.embed(pd.DataFrame({"prompt": TEXTS}), client=client, dimensions=32)
    assert set(client.run(count_engines).values()) == {0}  # nothing of the failed load stays


@pytest.mark.parametrize(
    ("rows", "task", "message"),
    [
        (
            {"prompt": "a"},
            "score",
            "has no 'text_1' column for --task score (columns: prompt); name it with input.text-1-column",
        ),
        (
            {"prompt": "a", "embedding": 1},
            "embed",
            "has the name of a result column daskdp adds (embedding,",
        ),
        ({"prompt": 1}, "classify", "column 'prompt' of"),
    ],
)
def test_bad_columns_are_refused_before_any_engine(tmp_path, rows, task, message):
    source = tmp_path / "rows.jsonl"
    source.write_text(json.dumps(rows) + "\n")
    with pytest.raises(UserError, match=re.escape(message)):
        daskdp.run(str(source), str(tmp_path / "out"), overrides={"run.task": task})
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # a fresh process that starts the forkserver (it imports vLLM)
def test_cli_refuses_pairs_without_their_columns(tmp_path):
    source = tmp_path / "pairs.jsonl"
    source.write_text('{"prompt": "a"}\n')
    done = daskdp_cli("run", source, "--task", "score", "--quiet")
    error_line(done, "no 'text_1' column for --task score", "input.text-1-column")
    assert not (tmp_path / "pairs.out").exists()
