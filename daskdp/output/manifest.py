"""The run's manifest: the input's fingerprint, the chunk layout and the settings behind the
results; what ``--resume`` compares against."""

from __future__ import annotations

import json
import posixpath
import re
import time
from typing import TYPE_CHECKING, Any

from daskdp.output.chunks import filesystem, to_json, write_atomically
from daskdp.output.schema import CHUNKS_DIR, MANIFEST_FILE

if TYPE_CHECKING:
    from daskdp.plan import Layout

MANIFEST_VERSION = 1
SECRET_WORDS = {"token", "secret", "password", "passwd", "key", "apikey", "credential", "credentials", "auth"}


def redacted(settings: Any) -> Any:
    """``settings`` with the values of secret-looking keys (tokens, passwords) replaced."""
    if isinstance(settings, dict):
        return {k: "***" if _is_secret(str(k)) else redacted(v) for k, v in settings.items()}
    return settings


def _is_secret(key: str) -> bool:
    """``hf-token``, ``api_key``, ``password``: yes; ``max-tokens``, ``tokenizer``: no."""
    return bool(SECRET_WORDS & set(re.split(r"[-_.]", key.lower())))


def without_secrets(settings: Any) -> Any:
    """``settings`` without secret-looking keys: they change nothing generated."""
    if isinstance(settings, dict):
        return {k: without_secrets(v) for k, v in settings.items() if not _is_secret(str(k))}
    return settings


def result_settings(model: str, engine_args: dict, settings: dict) -> dict[str, Any]:
    """The settings that change what is generated, as the manifest records them."""
    task = settings["run"]["task"]
    # A pooling task has no sampling: the task and its own options change its results instead.
    # (Generation's manifests name no task, as before there were others.)
    return without_secrets(
        {
            "model": model,
            **(
                {"sampling": settings["sampling"]}
                if task == "generate"
                else {"task": task, "pooling": settings["pooling"]}
            ),
            "engine": engine_args,
            "input": settings["input"],
            "lora": settings["lora"]["adapters"] or {},  # engine has LoRA's own engine settings
        }
    )


def new_manifest(source: str, fingerprint: str, layout: Layout, settings: dict[str, Any]) -> dict[str, Any]:
    return {
        "version": MANIFEST_VERSION,
        "input": source,
        "input_fingerprint": fingerprint,
        "rows": layout.rows,
        "chunk_rows": layout.chunk_rows,
        "chunks": layout.chunks,
        "row_order": "prefix" if layout.by_prefix else "input",
        "settings": settings,
        "created": time.time(),
    }


def read_manifest(output: str) -> dict[str, Any] | None:
    """The manifest in ``output``, or None when there is none (or it is unreadable)."""
    fs, path = filesystem(output)
    target = posixpath.join(path, MANIFEST_FILE)
    if not fs.exists(target):
        return None
    try:
        with fs.open(target, "r") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def write_manifest(manifest: dict[str, Any], output: str) -> None:
    fs, path = filesystem(output)
    fs.makedirs(posixpath.join(path, CHUNKS_DIR), exist_ok=True)
    write_atomically(fs, posixpath.join(path, MANIFEST_FILE), to_json(manifest))


def differences(manifest: dict[str, Any], settings: dict[str, Any]) -> list[str]:
    """What differs between a run's manifest and this run's settings, in words."""
    found = []
    if manifest.get("version") != MANIFEST_VERSION:
        found.append(f"manifest version {manifest.get('version')} (this daskdp writes {MANIFEST_VERSION})")
    before, now = _flatten(manifest.get("settings", {})), _flatten(settings)
    for key in sorted(set(before) | set(now)):
        if before.get(key) != now.get(key):
            found.append(f"{key}: {before.get(key)!r} then, {now.get(key)!r} now")
    return found


def input_differs(manifest: dict[str, Any], fingerprint: str, rows: int) -> list[str]:
    """How this run's input differs from the one of a run's manifest, in words, if it does."""
    if manifest.get("rows") == rows and manifest.get("input_fingerprint") == fingerprint:
        return []
    return [f"the input (it had {manifest.get('rows')} rows, now {rows}, or their content changed)"]


def _flatten(settings: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in settings.items():
        name = f"{prefix}{str(key).replace('_', '-')}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = json.loads(json.dumps(value, default=str))  # tuples and lists compare equal
    return flat
