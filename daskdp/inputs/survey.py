"""The survey: one pass over the input on the workers, for its rows, a fingerprint of their
content, each row's estimated cost and the prefix keys that put rows sharing a prefix together."""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

CHARS_PER_TOKEN = 4  # a prompt's length in tokens, roughly, for balancing only

# Rows whose prompts start with the same PREFIX_CHARS[0] characters share a long prefix; within
# them, the same PREFIX_CHARS[1] characters. Keys of both, hashed, put such rows together.
PREFIX_CHARS = (128, 1024)

SHARED_PREFIX_ROWS = 0.1  # the fraction of rows that must share a prefix for reordering to pay


@dataclass
class Survey:
    """What one pass over the input tells: rows per input partition, a fingerprint of their
    content, each row's estimated cost (prompt tokens + n x max_tokens, in input order), and the
    prefix keys of the rows that have a long prefix (``prefixed``: their input positions).

    Only rows with a long prefix carry keys, so that a large input of short prompts costs the
    client 4 bytes a row.
    """

    lengths: list[int]
    fingerprint: str
    costs: np.ndarray  # float32, one per row
    prefixed: np.ndarray  # input positions of the rows with a long prefix
    prefix_keys: np.ndarray  # len(prefixed) x len(PREFIX_CHARS), uint64

    @property
    def rows(self) -> int:
        return sum(self.lengths)

    def shares_prefixes(self) -> bool:
        """Whether enough rows share a long prefix with another row for prefix locality to pay."""
        _, counts = np.unique(self.prefix_keys[:, 0], return_counts=True)
        return counts[counts > 1].sum() >= SHARED_PREFIX_ROWS * self.rows

    @functools.cached_property
    def prefix_order(self) -> np.ndarray:
        """The rows, by input position, with rows sharing a prefix together (input order within);
        rows without a long prefix first, in input order."""
        keys = np.zeros((len(PREFIX_CHARS), self.rows), dtype=np.uint64)
        keys[:, self.prefixed] = self.prefix_keys.T
        return np.lexsort((np.arange(self.rows), *keys[::-1]))

    def arrangement(self, by_prefix: bool) -> tuple[np.ndarray | None, np.ndarray]:
        """Each row's place (``None``: input order) and the rows' costs in that order."""
        if not by_prefix:
            return None, self.costs
        order = self.prefix_order
        slots = np.empty(self.rows, dtype=np.int64)
        slots[order] = np.arange(self.rows)
        return slots, self.costs[order]


SURVEY_META = pd.DataFrame(
    {
        name: pd.Series(dtype="int64" if name == "rows" else object)
        for name in ("rows", "digest", "costs", "prefixed", "prefix_keys", "null_ids", "id_hashes")
    }
)


def survey_partition(
    part: pd.DataFrame,
    columns: tuple[str, str],
    id_column: str,
    max_tokens: int,
    n: int = 1,
    pooled: tuple[str, ...] | None = None,
) -> pd.DataFrame:
    """One partition's row count, a digest of its rows (index ignored, order kept), its rows'
    costs, the positions and prefix keys of those with a long prefix, and its ids: the
    positions of null ones and a hash of each (as text: ``1`` and ``"1"`` are one id).

    ``pooled``: a pooling task's text columns, whose tokens are each row's whole cost."""
    hashable = part.assign(
        **{
            name: part[name].map(repr)  # chat messages are lists, which pandas cannot hash
            for name in part.columns
            if pd.api.types.is_object_dtype(part[name].dtype)
        }
    )
    hashes = pd.util.hash_pandas_object(hashable, index=False).to_numpy()
    digest = hashlib.sha256(",".join(map(str, part.columns)).encode() + hashes.tobytes()).hexdigest()
    prefixed, keys = prefix_keys(part, columns)
    null_ids, id_hashes = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.uint64)
    if id_column in part:
        ids = part[id_column]
        null_ids = np.flatnonzero(ids.isna().to_numpy())
        id_hashes = pd.util.hash_array(ids.map(str).to_numpy(dtype=object))
    return pd.DataFrame(
        {
            "rows": [len(part)],
            "digest": [digest],
            "costs": [
                row_costs(part, columns, max_tokens, n) if pooled is None else text_costs(part, pooled)
            ],
            "prefixed": [prefixed],
            "prefix_keys": [keys],
            "null_ids": [null_ids],
            "id_hashes": [id_hashes],
        }
    )


def prompt_texts(part: pd.DataFrame, columns: tuple[str, str]) -> pd.Series:
    """Each row's prompt as text: the prompt, or its chat messages' contents; '' for neither."""
    prompt, messages = columns
    texts = pd.Series("", index=part.index, dtype=object)
    if messages in part:
        rendered = part[messages].map(_message_text, na_action="ignore")
        texts = rendered.where(rendered.notna(), texts)
    if prompt in part:
        given = part[prompt].map(lambda p: p if isinstance(p, str) else None, na_action="ignore")
        texts = given.where(given.notna(), texts)
    return texts


def prefix_keys(part: pd.DataFrame, columns: tuple[str, str]) -> tuple[np.ndarray, np.ndarray]:
    """The positions of the rows whose prompt is at least ``PREFIX_CHARS[0]`` characters long, and
    hashes of their first ``PREFIX_CHARS`` characters, one column per length."""
    texts = prompt_texts(part, columns).astype(str)
    prefixed = np.flatnonzero((texts.str.len() >= PREFIX_CHARS[0]).to_numpy())
    texts = texts.iloc[prefixed]
    keys = [pd.util.hash_array(texts.str.slice(0, n).to_numpy(dtype=object)) for n in PREFIX_CHARS]
    return prefixed, np.stack(keys, axis=1)


def _message_text(conversation: Any) -> str | None:
    if not isinstance(conversation, (list, tuple, np.ndarray)):
        return None
    return "\n".join(str(m.get("content", "")) if isinstance(m, dict) else "" for m in conversation)


def text_costs(part: pd.DataFrame, columns: tuple[str, ...]) -> np.ndarray:
    """Each row's estimated tokens in its texts (a pooling task's cost: there is no output)."""
    chars = np.zeros(len(part), dtype=np.int64)
    for column in columns:
        texts = part[column].map(lambda t: t if isinstance(t, str) else "", na_action="ignore")
        chars += texts.fillna("").str.len().to_numpy(dtype=np.int64)
    return (chars // CHARS_PER_TOKEN + 1).astype(np.float32)


def row_costs(part: pd.DataFrame, columns: tuple[str, str], max_tokens: int, n: int = 1) -> np.ndarray:
    """Each row's estimated cost in tokens: its prompt's (from its length in characters) plus
    ``max_tokens`` for each of its ``n`` samples (the columns of those names where given and
    valid, else the run's); the prompt is read once for all samples."""
    chars = prompt_texts(part, columns).str.len().to_numpy(dtype=np.int64)
    limits, samples = (_per_row(part, name, value) for name, value in (("max_tokens", max_tokens), ("n", n)))
    return (chars // CHARS_PER_TOKEN + limits * samples).astype(np.float32)


def _per_row(part: pd.DataFrame, column: str, default: int) -> np.ndarray:
    """The column's values where they are usable (at least 1), else ``default``."""
    values = np.full(len(part), default, dtype=np.int64)
    if column in part:
        given = pd.to_numeric(part[column], errors="coerce").to_numpy(dtype=float)
        usable = np.isfinite(given) & (given >= 1)
        values[usable] = given[usable].astype(np.int64)
    return values
