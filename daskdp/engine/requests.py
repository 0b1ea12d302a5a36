"""Per-row settings -> engine requests: each row's prompt rendered and tokenized, its sampling
parameters, and the request added to the engine. The one place a row becomes a request; a new
task (pooling) or per-row setting extends `engine_params`.

Requests go to the engine itself (``llm_engine.add_request``), not through ``LLM.enqueue``,
which refuses pooling runners; each output then carries exactly the id given here.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from daskdp.engine.lora import adapter_order, lora_requests
from daskdp.engine.structured import constraint_key, rejection, row_constraints, structured_outputs
from daskdp.errors import UserError, first_line

if TYPE_CHECKING:
    from vllm import LLM

SAMPLING_KEYS = ("temperature", "top-p", "top-k", "max-tokens", "seed", "stop", "ignore-eos")
SAMPLES_KEYS = ("n", "logprobs", "prompt-logprobs")  # n samples and logprobs (issue 22)
POOLING_KEYS = ("normalize", "dimensions", "truncate-prompt-tokens")
OVERRIDE_COLUMNS = ("max_tokens", "temperature", "seed")
# Per-row top_p, top_k, stop, n and top_logprobs (issue 22); top_logprobs is OpenAI's name for
# the number of alternatives per token, the run's `sampling.logprobs`.
SAMPLES_OVERRIDE_COLUMNS = ("top_p", "top_k", "stop", "n", "top_logprobs")
INTEGER_COLUMNS = ("max_tokens", "seed", "top_k", "n", "top_logprobs")
ENGINE_NAMES = {"top_logprobs": "logprobs"}  # per-row column -> SamplingParams argument
GREEDY = 1e-5  # vLLM's: a temperature below this is greedy decoding
_request_ids = itertools.count()  # unique in the process, so in its engine


@dataclass(frozen=True)
class GenerationRequest:
    """What every partition of one run is generated with."""

    sampling: dict[str, Any]
    prompt_column: str = "prompt"
    messages_column: str = "messages"
    id_column: str = "id"
    run_id: str = ""
    chunk_rows: int = 1024
    chunk_timeout: float | None = None
    stall_timeout: float | None = None
    retries: int = 0
    progress_interval: float = 1.0
    adapters: dict[str, str] = field(default_factory=dict)  # LoRA adapters by name (lora.adapters)
    task: str = "generate"
    pooling: dict[str, Any] = field(default_factory=lambda: dict.fromkeys(POOLING_KEYS))
    text_columns: tuple[str, str] = ("text_1", "text_2")  # --task score: the two texts of a pair
    dimension: int | None = None  # embed: the engines' embedding dimension, for empty partitions

    @property
    def pooled(self) -> bool:
        """Whether the run pools (embed, classify, score) rather than generates."""
        return self.task != "generate"

    # Sampling values that neither the row nor `sampling` sets come from the model's generation
    # config, as in vLLM's OpenAI server (OpenAI Batch files, `daskdp.inputs.openai`).
    generation_config: bool = False

    @classmethod
    def from_settings(cls, settings: dict[str, Any], **run: Any) -> GenerationRequest:
        """The request for resolved ``settings`` (`daskdp.config.load`); ``run``: this run's own
        values (``run_id``, ``chunk_rows``)."""
        limits = settings["run"]
        return cls(
            sampling=settings["sampling"],
            prompt_column=settings["input"]["prompt-column"],
            messages_column=settings["input"]["messages-column"],
            id_column=settings["input"]["id-column"],
            task=limits["task"],
            pooling=settings["pooling"],
            text_columns=(settings["input"]["text-1-column"], settings["input"]["text-2-column"]),
            adapters=dict(settings["lora"]["adapters"] or {}),
            generation_config=settings["input"].get("format") == "openai",
            **{
                "chunk_rows": int(limits["chunk-size"]),
                "chunk_timeout": limits["chunk-timeout"],
                "stall_timeout": stall_timeout(limits),
                "retries": int(limits["retries"]),
                "progress_interval": limits["progress-interval"],
                **run,
            },
        )


def stall_timeout(limits: dict[str, Any]) -> float | None:
    """Seconds a rank may hold work without reporting progress: ``run.stall-timeout``, never
    more than ``run.chunk-timeout`` when that is given."""
    limit = limits.get("stall-timeout")
    if limits.get("chunk-timeout") is not None:
        limit = min(limit, limits["chunk-timeout"]) if limit is not None else limits["chunk-timeout"]
    return float(limit) if limit is not None else None


def add_requests(
    llm: LLM,
    rows: pd.DataFrame,
    request: GenerationRequest,
    errors: np.ndarray,
    constraints: list | None = None,
) -> tuple[list[int], dict[str, int]]:
    """Render and check every row, then add the good ones to the engine, one request each.

    ``constraints``: the rows' structured constraints (`row_constraints`), when the caller has
    them already. Requests are added grouped by LoRA adapter (`adapter_order`). Returns each
    row's prompt tokens, and the rows in the engine by request id. Rows that cannot be
    generated get their reason in ``errors``.
    """
    if request.pooled:
        return add_pooling_requests(llm, rows, request, errors)
    token_ids = _tokenize(llm, rows, request, errors)
    prompt_tokens = [len(ids) if ids is not None else 0 for ids in token_ids]
    if constraints is None:
        constraints = row_constraints(rows, request.sampling, errors)
    defaults = generation_defaults(llm) if request.generation_config else None
    params = engine_params(rows, request, errors, constraints, defaults)
    loras = lora_requests(rows, request.adapters, errors)
    engine = llm.llm_engine
    pending = {}
    for i in adapter_order(loras):
        if errors[i] is not None:
            continue
        request_id = str(next(_request_ids))
        try:
            engine.add_request(
                request_id, {"prompt_token_ids": token_ids[i]}, params[i], lora_request=loras[i]
            )
        except Exception as e:
            errors[i] = rejection(constraints[i], e)
        else:
            pending[request_id] = i
    return prompt_tokens, pending


def engine_params(
    part: pd.DataFrame,
    request: GenerationRequest,
    errors: np.ndarray,
    constraints: list | None = None,
    defaults: dict | None = None,
) -> list:
    """Each row's engine parameters: for generation, one ``SamplingParams`` per row, shared
    between rows with the same per-row overrides and structured constraint. ``defaults``
    (`generation_defaults`) go over the run's sampling settings, under the rows' own."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    base = {key.replace("-", "_"): request.sampling.get(key) for key in SAMPLING_KEYS + SAMPLES_KEYS}
    base.update(defaults or {})
    cap = base.get("max_tokens") if defaults and "max_tokens" in defaults else None
    base["stop"] = list(base["stop"] or []) or None
    base["n"] = int(base["n"] or 1)
    # Logprobs as flat lists rather than a dict per token: far fewer objects for `rows` to read.
    base["flat_logprobs"] = True
    overrides = [column for column in OVERRIDE_COLUMNS + SAMPLES_OVERRIDE_COLUMNS if column in part]
    values = [part[column].to_numpy(dtype=object) for column in overrides]
    if constraints is None:
        constraints = row_constraints(part, request.sampling, errors)
    cache: dict[tuple, Any] = {}
    params: list = [None] * len(part)
    for i in range(len(part)):
        if errors[i] is not None:
            continue
        row = tuple(_hashable(v[i]) for v in values)
        key = (row, constraint_key(constraints[i]))
        if key not in cache:
            try:
                settings = {**base, **_row_overrides(overrides, row)}
                if cap is not None:  # the generation config's max_new_tokens bounds every row
                    settings["max_tokens"] = min(settings["max_tokens"], cap)
                _check_samples(settings)
                cache[key] = SamplingParams(**settings, structured_outputs=structured_outputs(constraints[i]))
                cache[key].output_kind = RequestOutputKind.FINAL_ONLY  # as LLM.generate asks
            except (TypeError, ValueError) as e:
                cache[key] = f"bad sampling value: {first_line(e, 200)}"
        if isinstance(cache[key], str):
            errors[i] = cache[key]
        else:
            params[i] = cache[key]
    return params


def _hashable(value: Any) -> Any:
    """A row's value as a key of the parameters cache: null as None, lists (stop) as tuples."""
    if isinstance(value, (list, tuple, np.ndarray)):
        return tuple(value)
    return None if is_missing(value) else value


def generation_defaults(llm: LLM) -> dict[str, Any]:
    """The sampling values of the model's generation config (``max_new_tokens`` as
    ``max_tokens``), as vLLM's OpenAI server takes them for fields a request leaves out."""
    return dict(llm.llm_engine.model_config.get_diff_sampling_param())


def _row_overrides(columns: list[str], values: tuple) -> dict[str, Any]:
    overrides = {}
    for column, value in zip(columns, values, strict=True):
        if value is None:
            continue
        if column in INTEGER_COLUMNS:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(f"{column} must be an integer, got {value}")
            value = int(value)
        elif column == "stop":
            value = _stop_strings(value)
        else:
            value = float(value)
        overrides[ENGINE_NAMES.get(column, column)] = value
    if overrides.get("max_tokens", 1) < 1:
        raise ValueError(f"max_tokens must be at least 1, got {overrides['max_tokens']}")
    if overrides.get("n", 1) < 1:
        raise ValueError(f"n must be at least 1, got {overrides['n']}")
    if overrides.get("logprobs", 0) < 0:
        raise ValueError(f"top_logprobs must be at least 0, got {overrides['logprobs']}")
    return overrides


def _stop_strings(value: Any) -> list[str]:
    """A row's ``stop``: one string or a list of strings."""
    strings = [value] if isinstance(value, str) else list(value)
    if not all(isinstance(s, str) and s for s in strings):
        raise ValueError(f"stop must be a string or a list of non-empty strings, got {value!r}")
    return strings


def _check_samples(settings: dict[str, Any]) -> None:
    """Refuse n > 1 with greedy decoding: the n samples would all be the same text."""
    if settings["n"] > 1 and (settings["temperature"] or 0) < GREEDY:
        raise ValueError(
            f"n is {settings['n']} with temperature {settings['temperature']:g} (greedy decoding): "
            "the samples would all be the same; give a temperature above 0, or n 1"
        )


def check_sampling(sampling: dict[str, Any]) -> None:
    """Refuse, before any cluster starts, run-wide sampling settings that no row could use:
    n below 1 or with greedy decoding, negative logprobs."""
    for key in ("n", "logprobs", "prompt-logprobs"):
        value = sampling.get(key)
        if value is None and key != "n":
            continue
        least = 1 if key == "n" else 0
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise UserError(f"sampling.{key} (--{key}) must be an integer of at least {least}, got {value!r}")
    if sampling["n"] > 1 and float(sampling["temperature"]) < GREEDY:
        raise UserError(
            f"--n {sampling['n']} with temperature {float(sampling['temperature']):g} (greedy decoding) "
            "would give the same sample n times; pass --temperature above 0 (and --seed to repeat "
            "the run's samples), or --n 1"
        )


def _tokenize(llm: LLM, part: pd.DataFrame, request: GenerationRequest, errors: np.ndarray) -> list:
    """Token ids of every row's prompt (chat messages rendered first); errors where it cannot."""
    tokenizer = llm.get_tokenizer()
    max_model_len = llm.llm_engine.model_config.max_model_len
    nothing = np.full(len(part), None, dtype=object)
    prompts = part[request.prompt_column].to_numpy(dtype=object) if request.prompt_column in part else nothing
    messages = (
        part[request.messages_column].to_numpy(dtype=object) if request.messages_column in part else nothing
    )
    plain: dict[int, str] = {}
    chat: dict[int, str] = {}
    for i in range(len(part)):
        if errors[i] is not None:  # found bad while reading (an OpenAI Batch line)
            continue
        conversation = messages[i]
        if not is_missing(conversation):
            try:
                chat[i] = tokenizer.apply_chat_template(
                    _as_messages(conversation), tokenize=False, add_generation_prompt=True
                )
            except Exception as e:
                errors[i] = f"messages cannot be rendered: {first_line(e, 200)}"
            continue
        prompt = prompts[i]
        if is_missing(prompt):
            errors[i] = "prompt is null"
        elif not isinstance(prompt, str):
            errors[i] = f"prompt is {type(prompt).__name__}, not text"
        elif not prompt.strip():
            errors[i] = "prompt is empty"
        else:
            plain[i] = prompt
    token_ids: list = [None] * len(part)
    for texts, special in ((plain, True), (chat, False)):
        if texts:
            encoded = tokenizer(list(texts.values()), add_special_tokens=special)["input_ids"]
            for i, ids in zip(texts, encoded, strict=True):
                token_ids[i] = list(ids)
    for i, ids in enumerate(token_ids):
        if ids is not None and len(ids) >= max_model_len:
            errors[i] = f"prompt has {len(ids)} tokens, too long for max_model_len {max_model_len}"
    return token_ids


def _as_messages(conversation: Any) -> list[dict[str, str]]:
    if isinstance(conversation, str):
        raise ValueError("expected a list of {role, content}, got a string")
    return [{"role": str(m["role"]), "content": str(m["content"])} for m in conversation]


def is_missing(value: Any) -> bool:
    if value is None or value is pd.NA:
        return True
    return isinstance(value, float) and math.isnan(value)


# The pooling tasks: embed, classify, score ----------------------------------------------------


def scores_by_cosine(llm: LLM) -> bool:
    """Whether ``llm`` scores pairs by the cosine of their embeddings (an embedding model), not
    as one cross-encoder prompt (a classifier with one label), as ``LLM.score`` decides."""
    return llm.pooling_task == "embed"


def add_pooling_requests(
    llm: LLM, rows: pd.DataFrame, request: GenerationRequest, errors: np.ndarray
) -> tuple[list[int], dict[str, int]]:
    """`add_requests` for embed, classify and score: one request a row, or two for a pair
    scored by cosine (each text embedded; the row is done when both are)."""
    if request.task == "score" and not scores_by_cosine(llm):
        return _add_cross_encoder_requests(llm, rows, request, errors)
    columns = list(request.text_columns) if request.task == "score" else [request.prompt_column]
    texts = [_pooling_tokens(llm, rows, column, request, errors) for column in columns]
    prompt_tokens = [sum(len(ids[i]) for ids in texts if ids[i] is not None) for i in range(len(rows))]
    params = pooling_params(llm, request)
    engine = llm.llm_engine
    pending: dict[str, int] = {}
    for i in range(len(rows)):
        if errors[i] is not None:
            continue
        added = []
        try:
            for ids in texts:
                request_id = str(next(_request_ids))
                engine.add_request(request_id, {"prompt_token_ids": ids[i]}, params)
                added.append(request_id)
        except Exception as e:
            errors[i] = f"rejected by the engine: {first_line(e, 200)}"
            if added:
                engine.abort_request(added)
        else:
            pending.update(dict.fromkeys(added, i))
    return prompt_tokens, pending


def pooling_params(llm: LLM, request: GenerationRequest, task: str | None = None):
    """The run's one ``PoolingParams``: the vLLM pooling task behind daskdp's (``task``), with
    the run's pooling options."""
    return engine_pooling_params(llm, task or request.task, request.pooling)


def engine_pooling_params(llm: LLM, task: str, options: dict[str, Any]):
    """``PoolingParams`` for daskdp's ``task`` on ``llm``: vLLM's task (score: the engine's own,
    embed or classify), normalisation (``use_activation``) and, for embeddings, Matryoshka
    ``dimensions``."""
    from vllm import PoolingParams

    if task == "score":
        task = llm.pooling_task
    params = {"use_activation": options.get("normalize")}
    if task == "embed":
        params["dimensions"] = options.get("dimensions")
    return PoolingParams(task=task, **params)


def _pooling_tokens(
    llm: LLM, part: pd.DataFrame, column: str, request: GenerationRequest, errors: np.ndarray
) -> list:
    """Token ids of each row's text in ``column``, as ``LLM.embed``/``classify`` tokenize it
    (special tokens added), cut to ``truncate-prompt-tokens`` when given; errors where they
    cannot be: missing or empty text, or a text longer than the model takes."""
    tokenizer = llm.get_tokenizer()
    max_model_len = llm.llm_engine.model_config.max_model_len
    keep = request.pooling["truncate-prompt-tokens"]
    values = part[column].to_numpy(dtype=object)
    texts: dict[int, str] = {}
    for i, text in enumerate(values):
        if errors[i] is not None:
            continue
        if is_missing(text):
            errors[i] = f"{column} is null"
        elif not isinstance(text, str):
            errors[i] = f"{column} is {type(text).__name__}, not text"
        elif not text.strip():
            errors[i] = f"{column} is empty"
        else:
            texts[i] = text
    token_ids: list = [None] * len(part)
    if texts:
        encoded = tokenizer(list(texts.values()), add_special_tokens=True)["input_ids"]
        for i, ids in zip(texts, encoded, strict=True):
            if keep is not None and len(ids) > keep:  # vLLM cuts on the tokenizer's side
                ids = ids[-keep:] if tokenizer.truncation_side == "left" else ids[:keep]
            if len(ids) > max_model_len:
                errors[i] = (
                    f"{column} has {len(ids)} tokens, too long for max_model_len {max_model_len}; "
                    "set --truncate-prompt-tokens to embed its start"
                )
            else:
                token_ids[i] = list(ids)
    return token_ids


def _add_cross_encoder_requests(
    llm: LLM, rows: pd.DataFrame, request: GenerationRequest, errors: np.ndarray
) -> tuple[list[int], dict[str, int]]:
    """Score pairs on a cross-encoder: each pair made into one prompt by vLLM's own scoring
    processor (separator, score template, truncation), as ``LLM.score`` makes it."""
    processor = llm.pooling_io_processors["cross-encoder"]
    tok_params = llm.renderer.default_cmpl_tok_params
    if request.pooling["truncate-prompt-tokens"] is not None:
        tok_params = tok_params.with_kwargs(truncate_prompt_tokens=request.pooling["truncate-prompt-tokens"])
    params = pooling_params(llm, request, "classify")
    first, second = (rows[column].to_numpy(dtype=object) for column in request.text_columns)
    engine = llm.llm_engine
    prompt_tokens = [0] * len(rows)
    pending: dict[str, int] = {}
    for i in range(len(rows)):
        for column, text in zip(request.text_columns, (first[i], second[i]), strict=True):
            if errors[i] is None and (is_missing(text) or not isinstance(text, str) or not text.strip()):
                errors[i] = f"{column} is {'null' if is_missing(text) else 'empty or not text'}"
        if errors[i] is not None:
            continue
        request_id = str(next(_request_ids))
        try:
            rendered = processor.render(
                {
                    "data_1": first[i],
                    "data_2": second[i],
                    "chat_template": None,
                    "max_tokens_per_query": 0,
                    "max_tokens_per_doc": 0,
                    "tok_params": tok_params,
                    "prompt_extras": None,
                    "skip_mm_cache": False,
                    "params": params,
                    "lora_requests": None,
                    "priorities": 0,
                }
            )
            prompt_tokens[i] = len(rendered["prompts"]["prompt_token_ids"])
            engine.add_request(request_id, rendered["prompts"], rendered["params"])
        except Exception as e:
            errors[i] = f"rejected by the engine: {first_line(e, 200)}"
        else:
            pending[request_id] = i
    return prompt_tokens, pending
