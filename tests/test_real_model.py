"""The default model end to end: chat questions through 2 ranks, answered as plain vLLM answers them.

SmolLM2-135M-Instruct is what ``daskdp run`` loads with no ``--model`` on a host without GPUs;
``bash scripts/setup.sh`` makes it (tools/convert_smollm2.py). Every other test runs the tiny
model. With a real model, vLLM on CPU is not batch-invariant: the same prompt batched
differently may part from another batching late in its text, at a near-tie (docs/model.md). So
the oracle is compared by each answer's first words (nearly all rows) and whole text (most rows),
not row by row exactly as the tiny model's parity tests do.
"""

from __future__ import annotations

import json

import pytest

from conftest import daskdp_cli, plain_vllm, read_results
from daskdp import config

pytestmark = pytest.mark.slow

MAX_TOKENS = 64
QUESTIONS = [
    "What is the capital of France?",
    "What is the capital of Japan?",
    "What is the capital of Italy?",
    "What is the capital of Egypt?",
    "What is the capital of Canada?",
    "What is the capital of Spain?",
    "What is the capital of Germany?",
    "What is the capital of Kenya?",
    "How many days are there in a week?",
    "How many legs does a spider have?",
    "How many continents are there?",
    "How many minutes are in an hour?",
    "What is 3 plus 4?",
    "What is 12 times 12?",
    "What is the capital of Greece?",
    "What is the chemical symbol for gold?",
    "What is the chemical symbol for water?",
    "What is the capital of China?",
    "What is the capital of Russia?",
    "Name three primary colors.",
    "How many wheels does a bicycle have?",
    "What is the capital of Norway?",
    "How many hours are in a day?",
    "What is the largest planet in our solar system?",
    "What is the largest ocean on Earth?",
    "What is the chemical symbol for iron?",
    "What is the boiling point of water in Celsius?",
    "Translate 'thank you' into Spanish.",
    "What is the plural of mouse?",
    "Which animal is known as the king of the jungle?",
    "What is the first letter of the English alphabet?",
    "Suggest a name for a pet goldfish.",
]


def first_words(text: str, n: int = 3) -> list[str]:
    return text.split()[:n]


def test_default_model_answers_chat_like_plain_vllm(tmp_path):
    model = config.DEFAULT_MODEL
    if not (model / "config.json").is_file():
        pytest.fail(f"the default model is not in {model}: bash scripts/setup.sh makes it (and CI runs it)")
    messages = [[{"role": "user", "content": question}] for question in QUESTIONS]
    source = tmp_path / "chat.jsonl"
    source.write_text(
        "".join(json.dumps({"id": f"q{i:02d}", "messages": m}) + "\n" for i, m in enumerate(messages))
    )
    out = tmp_path / "out"
    # No --model: the default. conftest's configuration names the tiny model; this variable,
    # a layer above it, sets the model back to null (DASK_DASKDP__MODEL=None).
    done = daskdp_cli(
        "run", source, "-o", out, "--workers", 2, "--max-tokens", MAX_TOKENS, "--quiet",
        env={"DASK_DASKDP__MODEL": "None"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    results = read_results(out).sort_values("id").reset_index(drop=True)
    assert list(results["id"]) == [f"q{i:02d}" for i in range(len(QUESTIONS))]
    assert json.loads((out / "_summary.json").read_text())["model"] == str(model)

    _, engine = config.engine_arguments(config.load(overrides={"model": str(model)}), gpu_host=False)
    expected = plain_vllm(
        messages=messages, model=model, engine=engine, temperature=0.0, max_tokens=MAX_TOKENS
    )
    expected_texts = [text for text, _, _ in expected["messages"]]
    texts = list(results["generated_text"])
    rows = len(texts)
    starts = sum(first_words(a) == first_words(b) for a, b in zip(texts, expected_texts, strict=True)) / rows
    whole = sum(a == b for a, b in zip(texts, expected_texts, strict=True)) / rows
    stopped = (results["finish_reason"] == "stop") & (results["output_tokens"] < MAX_TOKENS)
    print(f"first three words {starts:.0%}, whole answers {whole:.0%}, ended at EOS {stopped.mean():.0%}")
    differing = [(q, a, b) for q, a, b in zip(QUESTIONS, texts, expected_texts, strict=True) if a != b]
    assert starts >= 0.95, differing
    assert whole >= 0.70, differing
    # Questions with short answers: plain vLLM ends all 32 at EOS in one batch (answers of 8 to
    # 60 tokens); another batching may lengthen a few.
    assert stopped.mean() >= 0.90, list(results.loc[~stopped, "generated_text"])
    assert "paris" in texts[0].lower()
