"""Build a tiny LoRA adapter for the packaged tiny model, in the PEFT layout vLLM loads.

The adapter has rank ``--rank`` on every layer's ``q_proj`` and ``v_proj``, with random weights
from a fixed seed: the same seed gives the same bytes, another seed another adapter (with
another greedy text). Its weights are large enough to change the tiny model's greedy text,
which is all tests and benchmarks need of it. numpy and safetensors only: no torch, no peft.

Usage::

    python tools/make_tiny_lora.py OUT_DIR [--seed N] [--rank R]

writes ``OUT_DIR/adapter_config.json`` and ``OUT_DIR/adapter_model.safetensors`` (a few KB).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

TINY_MODEL = Path(__file__).resolve().parents[1] / "daskdp" / "models" / "tiny-llama"
TARGETS = ("q_proj", "v_proj")


def make_tiny_lora(out: str | Path, seed: int = 0, rank: int = 4, model: str | Path = TINY_MODEL) -> Path:
    """Write an adapter for ``model`` (the tiny model) into ``out``; return ``out``."""
    import numpy as np
    from safetensors.numpy import save_file

    config = json.loads((Path(model) / "config.json").read_text())
    hidden = config["hidden_size"]
    head_dim = config.get("head_dim", hidden // config["num_attention_heads"])
    outputs = {
        "q_proj": config["num_attention_heads"] * head_dim,
        "v_proj": config["num_key_value_heads"] * head_dim,
    }
    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in range(config["num_hidden_layers"]):
        for target in TARGETS:
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{target}"
            # float16 keeps the file small; the scale makes the change visible in greedy text.
            tensors[f"{prefix}.lora_A.weight"] = rng.normal(0, 0.5, (rank, hidden)).astype(np.float16)
            tensors[f"{prefix}.lora_B.weight"] = rng.normal(0, 0.5, (outputs[target], rank)).astype(
                np.float16
            )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    adapter_config = {
        "base_model_name_or_path": str(Path(model).name),
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": 2 * rank,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": list(TARGETS),
        "fan_in_fan_out": False,
        "inference_mode": True,
    }
    (out / "adapter_config.json").write_text(json.dumps(adapter_config, indent=1, sort_keys=True) + "\n")
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="directory to write the adapter into")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the weights (default 0)")
    parser.add_argument("--rank", type=int, default=4, help="LoRA rank (default 4)")
    args = parser.parse_args(argv)
    print(make_tiny_lora(args.out, args.seed, args.rank))
    return 0


if __name__ == "__main__":
    sys.exit(main())
