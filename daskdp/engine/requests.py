"""Per-row settings -> engine requests: each row's prompt rendered and tokenized, its sampling
parameters, and the request added to the engine. The one place a row becomes a request; a new
task (pooling) or per-row setting extends `engine_params`.

Requests go to the engine itself (``llm_engine.add_request``), not through ``LLM.enqueue``,
which refuses pooling runners; each output then carries exactly the id given here.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from daskdp.errors import first_line

if TYPE_CHECKING:
    from vllm import LLM

SAMPLING_KEYS = ("temperature", "top-p", "top-k", "max-tokens", "seed", "stop", "ignore-eos")
OVERRIDE_COLUMNS = ("max_tokens", "temperature", "seed")
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
    llm: LLM, rows: pd.DataFrame, request: GenerationRequest, errors: np.ndarray
) -> tuple[list[int], dict[str, int]]:
    """Render and check every row, then add the good ones to the engine, one request each.

    Returns each row's prompt tokens, and the rows in the engine by request id. Rows that
    cannot be generated get their reason in ``errors``.
    """
    token_ids = _tokenize(llm, rows, request, errors)
    prompt_tokens = [len(ids) if ids is not None else 0 for ids in token_ids]
    defaults = generation_defaults(llm) if request.generation_config else None
    params = engine_params(rows, request, errors, defaults)
    engine = llm.llm_engine
    pending = {}
    for i in range(len(rows)):
        if errors[i] is not None:
            continue
        request_id = str(next(_request_ids))
        try:
            engine.add_request(request_id, {"prompt_token_ids": token_ids[i]}, params[i])
        except Exception as e:
            errors[i] = f"rejected by the engine: {first_line(e, 200)}"
        else:
            pending[request_id] = i
    return prompt_tokens, pending


def engine_params(
    part: pd.DataFrame, request: GenerationRequest, errors: np.ndarray, defaults: dict | None = None
) -> list:
    """Each row's engine parameters: for generation, one ``SamplingParams`` per row, shared
    between rows with the same per-row overrides. ``defaults`` (`generation_defaults`) go
    over the run's sampling settings, under the rows' own."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    base = {key.replace("-", "_"): request.sampling[key] for key in SAMPLING_KEYS}
    base.update(defaults or {})
    cap = base.get("max_tokens") if defaults and "max_tokens" in defaults else None
    base["stop"] = list(base["stop"] or []) or None
    overrides = [column for column in OVERRIDE_COLUMNS if column in part]
    values = [part[column].to_numpy(dtype=object) for column in overrides]
    cache: dict[tuple, Any] = {}
    params: list = [None] * len(part)
    for i in range(len(part)):
        if errors[i] is not None:
            continue
        key = tuple(None if is_missing(v[i]) else v[i] for v in values)
        if key not in cache:
            try:
                settings = {**base, **_row_overrides(overrides, key)}
                if cap is not None:  # the generation config's max_new_tokens bounds every row
                    settings["max_tokens"] = min(settings["max_tokens"], cap)
                cache[key] = SamplingParams(**settings)
                cache[key].output_kind = RequestOutputKind.FINAL_ONLY  # as LLM.generate asks
            except (TypeError, ValueError) as e:
                cache[key] = f"bad sampling value: {first_line(e, 200)}"
        if isinstance(cache[key], str):
            errors[i] = cache[key]
        else:
            params[i] = cache[key]
    return params


def generation_defaults(llm: LLM) -> dict[str, Any]:
    """The sampling values of the model's generation config (``max_new_tokens`` as
    ``max_tokens``), as vLLM's OpenAI server takes them for fields a request leaves out."""
    return dict(llm.llm_engine.model_config.get_diff_sampling_param())


def _row_overrides(columns: list[str], values: tuple) -> dict[str, Any]:
    overrides = {}
    for column, value in zip(columns, values, strict=True):
        if value is None:
            continue
        if column in ("max_tokens", "seed"):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(f"{column} must be an integer, got {value}")
            value = int(value)
        else:
            value = float(value)
        overrides[column] = value
    if overrides.get("max_tokens", 1) < 1:
        raise ValueError(f"max_tokens must be at least 1, got {overrides['max_tokens']}")
    return overrides


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
