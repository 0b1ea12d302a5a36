"""The command line: a thin layer over :func:`daskdp.run` and :mod:`daskdp.report`."""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import signal
import sys

from daskdp.errors import RunError, Terminated, UserError

EXAMPLES = """\
examples:
  daskdp run prompts.parquet
  daskdp run prompts.jsonl -o results/ --workers 2 --max-tokens 64
  daskdp run 's3://bucket/prompts/*.parquet' --model meta-llama/Llama-3.1-8B-Instruct
  daskdp run prompts.parquet --scheduler-address tcp://10.0.0.5:8786
  daskdp run batch.jsonl --export results.jsonl     # an OpenAI Batch file in, its output file out
"""
EXPORT_EXAMPLES = """\
examples:
  daskdp export batch.out results.jsonl
  daskdp export batch.out results.jsonl --errors errors.jsonl
"""
REPORT_EXAMPLES = """\
examples:
  daskdp report prompts.out
  daskdp report s3://bucket/results/
"""


def parser() -> argparse.ArgumentParser:
    main = argparse.ArgumentParser(
        prog="daskdp",
        description="Offline LLM generation over many prompts on a Dask cluster of vLLM engines.",
    )
    commands = main.add_subparsers(dest="command", metavar="COMMAND", required=True)
    run = commands.add_parser(
        "run",
        help="generate for every row of a prompts file and write Parquet results",
        description="Generate for every row of PROMPTS and write the results as a Parquet dataset.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument(
        "prompts", metavar="PROMPTS", help="Parquet file, directory or glob; .jsonl; .csv; any fsspec URL"
    )
    run.add_argument("-o", "--output", help="results directory (default: <input stem>.out beside the input)")
    run.add_argument(
        "--config", metavar="FILE", help="YAML file with a `daskdp:` section (see conf/default.yaml)"
    )
    previous = run.add_mutually_exclusive_group()
    previous.add_argument(
        "--resume", action="store_true", help="continue the run whose results are in the output directory"
    )
    previous.add_argument(
        "--overwrite", action="store_true", help="replace the results in a non-empty output directory"
    )
    run.add_argument("--quiet", action="store_true", help="no progress display")

    where = run.add_argument_group("model and cluster")
    where.add_argument(
        "--model",
        help="model directory or Hugging Face name; tiny: the packaged tiny test model "
        "(default: SmolLM2-135M-Instruct from scripts/setup.sh on hosts without GPUs)",
    )
    where.add_argument(
        "--workers", type=int, metavar="N", help="ranks of the local cluster (default: one per GPU, or 1)"
    )
    where.add_argument("--tensor-parallel-size", type=int, metavar="K", help="GPUs per rank")
    where.add_argument(
        "--parallel-mode",
        choices=["independent", "gang"],
        help="one engine per rank, or all ranks as one vLLM data-parallel group (MoE with expert "
        "parallelism); default: gang for MoE models with engine.enable-expert-parallel",
    )
    where.add_argument(
        "--cluster",
        choices=["local", "slurm", "pbs"],
        help="where the ranks run: this host (default), or one SLURM/PBS job each (see conf/cluster/)",
    )
    where.add_argument(
        "--scheduler-address", metavar="ADDR", help="use a running Dask scheduler instead of a local cluster"
    )
    where.add_argument("--tls-ca-file", metavar="PEM", help="CA certificate for a tls:// scheduler")
    where.add_argument("--tls-cert", metavar="PEM", help="client certificate for a tls:// scheduler")
    where.add_argument("--tls-key", metavar="PEM", help="client private key for a tls:// scheduler")
    where.add_argument("--prompt-column", metavar="NAME", help="column holding the prompts (default: prompt)")

    batch = run.add_argument_group("OpenAI Batch files")
    batch.add_argument(
        "--input-format",
        choices=["parquet", "jsonl", "csv", "openai"],
        help="the input's format (default: from its name; JSON Lines of {custom_id, url, body} "
        "requests is an OpenAI Batch file)",
    )
    batch.add_argument(
        "--served-model-name",
        action="append",
        metavar="NAME",
        help="another name a body's model may give; repeat for more; the first is answered",
    )
    batch.add_argument(
        "--export", metavar="FILE", help="after the run, write its OpenAI Batch output file (`daskdp export`)"
    )
    batch.add_argument("--errors", metavar="FILE", help="with --export: failed requests go here only")

    sampling = run.add_argument_group("sampling")
    sampling.add_argument("--max-tokens", type=int, metavar="N")
    sampling.add_argument("--temperature", type=float)
    sampling.add_argument("--top-p", type=float)
    sampling.add_argument("--top-k", type=int)
    sampling.add_argument("--seed", type=int)
    sampling.add_argument("--stop", action="append", metavar="TEXT", help="stop string; repeat for more")
    sampling.add_argument(
        "--ignore-eos", action="store_true", default=None, help="generate max-tokens even past EOS"
    )
    sampling.add_argument(
        "--n", type=int, metavar="N", help="samples per prompt, one output row each (needs --temperature > 0)"
    )
    sampling.add_argument(
        "--logprobs", type=int, metavar="K", help="each output token's logprob and its top-K alternatives"
    )
    sampling.add_argument(
        "--prompt-logprobs",
        type=int,
        metavar="K",
        help="each prompt token's logprob and its top-K alternatives",
    )

    pooling = run.add_argument_group("pooling tasks (docs/pooling.md)")
    pooling.add_argument(
        "--task",
        choices=["generate", "embed", "classify", "score"],
        help="generate text (default); or one embedding, class probabilities and label, or "
        "score of a text pair per row, with vLLM's pooling runner",
    )
    pooling.add_argument(
        "--normalize",
        action=argparse.BooleanOptionalAction,
        help="embed: L2-normalise the embeddings; classify: softmax (default: the model's, on)",
    )
    pooling.add_argument("--dimensions", type=int, metavar="N", help="embed: Matryoshka dimensions")
    pooling.add_argument(
        "--truncate-prompt-tokens",
        type=int,
        metavar="N",
        help="keep the first N tokens of longer texts (default: such rows are errors)",
    )
    pooling.add_argument(
        "--text-1-column", metavar="NAME", help="score: the first text of each pair (default: text_1)"
    )
    pooling.add_argument(
        "--text-2-column", metavar="NAME", help="score: the second text of each pair (default: text_2)"
    )

    structured = run.add_argument_group(
        "structured output and adapters",
        "one constraint for every row; a row's own json_schema, regex, choice or grammar column replaces it",
    )
    constraint = structured.add_mutually_exclusive_group()
    constraint.add_argument(
        "--json-schema", metavar="FILE", help="JSON Schema file the output must validate against"
    )
    constraint.add_argument("--regex", metavar="RE", help="regular expression the whole output must match")
    constraint.add_argument("--choice", nargs="+", metavar="TEXT", help="the output is one of these")
    constraint.add_argument(
        "--grammar", metavar="FILE", help="grammar file (EBNF/GBNF or Lark) as vLLM takes it"
    )
    structured.add_argument(
        "--lora",
        action="append",
        metavar="NAME=PATH",
        help="a LoRA adapter rows name in their `lora` column (directory or fsspec URL); repeat for more",
    )

    limits = run.add_argument_group("checkpoints and limits")
    limits.add_argument("--chunk-size", type=int, metavar="ROWS", help="rows written together (default 1024)")
    limits.add_argument(
        "--partitioning",
        choices=["balanced", "dynamic"],
        help="one partition per rank balanced by estimated cost (default), or smaller ones "
        "handed out as ranks free up",
    )
    limits.add_argument(
        "--prefix-locality",
        action=argparse.BooleanOptionalAction,
        help="put rows that share a long prompt prefix together on one rank (default: on)",
    )
    limits.add_argument(
        "--chunk-timeout", type=float, metavar="S", help="stop a chunk that generates for longer"
    )
    limits.add_argument(
        "--stall-timeout",
        type=float,
        metavar="S",
        help="restart a rank that reports no progress for this long while it holds work (default 120)",
    )
    limits.add_argument(
        "--retries", type=int, metavar="N", help="further attempts for a timed-out chunk (default 1)"
    )
    limits.add_argument(
        "--max-error-rate",
        type=float,
        metavar="F",
        help="fail when more than this fraction of rows are errors",
    )
    limits.add_argument("--timeout", type=float, metavar="S", help="deadline for the whole run, in seconds")

    report = commands.add_parser(
        "report",
        help="summarize a run and write its HTML report",
        description=(
            "Print the summary table of the run in OUT and write OUT/_report.html: the table, "
            "figures (ranks over time, tokens/s per rank, lengths, finish reasons), the error rows "
            "and a sample of generations. `daskdp run` writes it too."
        ),
        epilog=REPORT_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    report.add_argument("results", metavar="OUT", help="the output directory of `daskdp run`; any fsspec URL")

    export = commands.add_parser(
        "export",
        help="write the OpenAI Batch output file of a run over an OpenAI Batch file",
        description=(
            "Write one line per request of the OpenAI Batch file that the run in OUT read, in "
            "input order, shaped as vLLM's run_batch and OpenAI's Batch API write them."
        ),
        epilog=EXPORT_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    export.add_argument("results", metavar="OUT", help="the output directory of `daskdp run`; any fsspec URL")
    export.add_argument("file", metavar="FILE", help="the output file (JSON Lines); any fsspec URL")
    export.add_argument("--errors", metavar="FILE", help="failed requests go here, and not to FILE")
    return main


def overrides(args: argparse.Namespace) -> dict:
    """Configuration keys given on the command line."""
    return {
        "model": args.model,
        "served-model-name": args.served_model_name,
        "input.format": args.input_format,
        "input.prompt-column": args.prompt_column,
        "cluster.type": args.cluster,
        "cluster.workers": args.workers,
        "cluster.scheduler-address": args.scheduler_address,
        "engine.tensor-parallel-size": args.tensor_parallel_size,
        "parallel.mode": args.parallel_mode,
        "sampling.max-tokens": args.max_tokens,
        "sampling.temperature": args.temperature,
        "sampling.top-p": args.top_p,
        "sampling.top-k": args.top_k,
        "sampling.seed": args.seed,
        "sampling.stop": args.stop,
        "sampling.ignore-eos": args.ignore_eos,
        "sampling.n": args.n,
        "sampling.logprobs": args.logprobs,
        "sampling.prompt-logprobs": args.prompt_logprobs,
        "sampling.json-schema": json_schema_file(args.json_schema),
        "sampling.regex": args.regex,
        "sampling.choice": args.choice,
        "sampling.grammar": read_flag_file(args.grammar, "--grammar"),
        "lora.adapters": lora_flags(args.lora),
        "cluster.tls-ca-file": args.tls_ca_file,
        "cluster.tls-cert": args.tls_cert,
        "cluster.tls-key": args.tls_key,
        "run.task": args.task,
        "pooling.normalize": args.normalize,
        "pooling.dimensions": args.dimensions,
        "pooling.truncate-prompt-tokens": args.truncate_prompt_tokens,
        "input.text-1-column": args.text_1_column,
        "input.text-2-column": args.text_2_column,
        "run.chunk-size": args.chunk_size,
        "run.partitioning": args.partitioning,
        "run.prefix-locality": args.prefix_locality,
        "run.chunk-timeout": args.chunk_timeout,
        "run.stall-timeout": args.stall_timeout,
        "run.retries": args.retries,
        "run.max-error-rate": args.max_error_rate,
        "run.timeout": args.timeout,
    }


def read_flag_file(path: str | None, flag: str) -> str | None:
    """The text of a flag's file (``--json-schema FILE``), checked later with the setting."""
    if path is None:
        return None
    import fsspec

    try:
        with fsspec.open(path, "r", encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{flag} {path} cannot be read ({e.__class__.__name__}); check the path") from None


def json_schema_file(path: str | None) -> dict | None:
    """The JSON Schema in ``--json-schema FILE``."""
    text = read_flag_file(path, "--json-schema")
    if text is None:
        return None
    import json

    try:
        return json.loads(text)
    except ValueError as e:
        raise UserError(f"--json-schema {path} is not valid JSON ({e}); give a JSON Schema file") from None


def lora_flags(flags: list[str] | None) -> dict[str, str] | None:
    from daskdp.engine.lora import parse_flags

    return parse_flags(flags)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    if args.command == "report":
        return report(args.results)
    if args.command == "export":
        return export(args.results, args.file, args.errors)
    if args.errors and not args.export:
        print("daskdp: error: --errors goes with --export FILE: pass both", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # Dask's own INFO lines (workers starting and closing) are noise on a terminal.
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
    # vLLM's engine and tqdm make multiprocessing locks in every worker. The workers are
    # stopped at the end of a run, before they release them, and multiprocessing's resource
    # tracker (a child of this process) then removes them with a warning that is no news.
    filters = [os.environ.get("PYTHONWARNINGS"), "ignore:resource_tracker:UserWarning"]
    os.environ["PYTHONWARNINGS"] = ",".join(filter(None, filters))
    from daskdp import config
    from daskdp.clusters.forkserver import forkserver_for

    # A worker process that takes a few seconds to exit is killed at shutdown; that is no news.
    logging.getLogger("distributed.nanny").setLevel(logging.ERROR)
    signal.signal(signal.SIGTERM, _terminate)

    try:
        # Local ranks on a host without GPUs fork from a process that imports vLLM: it starts
        # now, while the run's own modules import and its input is checked.
        with forkserver_for(config.load(args.config, overrides(args))["cluster"]):
            from daskdp.runner import run

            try:
                summary = run(
                    args.prompts,
                    args.output,
                    config_file=args.config,
                    overrides=overrides(args),
                    resume=args.resume,
                    overwrite=args.overwrite,
                    progress=None if args.quiet else sys.stderr,
                )
            except (KeyboardInterrupt, Terminated):
                # What Dask logs from here on comes from the stopped cluster: workers that were
                # starting fail as the forkserver is stopped on the way out, tasks are cancelled.
                # Tracebacks, after which the message that matters would scroll away.
                logging.disable(logging.CRITICAL)
                raise
    except UserError as e:
        print(f"daskdp: error: {e}", file=sys.stderr)
        return 2
    except RunError as e:
        if e.summary is not None:
            finish(e.summary)
        print(f"daskdp: run failed: {e}", file=sys.stderr)
        if e.resumable and has_manifest(args):
            print(f"daskdp: finished chunks are kept; continue with: {continuation(argv)}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, Terminated) as e:
        name = "SIGTERM" if isinstance(e, Terminated) else "SIGINT"
        if has_manifest(args):
            print(
                f"daskdp: stopped by {name}; finished chunks are kept; continue with: {continuation(argv)}",
                file=sys.stderr,
            )
        else:
            print(f"daskdp: stopped by {name} before anything was written", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    finish(summary, samples=not args.quiet)
    if args.export:
        return export(summary["output"], args.export, args.errors)
    return 0


def finish(summary: dict, samples: bool = False) -> None:
    """Print the summary table (and, with ``samples``, a few generations beside their
    prompts), and write the report."""
    from daskdp.output.summary import format_summary
    from daskdp.report import write_report

    print(format_summary(summary))
    if samples:
        print_samples(summary["output"])
    try:
        print(f"report in {write_report(summary['output'])}")
    except Exception as e:  # the results are written; a report that fails must not fail the run
        logging.getLogger("daskdp").debug("the report could not be written", exc_info=True)
        print(
            f"daskdp: the report could not be written ({e}); try `daskdp report {summary['output']}`",
            file=sys.stderr,
        )


def print_samples(output: str) -> None:
    """Three generations of the first chunk file beside their prompts: the answers a newcomer
    looks for. Never fails the run: the results are written."""
    from daskdp.output.read import read_manifest, read_results
    from daskdp.output.schema import LOGPROB_COLUMNS
    from daskdp.output.summary import format_samples

    try:
        columns = read_manifest(output)["settings"]["input"]
        results = read_results(output)
        if "generated_text" not in results.columns:  # a pooling task: vectors and scores are no samples
            return
        # Not the logprobs: tens of thousands of objects per chunk that the samples do not show.
        first = results.drop(columns=[c for c in LOGPROB_COLUMNS if c in results.columns])
        first = first.get_partition(0).compute()
        text = format_samples(first, columns["prompt-column"], columns["messages-column"])
    except Exception:
        logging.getLogger("daskdp").debug("no sample generations to show", exc_info=True)
        return
    if text:
        print(f"sample generations:\n{text}")


def has_manifest(args: argparse.Namespace) -> bool:
    """Whether the run's output holds a manifest, so that ``--resume`` has something to continue."""
    try:
        # Imported here, and light: a Ctrl-C may have stopped the run's own imports midway.
        from daskdp.output.directory import default_output
        from daskdp.output.manifest import read_manifest

        return read_manifest(args.output or default_output(args.prompts)) is not None
    except Exception:  # an output that cannot even be looked at has nothing to resume
        return False


def continuation(argv: list[str]) -> str:
    """The command that resumes the run ``argv`` started."""
    kept = [arg for arg in argv if arg not in ("--resume", "--overwrite")]
    return shlex.join(["daskdp", *kept, "--resume"])


def _terminate(signum, frame) -> None:
    raise Terminated()


def report(results: str) -> int:
    """``daskdp report OUT``: print the summary table, write the HTML report, print its path."""
    from daskdp.output.read import read_summary
    from daskdp.output.summary import format_table, summary_table
    from daskdp.report import write_report

    try:
        path = write_report(results)
    except UserError as e:
        print(f"daskdp: error: {e}", file=sys.stderr)
        return 2
    print(format_table(summary_table(read_summary(results))))
    print(f"report in {path}")
    return 0


def export(results: str, file: str, errors: str | None) -> int:
    """``daskdp export OUT FILE``: the OpenAI Batch output file of the run in OUT."""
    from daskdp.output.export import export as export_batch

    try:
        written = export_batch(results, file, errors=errors)
    except UserError as e:
        print(f"daskdp: error: {e}", file=sys.stderr)
        return 2
    where = f"{file}" + (f" and {errors}" if errors else "")
    print(f"exported {written['requests']:,} requests ({written['errors']:,} failed) to {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
