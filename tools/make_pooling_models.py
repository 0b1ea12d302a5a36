"""Build the tiny pooling test models beside the packaged tiny Llama, deterministically.

- ``classifier``: a ``LlamaForSequenceClassification`` with three labels (``id2label``
  negative / neutral / positive), for ``--task classify``;
- ``cross-encoder``: the same with one label, which vLLM scores pairs with (``--task score``
  on a cross-encoder).

The embedding model needs no building: the packaged tiny Llama (``--model tiny``) serves
``--task embed`` with vLLM's pooling runner. Both models share its tokenizer and sizes (vLLM's
CPU attention needs head_dim 64). Fixed seed: the same torch and transformers give the same bytes.

Usage::

    python tools/make_pooling_models.py DIRECTORY   # writes DIRECTORY/classifier, DIRECTORY/cross-encoder
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

TINY = Path(__file__).resolve().parents[1] / "daskdp" / "models" / "tiny-llama"
LABELS = {0: "negative", 1: "neutral", 2: "positive"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def build(out: Path, labels: dict[int, str], seed: int) -> Path:
    """A tiny ``LlamaForSequenceClassification`` with ``labels``, in ``out``."""
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    out.mkdir(parents=True, exist_ok=True)
    config = json.loads((TINY / "config.json").read_text())
    config.pop("architectures", None)
    config.pop("transformers_version", None)
    config = LlamaConfig(**config)
    config.architectures = ["LlamaForSequenceClassification"]
    config.num_labels = len(labels)
    config.id2label = dict(labels)
    config.label2id = {name: i for i, name in labels.items()}
    config.tie_word_embeddings = False
    torch.manual_seed(seed)
    model = LlamaForSequenceClassification(config)
    model.save_pretrained(out, safe_serialization=True)
    for name in TOKENIZER_FILES:
        shutil.copy(TINY / name, out / name)
    return out


def build_all(directory: Path) -> dict[str, Path]:
    """Both models in ``directory``, by name."""
    return {
        "classifier": build(directory / "classifier", LABELS, seed=1),
        "cross-encoder": build(directory / "cross-encoder", {0: "score"}, seed=2),
    }


def main(argv: list[str]) -> None:
    for name, path in build_all(Path(argv[0] if argv else "models")).items():
        print(f"wrote {name} in {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
