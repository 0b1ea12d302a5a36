"""OpenAI Batch files: `daskdp run batch.jsonl --export results.jsonl` and `daskdp export`.

The file is shaped like vLLM's example (examples/offline_inference/openai_batch/
openai_example_batch.jsonl: chat requests with messages and max_completion_tokens), greedy
(``"temperature": 0`` in each body), on the warm session cluster. Each answer is checked
against plain vLLM's ``LLM.chat``; each output body parses with the ``openai`` package's own
models. Bodies with per-row control (n samples with logprobs, response_format, structured
outputs) ride in the same file. The pooling endpoints (embeddings, score, rerank) run in two
more files on the same cluster, their task read from their lines, against one plain-vLLM
pooling subprocess; a slow test compares lines with vLLM's own run_batch field for field.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import jsonschema
import numpy as np
import pandas as pd
import pytest
from openai.types import Completion, CreateEmbeddingResponse
from openai.types.chat import ChatCompletion

from conftest import (
    DASKDP,
    TINY_ENGINE,
    TINY_MODEL,
    daskdp_cli,
    error_line,
    plain_vllm,
    read_results,
    start_oracle,
)

TOKENS = 12
# Half the requests share a long system prompt: prefix locality reorders them, so the chunk
# files are not in input order and the export has to restore it.
SHARED = "You are a helpful assistant. " * 8
CHATS = [
    [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "Hello world!"}],
    [
        {"role": "system", "content": "You are an unhelpful assistant."},
        {"role": "user", "content": "Hello world!"},
    ],
] + [
    [{"role": "system", "content": SHARED if i % 2 else f"Answer in {i} words."},
     {"role": "user", "content": f"Tell me about topic {i}."}]
    for i in range(14)
]  # fmt: skip
PROMPTS = ["Once upon a time", "The capital of France is"]


def chat(custom_id, messages, **body):
    body = {"model": "tiny", "messages": messages, "max_completion_tokens": TOKENS, "temperature": 0, **body}
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}


def completion(custom_id, prompt):
    body = {"model": "tiny-llama", "prompt": prompt, "max_tokens": TOKENS, "temperature": 0}
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/completions", "body": body}


# custom_id -> the error line's code and the words its message must hold
BAD = {
    "wrong-model": ("model_not_found", "body.model 'gpt-4o' is not this run's model (tiny, "),
    "unsupported": ("unsupported_value", "body.logit_bias is not supported by daskdp"),
    "embeddings": ("unsupported_value", "/v1/embeddings needs an embedding engine (--task embed)"),
    "no-messages": ("invalid_request", "body.messages is missing"),
    "get": ("invalid_request", "method must be POST, got 'GET'"),
}


# Requests with per-row control: n samples with logprobs, a response_format JSON Schema (one
# that the tiny model ends well within its tokens: objects it fills with whitespace), a choice.
SAMPLES = chat("samples", CHATS[2], n=2, temperature=0.8, seed=7, logprobs=True, top_logprobs=2)
SCHEMA = {"type": "array", "items": {"type": "boolean"}, "minItems": 1, "maxItems": 2}
SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "flags", "schema": SCHEMA}}
CONTROLLED = [
    SAMPLES,
    chat("schema", CHATS[3], max_completion_tokens=24, response_format=SCHEMA_FORMAT),
    chat("choice", CHATS[4], structured_outputs={"choice": ["yes", "no", "maybe"]}),
]


def batch_lines() -> list[dict]:
    """Good requests with bad ones among them, in an order the test checks on export."""
    lines = [chat(f"request-{i + 1}", messages) for i, messages in enumerate(CHATS)]
    lines.insert(
        1, chat("wrong-model", CHATS[0]) | {"body": chat("", CHATS[0])["body"] | {"model": "gpt-4o"}}
    )
    lines.insert(3, chat("unsupported", CHATS[0], logit_bias={"5": 10}))
    lines.insert(5, {"custom_id": "embeddings", "method": "POST", "url": "/v1/embeddings",
                     "body": {"model": "tiny", "input": "Hello"}})  # fmt: skip
    lines.insert(7, {"custom_id": "no-messages", "method": "POST", "url": "/v1/chat/completions",
                     "body": {"model": "tiny"}})  # fmt: skip
    lines.insert(9, chat("get", CHATS[0]) | {"method": "GET"})
    lines += [completion(f"text-{i}", prompt) for i, prompt in enumerate(PROMPTS)]
    return lines + CONTROLLED


def write_lines(path, lines) -> None:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


@pytest.fixture(scope="module")
def oracle():
    """Plain vLLM for every good request: LLM.chat for the chats, LLM.generate for the prompts."""
    return plain_vllm(
        PROMPTS, CHATS, max_tokens_per_prompt=[TOKENS] * len(PROMPTS), temperature=0.0, max_tokens=TOKENS
    )


@pytest.fixture(scope="module")
def batch_run(tmp_path_factory, cluster):
    """The batch file through `daskdp run --export` on the warm cluster."""
    _, client = cluster
    folder = tmp_path_factory.mktemp("batch")
    source, output, exported = folder / "batch.jsonl", folder / "batch.out", folder / "results.jsonl"
    write_lines(source, batch_lines())
    done = daskdp_cli(
        "run", source, "--scheduler-address", client.scheduler.address, "--chunk-size", 4,
        "--export", exported, "--quiet",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return source, output, exported, done


def test_batch_file_answers_as_plain_vllm_in_input_order(batch_run, oracle):
    """One line per request, in input order; each answer is plain vLLM's for its body, and
    each body parses as the openai package's ChatCompletion or Completion."""
    source, output, exported, done = batch_run
    lines = [json.loads(line) for line in exported.read_text().splitlines()]
    assert [line["custom_id"] for line in lines] == [line["custom_id"] for line in batch_lines()]
    assert "exported 26 requests (5 failed)" in done.stdout
    assert read_results(output)["position"].tolist() != list(range(len(lines)))  # prefix order on disk

    answers = {line["custom_id"]: line for line in lines if line["error"] is None}
    texts = [text for text, _, _ in oracle["messages"]] + [text for text, _, _ in oracle["prompts"]]
    assert len(set(texts)) > len(texts) // 2  # distinct enough that a mix-up would show
    ids = [f"request-{i + 1}" for i in range(len(CHATS))] + [f"text-{i}" for i in range(len(PROMPTS))]
    for custom_id, (text, completion_tokens, prompt_tokens) in zip(
        ids, oracle["messages"] + oracle["prompts"], strict=True
    ):
        line = answers[custom_id]
        assert line["response"]["status_code"] == 200 and line["response"]["request_id"].startswith(
            "vllm-batch-"
        )
        body = line["response"]["body"]
        assert body["model"] == "tiny"
        assert body["usage"] == {
            "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": None, **({"completion_tokens_details": None} if "request" in custom_id else {}),
        }  # fmt: skip
        if custom_id.startswith("text-"):
            parsed = Completion.model_validate(body)
            assert parsed.object == "text_completion" and parsed.choices[0].text == text
        else:
            parsed = ChatCompletion.model_validate(body)
            assert parsed.object == "chat.completion" and parsed.choices[0].message.content == text
        assert parsed.choices[0].finish_reason == ("length" if completion_tokens == TOKENS else "stop")
    assert len(answers) == len(ids) + len(CONTROLLED)


def test_n_samples_with_logprobs_are_one_line_with_a_choice_each(batch_run):
    """n 2 at temperature 0.8 with a seed and logprobs (top 2): one line, two choices that parse
    as the openai package's ChatCompletion, each with a logprob per token and its top 2."""
    _, _, exported, _ = batch_run
    line = next(json.loads(x) for x in exported.read_text().splitlines() if '"custom_id":"samples"' in x)
    parsed = ChatCompletion.model_validate(line["response"]["body"])
    assert [c.index for c in parsed.choices] == [0, 1]
    assert parsed.choices[0].message.content != parsed.choices[1].message.content  # sampled, not greedy
    for c in parsed.choices:
        content = c.logprobs.content
        assert 0 < len(content) <= TOKENS
        for token in content:
            assert len(token.top_logprobs) == 2 and token.logprob <= 0
            assert token.bytes == list(token.token.encode())
            # vLLM's server lists the sampled token first, then the likeliest others
            assert (token.top_logprobs[0].token, token.top_logprobs[0].logprob) == (
                token.token,
                token.logprob,
            )
    assert parsed.usage.completion_tokens == sum(len(c.logprobs.content) for c in parsed.choices)


def test_structured_output_fields_constrain_the_answer(batch_run):
    """response_format json_schema: the content parses and validates; structured_outputs
    choice: the content is one of the choices."""
    _, _, exported, _ = batch_run
    bodies = {
        line["custom_id"]: line["response"]["body"]
        for line in map(json.loads, exported.read_text().splitlines())
        if line["custom_id"] in ("schema", "choice")
    }
    answer = ChatCompletion.model_validate(bodies["schema"]).choices[0]
    assert answer.finish_reason == "stop"
    jsonschema.validate(json.loads(answer.message.content), SCHEMA)
    assert ChatCompletion.model_validate(bodies["choice"]).choices[0].message.content in (
        "yes",
        "no",
        "maybe",
    )


def test_bad_requests_are_error_lines_naming_the_field(batch_run):
    """A wrong model, an unsupported field, an endpoint this engine does not serve, a body
    without messages, another method: each is one error line, as run_batch writes them."""
    _, _, exported, _ = batch_run
    errors = {
        line["custom_id"]: line
        for line in map(json.loads, exported.read_text().splitlines())
        if line["error"]
    }
    assert set(errors) == set(BAD)
    for custom_id, (code, words) in BAD.items():
        line = errors[custom_id]
        assert line["response"]["status_code"] == 400 and line["response"]["body"] is None
        assert line["error"]["code"] == code
        assert words in line["error"]["message"], line["error"]["message"]


def test_export_again_with_errors_in_their_own_file(batch_run, tmp_path):
    """`daskdp export OUT FILE --errors ERRORS`: failed requests go to ERRORS only; both files
    in input order, and the same lines as the first export (ids that do not change)."""
    source, output, exported, _ = batch_run
    results, errors = tmp_path / "results.jsonl", tmp_path / "errors.jsonl"
    done = daskdp_cli("export", output, results, "--errors", errors)
    assert done.returncode == 0, done.stderr
    first = exported.read_text().splitlines()
    assert results.read_text().splitlines() == [line for line in first if '"error":null}' in line]
    assert errors.read_text().splitlines() == [line for line in first if '"error":null}' not in line]
    assert [json.loads(line)["custom_id"] for line in errors.read_text().splitlines()] == [
        line["custom_id"] for line in batch_lines() if line["custom_id"] in BAD
    ]


def test_parquet_output_keeps_custom_id_endpoint_and_position(batch_run):
    """The chunk files keep each request's custom_id, endpoint and input position."""
    _, output, _, _ = batch_run
    results = read_results(output).sort_values(["position", "sample"])
    assert results["custom_id"].value_counts()["samples"] == 2  # n 2: a row per sample
    results = results.drop_duplicates("position")
    lines = batch_lines()
    assert results["position"].tolist() == list(range(len(lines)))
    assert results["custom_id"].tolist() == [line["custom_id"] for line in lines]
    assert results["endpoint"].tolist() == [line["url"] for line in lines]


def test_the_lazy_api_reads_a_batch_file(tmp_path, cluster, oracle):
    """`daskdp.generate(batch.jsonl)` gives the rows as a lazy frame: a failed request's reason in
    `error`, n samples a row each."""
    import daskdp

    _, client = cluster
    source = tmp_path / "batch.jsonl"
    write_lines(source, [chat("a", CHATS[0]), chat("b", CHATS[0], logit_bias={"5": 10}), SAMPLES])
    rows = client.compute(daskdp.generate(source), resources={"GPU": 1}).result()
    assert rows["custom_id"].tolist() == ["a", "b", "samples", "samples"]
    assert rows["generated_text"].iloc[0] == oracle["messages"][0][0]
    assert rows["error"].iloc[1].startswith("body.logit_bias is not supported by daskdp")
    assert rows["sample"].tolist()[2:] == [0, 1] and "request_error" not in rows


def test_a_line_that_is_not_json_refuses_the_file(tmp_path, cluster):
    """One line naming the line number, exit 2, nothing written."""
    _, client = cluster
    source = tmp_path / "batch.jsonl"
    lines = [json.dumps(line) for line in batch_lines()[:3]]
    source.write_text("\n".join([*lines, '{"custom_id": "x", "body": {', *lines]) + "\n")
    done = daskdp_cli("run", source, "--scheduler-address", client.scheduler.address, "--quiet")
    error_line(done, "line 4 is not valid JSON", str(source), cluster_started=True)
    assert not (tmp_path / "batch.out").exists()


def test_a_repeated_custom_id_refuses_the_file(tmp_path, cluster):
    _, client = cluster
    source = tmp_path / "batch.jsonl"
    write_lines(source, [chat("a", CHATS[0]), chat("b", CHATS[1]), chat("a", CHATS[1])])
    done = daskdp_cli("run", source, "--scheduler-address", client.scheduler.address, "--quiet")
    error_line(
        done,
        "custom_id 'a' appears more than once",
        "in requests 1, 3 (counted from 1)",
        cluster_started=True,
    )
    assert not (tmp_path / "batch.out").exists()


def test_a_custom_id_repeated_by_a_list_input_refuses_the_file(tmp_path, cluster):
    """A list input's rows have ids of their own: the first one's is still the custom_id, so a
    line repeating it is found."""
    _, client = cluster
    source = tmp_path / "batch.jsonl"
    write_lines(
        source, [request("a", "/v1/embeddings", input=TEXTS[:2]), request("a", "/v1/embeddings", input="x")]
    )
    done = daskdp_cli("run", source, "--scheduler-address", client.scheduler.address, "--quiet")
    error_line(
        done,
        "custom_id 'a' appears more than once",
        "in requests 1, 2 (counted from 1)",
        cluster_started=True,
    )
    assert not (tmp_path / "batch.out").exists()


def test_sampling_flags_are_refused_for_a_batch_file(tmp_path):
    """Bodies set their own sampling values: a flag that would change nothing is refused."""
    source = tmp_path / "batch.jsonl"
    write_lines(source, [chat("a", CHATS[0])])
    done = daskdp_cli("run", source, "--temperature", 0.5)
    error_line(done, "--temperature does not apply to an OpenAI Batch file", "set temperature in the bodies")


@pytest.mark.slow
def test_a_killed_run_resumes_and_exports_every_request_once(tmp_path, cluster):
    """SIGKILL a run midway, resume it on the warm cluster, export: every custom_id exactly once,
    in input order."""
    _, client = cluster
    source, output, exported = tmp_path / "batch.jsonl", tmp_path / "out", tmp_path / "results.jsonl"
    requests = [
        chat(f"r{i:03d}", CHATS[i % len(CHATS)], max_completion_tokens=24 + 3 * i) for i in range(160)
    ]
    write_lines(source, requests)
    process = subprocess.Popen(
        [*DASKDP, "run", str(source), "-o", str(output), "--workers", "1", "--chunk-size", "20", "--quiet"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while len(list(output.glob("part-*.parquet"))) < 3:
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1][-3000:]
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    unfinished = daskdp_cli("export", output, exported)
    error_line(unfinished, "is not finished", "--resume")

    done = daskdp_cli(
        "run", source, "-o", output, "--chunk-size", 20, "--scheduler-address", client.scheduler.address,
        "--resume", "--export", exported, "--quiet",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((output / "_summary.json").read_text())
    assert summary["rows_skipped"] > 0
    lines = [json.loads(line) for line in exported.read_text().splitlines()]
    assert [line["custom_id"] for line in lines] == [request["custom_id"] for request in requests]
    assert all(line["response"]["status_code"] == 200 for line in lines)


def test_samples_of_a_request_are_one_line_with_a_choice_each():
    """Rows of one position (n > 1: the `sample` column) make one line, their choices in sample
    order, usage summed; logprobs entries become OpenAI's shapes; the body still parses."""
    from daskdp.output.export import chunk_lines

    top = [{"token_id": 7, "token": "a", "logprob": -0.5, "rank": 1}]
    entry = {"token_id": 7, "token": "a", "logprob": -0.5, "rank": 1, "top": top}
    rows = pd.DataFrame(
        {
            "position": [1, 0, 0],
            "custom_id": ["second", "first", "first"],
            "endpoint": ["/v1/completions", "/v1/chat/completions", "/v1/chat/completions"],
            "generated_text": ["x", "B", "A"],
            "prompt_tokens": [3, 5, 5],
            "output_tokens": [1, 2, 1],
            "finish_reason": ["length", "stop", "length"],
            "error": [None, None, None],
            "finished_at": [10.0, 11.0, 12.0],
            "sample": [0, 1, 0],
            "logprobs": [[entry], None, [entry]],
        }
    )
    lines = list(chunk_lines(rows, "tiny", b"key"))
    assert [(position, failed) for position, _, failed in lines] == [(0, False), (1, False)]
    chat = json.loads(lines[0][1])["response"]["body"]
    parsed = ChatCompletion.model_validate(chat)
    assert [c.message.content for c in parsed.choices] == ["A", "B"] and [
        c.index for c in parsed.choices
    ] == [0, 1]
    assert parsed.usage.completion_tokens == 3 and parsed.usage.total_tokens == 8
    assert parsed.choices[0].logprobs.content[0].top_logprobs[0].logprob == -0.5
    assert parsed.choices[1].logprobs is None
    text = Completion.model_validate(json.loads(lines[1][1])["response"]["body"])
    assert text.choices[0].logprobs.tokens == ["a"] and text.choices[0].logprobs.top_logprobs == [{"a": -0.5}]


def test_export_restores_input_order_through_buckets(monkeypatch):
    """Lines in any order come back in position order across several bucket files."""
    from daskdp.output import export

    monkeypatch.setattr(export, "BUCKET_ROWS", 7)
    positions = list(range(100))
    random.Random(3).shuffle(positions)
    lines = ((p, f'{{"n":{p}}}', p % 5 == 0) for p in positions)
    assert [(p, line, failed) for p, line, failed in export.sorted_lines(lines, 100)] == [
        (p, f'{{"n":{p}}}', p % 5 == 0) for p in range(100)
    ]


# Pooling endpoints, on the packaged tiny Llama as the embedding model (docs/pooling.md): one
# file of embeddings (its task read from its lines), one of scores and reranks.
TEXTS = [
    f"Sentence {i}: the {['river', 'moon', 'bread'][i % 3]} is {i * 7 % 13} times calm." for i in range(6)
]
POOLING_ORACLE = r"""
import json, os, sys
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
from vllm import LLM
spec = json.load(sys.stdin)
llm = LLM(model=spec["model"], runner="pooling", **spec["engine"])
embed = [o.outputs.embedding for o in llm.embed(spec["texts"], use_tqdm=False)]
score = [o.outputs.score for o in llm.score(spec["texts"][0], spec["texts"][1:], use_tqdm=False)]
print("ORACLE" + json.dumps({"embed": embed, "score": score}))
"""


def request(custom_id, url, **body):
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": {"model": "tiny", **body}}


EMBEDDINGS = [
    request("one", "/v1/embeddings", input=TEXTS[0]),
    request("chat", "/v1/chat/completions", messages=CHATS[0]),  # needs the generating engine
    request("list", "/v1/embeddings", input=TEXTS[1:4], encoding_format="float"),
    request("dims", "/v1/embeddings", input=TEXTS[0], dimensions=8),
    request("last", "/v1/embeddings", input=[TEXTS[4]]),
]
SCORES = [
    request("pairs", "/v1/score", text_1=TEXTS[0], text_2=TEXTS[1:3]),  # 1:N
    request("pair", "/v1/score", text_1=TEXTS[0], text_2=TEXTS[5]),
    request("rerank", "/v1/rerank", query=TEXTS[0], documents=TEXTS[1:6], top_n=3),
]


@pytest.fixture(scope="module")
def pooling_runs(tmp_path_factory, cluster):
    """Both files through `daskdp run --export` on the warm cluster, with no --task: each is
    read from the files' endpoints. Plain vLLM answers meanwhile (`start_oracle`)."""
    oracle = start_oracle(POOLING_ORACLE, {"model": str(TINY_MODEL), "engine": TINY_ENGINE, "texts": TEXTS})
    _, client = cluster
    folder = tmp_path_factory.mktemp("pooling")
    exported = {}
    for name, lines in (("embeddings", EMBEDDINGS), ("scores", SCORES)):
        source, exported[name] = folder / f"{name}.jsonl", folder / f"{name}.results.jsonl"
        write_lines(source, lines)
        done = daskdp_cli(
            "run", source, "--scheduler-address", client.scheduler.address, "--export", exported[name],
            "--quiet",
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
    plain = oracle()
    lines = {
        name: {line["custom_id"]: line for line in map(json.loads, path.read_text().splitlines())}
        for name, path in exported.items()
    }
    return lines, plain, exported


def cosine(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_embeddings_are_one_response_per_request_as_plain_vllm(pooling_runs):
    """A string input and a list input (a row per element inside daskdp) each give one line,
    in input order, that parses as the openai package's CreateEmbeddingResponse, with plain
    LLM.embed's vectors; the chat line and an unsupported field are error lines."""
    lines, plain, exported = pooling_runs
    embeddings = lines["embeddings"]
    assert list(embeddings) == [line["custom_id"] for line in EMBEDDINGS]
    wanted = {"one": [0], "list": [1, 2, 3], "last": [4]}
    for custom_id, texts in wanted.items():
        body = embeddings[custom_id]["response"]["body"]
        parsed = CreateEmbeddingResponse.model_validate(body)
        assert body["id"].startswith("embd-") and parsed.model == "tiny" and parsed.object == "list"
        assert [d.index for d in parsed.data] == list(range(len(texts)))
        for data, text in zip(parsed.data, texts, strict=True):
            assert cosine(data.embedding, plain["embed"][text]) >= 0.99999
        assert parsed.usage.prompt_tokens == parsed.usage.total_tokens > 0
    chat, dims = embeddings["chat"], embeddings["dims"]
    assert chat["response"]["status_code"] == 400 and chat["error"]["code"] == "unsupported_value"
    assert "/v1/chat/completions needs a generating engine (--task generate)" in chat["error"]["message"]
    assert dims["error"]["message"].startswith("body.dimensions is not supported by daskdp")


def test_score_and_rerank_are_plain_vllm_scores(pooling_runs):
    """/v1/score (1:N pairs, and one pair) and /v1/rerank (results by relevance, the top 3),
    shaped as vLLM's server writes them, with plain LLM.score's scores."""
    lines, plain, _ = pooling_runs
    scores = lines["scores"]
    assert list(scores) == [line["custom_id"] for line in SCORES]
    pairs = scores["pairs"]["response"]["body"]
    assert pairs["object"] == "list" and pairs["id"].startswith("score-")
    assert [d["index"] for d in pairs["data"]] == [0, 1] and {d["object"] for d in pairs["data"]} == {"score"}
    assert np.allclose([d["score"] for d in pairs["data"]], plain["score"][:2], rtol=1e-5, atol=1e-6)
    assert np.isclose(scores["pair"]["response"]["body"]["data"][0]["score"], plain["score"][4], atol=1e-6)
    rerank = scores["rerank"]["response"]["body"]
    assert set(rerank) == {"id", "model", "usage", "results"}
    order = np.argsort(-np.asarray(plain["score"]), kind="stable")[:3]
    assert [r["index"] for r in rerank["results"]] == order.tolist()
    assert [r["document"]["text"] for r in rerank["results"]] == [TEXTS[1 + i] for i in order]
    assert np.allclose(
        [r["relevance_score"] for r in rerank["results"]], np.asarray(plain["score"])[order], atol=1e-6
    )


def without_ids(value):
    """A line with the fields that differ on every run left out: ids, times, vLLM's fingerprint."""
    if isinstance(value, dict):
        drop = {"id", "request_id", "created", "system_fingerprint"}
        return {k: without_ids(v) for k, v in value.items() if k not in drop}
    if isinstance(value, list):
        return [without_ids(v) for v in value]
    return round(value, 4) if isinstance(value, float) else value


@pytest.mark.slow
def test_lines_match_vllm_run_batch_field_for_field(tmp_path, cluster):
    """n samples with a seed and logprobs, and greedy logprobs: daskdp's lines are run_batch's
    for the same file, field for field (ids, times and the fingerprint aside). (run_batch 0.32
    takes chat requests only: a /v1/completions line fails its whole file.)"""
    from daskdp import config

    _, client = cluster
    source = tmp_path / "batch.jsonl"
    write_lines(source, [SAMPLES, chat("greedy", CHATS[5], logprobs=True, top_logprobs=3)])
    model, engine = config.engine_arguments(config.load(overrides={"model": "tiny"}), gpu_host=False)
    flags = [
        f"--{key.replace('_', '-')}" if value is True else f"--{key.replace('_', '-')}={value}"
        for key, value in engine.items()
        if key not in ("tensor_parallel_size", "use_tqdm_on_load", "disable_log_stats") and value is not False
    ]
    theirs = tmp_path / "run_batch.jsonl"
    baseline = subprocess.run(
        [sys.executable, "-m", "vllm.entrypoints.openai.run_batch", "-i", source, "-o", theirs,
         "--model", model, "--served-model-name", "tiny", *flags],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert baseline.returncode == 0, baseline.stderr[-3000:]
    ours = tmp_path / "results.jsonl"
    done = daskdp_cli(
        "run", source, "--scheduler-address", client.scheduler.address, "--export", ours, "--quiet"
    )
    assert done.returncode == 0, done.stderr[-3000:]
    read = [
        [without_ids(json.loads(line)) for line in path.read_text().splitlines()] for path in (ours, theirs)
    ]
    assert read[0] == read[1]
