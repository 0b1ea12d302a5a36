"""Build the embedded default model: a tiny random-weight Llama in the Hugging Face layout.

The result is committed under ``daskdp/models/tiny-llama``; this script is how it was made.
It is deterministic: the same versions of torch, transformers and tokenizers give the same bytes.

Usage::

    python tools/make_tiny_model.py daskdp/models/tiny-llama
"""

from __future__ import annotations

import codecs
import contextlib
import io
import json
import sys
from pathlib import Path

SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{{ message['content'] | trim }}{{ '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}"
)

TOPICS = ["rivers", "prime numbers", "bread", "volcanoes", "the moon", "chess", "bees", "rain"]
TASKS = [
    "Write a short poem about {}.",
    "Explain {} to a child.",
    "List three facts about {}.",
    "Summarise the history of {} in one sentence.",
]


def corpus() -> list[str]:
    """Fixed training text for the tokenizer: the Zen of Python and templated prompts."""
    with contextlib.redirect_stdout(io.StringIO()):  # importing `this` prints the Zen
        import this
    zen = codecs.decode(this.s, "rot13").splitlines()
    prompts = [task.format(topic) for task in TASKS for topic in TOPICS]
    return zen + prompts


def build_tokenizer(out: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus(), trainer=trainer)
    bos = SPECIAL_TOKENS[0]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, tokenizer.token_to_id(bos))]
    )
    tokenizer.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<|begin_of_text|>",
                "eos_token": "<|eot_id|>",
                "pad_token": "<|end_of_text|>",
                "model_max_length": 2048,
                "chat_template": CHAT_TEMPLATE,
            },
            indent=2,
        )
        + "\n"
    )


def build_model(out: Path, vocab_size: int) -> None:
    import torch
    from tokenizers import Tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,  # vLLM's CPU attention needs head_dim >= 64
        max_position_embeddings=2048,
        initializer_range=0.2,  # peaked logits: greedy choices do not flip on rounding
        tie_word_embeddings=True,
        bos_token_id=tokenizer.token_to_id("<|begin_of_text|>"),
        eos_token_id=tokenizer.token_to_id("<|eot_id|>"),
        pad_token_id=tokenizer.token_to_id("<|end_of_text|>"),
        torch_dtype="float32",
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out, safe_serialization=True)


def main(argv: list[str]) -> None:
    out = Path(argv[0] if argv else "daskdp/models/tiny-llama")
    out.mkdir(parents=True, exist_ok=True)
    vocab_size = 1024
    build_tokenizer(out, vocab_size)
    build_model(out, vocab_size)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
