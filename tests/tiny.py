"""Tiny offline stand-ins for the real tokenizers and models, built in a few milliseconds.

Nothing here touches the network or the Hugging Face Hub. The tokenizers are byte-level BPEs
trained in memory, so any text (unicode included) encodes, with the special tokens, BOS
behaviour and chat templates of the models this package targets:

- ``chatml``: SmolLM2-Instruct. ``<|im_start|>`` is BOS but is never added by the tokenizer,
  ``<|im_end|>`` is both EOS and pad, and the template inserts a default system prompt.
- ``zephyr``: TinyLlama-1.1B-Chat. The tokenizer prepends ``<s>``; pad is ``</s>`` (pad == eos).
- ``plain``: a base model with TinyLlama's tokens, no chat template and no pad token.
- ``llama-spm``: TinyLlama's real kind of tokenizer, a SentencePiece BPE converted to
  ``tokenizer.json``: ``<unk>`` ``<s>`` ``</s>``, then the 256 byte-fallback tokens ``<0x00>``..
  ``<0xFF>``, then pieces spelled with ``▁`` for a space; a space is prepended to the text.
  Zephyr chat template as TinyLlama-Chat.
- ``llama-spm-legacy``: the same vocabulary in the older tokenizer.json layout of Llama 2 era
  files: a normalizer prepends the space to every piece of text (also after a special token)
  instead of a Metaspace pre-tokenizer prepending it to the first.
- ``llama3``: Llama-3-Instruct's layout: ``<|start_header_id|>role<|end_header_id|>`` headers, turns
  ended by ``<|eot_id|>`` (the EOS), no pad token; the tokenizer prepends ``<|begin_of_text|>`` and
  the template writes it too (the double-BOS trap).

:func:`build_chat_tokenizer` builds one for any chat template from its special tokens (a family's
markers as single tokens, as the real tokenizers have them), and :func:`trl_chat_template` reads a
family's official template from the installed ``trl`` package (a dev dependency), without
importing it.
"""

from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from sft.data.formats import alpaca_user_text

CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% endif %}"
)

ZEPHYR_TEMPLATE = (
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n"
    "{{ '<|user|>\\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'system' %}\n{{ '<|system|>\\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n"
    "{% endfor %}"
)

LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
    "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

_SPECIAL_TOKENS = {
    "chatml": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
    "zephyr": ["<unk>", "<s>", "</s>"],
    "plain": ["<unk>", "<s>", "</s>"],
    "llama-spm": ["<unk>", "<s>", "</s>"],
    "llama-spm-legacy": ["<unk>", "<s>", "</s>"],
    "llama3": ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
}

_CORPUS = [
    "Below is an instruction that describes a task. Write a response that completes the request.",
    "### Instruction:\nGive three tips for staying healthy.\n\n### Response:\n",
    "Eat a balanced diet, exercise regularly and get enough sleep.",
    "system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face",
    "<|user|>\n<|assistant|>\n<|system|>\nuser\nassistant\nsystem\n",
    "What is the capital of France? The capital of France is Paris.",
    "Translate the following sentence into French: the cat sleeps on the warm mat.",
    "Summarize the paragraph below in one sentence, keeping the main idea.",
    "Write a short poem about the ocean, the wind and the evening light.",
    "Explain why the sky is blue in simple words a child could understand.",
    "The quick brown fox jumps over the lazy dog while the birds sing in the trees.",
    "Classify each animal as a mammal, a bird or a fish: whale, eagle, salmon, horse.",
    "Rewrite the text so that it sounds more formal and polite to the reader.",
    "List the planets of the solar system in order from the sun outward.",
    "Mercury, Venus, Earth, Mars, Jupiter, Saturn, Uranus and Neptune.",
    "Compute the sum of the numbers 12, 7 and 23. The answer is 42.",
    "def add(a, b):\n    return a + b  # a Python function that adds two numbers",
    "Describe the water cycle: evaporation, condensation, precipitation and collection.",
    "Generate a list of five creative names for a coffee shop near the river.",
    "Be brief. Answer the question with one word when you can.",
    "Once upon a time there was a little robot who wanted to learn how to paint.",
    "Please find the grammatical error in this sentence and correct it.",
    "Headline: Local team wins the championship after a dramatic final game.",
    "Unicode: café, naïve, Straße, Ελληνικά, русский, 日本語, 中文, emoji 🙂🚀.",
    "Numbers 0 1 2 3 4 5 6 7 8 9 and punctuation .,;:!?()[]{}<>|/\\'\"-_=+*&^%$#@~`",
]


@functools.cache
def _trained_backend(kind: str) -> str:
    """The serialized backend tokenizer of a kind (trained once per process)."""
    specials = _SPECIAL_TOKENS[kind]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(_CORPUS * 4, trainer=trainer)
    if kind in ("zephyr", "plain", "llama3"):
        bos = specials[0] if kind == "llama3" else "<s>"
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, backend.token_to_id(bos))])
    else:
        backend.post_processor = processors.ByteLevel(trim_offsets=False)
    return backend.to_str()


@functools.cache
def _trained_sentencepiece_backend() -> str:
    """A Llama-style SentencePiece BPE: pieces never span a word boundary, unknown characters
    fall back to byte tokens, and a space is prepended to the text (as TinyLlama's tokenizer.json)."""
    specials = _SPECIAL_TOKENS["llama-spm"]
    trainer_backend = Tokenizer(models.BPE())
    trainer_backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=True)
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=specials, show_progress=False)
    trainer_backend.train_from_iterator(_CORPUS * 4, trainer=trainer)
    trained = json.loads(trainer_backend.to_str())["model"]
    pieces = [piece for piece, _ in sorted(trained["vocab"].items(), key=lambda item: item[1]) if piece not in specials]
    byte_tokens = [f"<0x{byte:02X}>" for byte in range(256)]
    vocab = {token: index for index, token in enumerate(specials + byte_tokens + pieces)}
    merges = [tuple(merge) if isinstance(merge, list) else tuple(merge.split(" ")) for merge in trained["merges"]]
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    backend.add_special_tokens(specials)
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])])
    return backend.to_str()


def build_tokenizer(kind: str) -> PreTrainedTokenizerFast:
    """A fresh tokenizer of ``kind`` (chatml, zephyr, plain, llama-spm, llama-spm-legacy, llama3); safe to
    mutate."""
    if kind not in _SPECIAL_TOKENS:
        raise ValueError(f"unknown tokenizer kind {kind!r}")
    backend = Tokenizer.from_str(_trained_sentencepiece_backend() if kind.startswith("llama-spm")
                                 else _trained_backend(kind))
    if kind == "llama-spm-legacy":
        backend.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
        backend.pre_tokenizer = None
    if kind == "chatml":
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=backend, unk_token="<|endoftext|>", bos_token="<|im_start|>",
            eos_token="<|im_end|>", pad_token="<|im_end|>", chat_template=CHATML_TEMPLATE)
    elif kind in ("zephyr", "llama-spm", "llama-spm-legacy"):
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
            pad_token="</s>", chat_template=ZEPHYR_TEMPLATE)
    elif kind == "llama3":
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=backend, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
            chat_template=LLAMA3_TEMPLATE)
    else:
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    return tokenizer


@functools.cache
def _trained_chat_backend(specials: tuple[str, ...], added_bos: str | None) -> str:
    """A byte-level BPE with ``specials`` as single tokens (``added_bos`` prepended to every text)."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=list(specials), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(_CORPUS * 4, trainer=trainer)
    if added_bos is None:
        backend.post_processor = processors.ByteLevel(trim_offsets=False)
    else:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{added_bos} $A", pair=f"{added_bos} $A {added_bos} $B",
            special_tokens=[(added_bos, backend.token_to_id(added_bos))])
    return backend.to_str()


def build_chat_tokenizer(chat_template: str, specials: list[str], *, eos: str, bos: str | None = None,
                         pad: str | None = None, unk: str | None = None, adds_bos: bool = False,
                         name: str = "") -> PreTrainedTokenizerFast:
    """A fresh tokenizer rendering ``chat_template``, each of ``specials`` one token (bos, eos, pad
    and unk among them); the tokenizer prepends BOS where ``adds_bos``, as Llama 3 and Gemma do."""
    backend = Tokenizer.from_str(_trained_chat_backend(tuple(specials), bos if adds_bos else None))
    named = {"bos_token": bos, "eos_token": eos, "pad_token": pad, "unk_token": unk}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, chat_template=chat_template,
                                        **{key: value for key, value in named.items() if value is not None})
    tokenizer.name_or_path = name
    return tokenizer


def trl_chat_template(name: str) -> str | None:
    """The text of ``trl/chat_templates/<name>.jinja`` from the installed trl, or None without trl."""
    spec = importlib.util.find_spec("trl")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "chat_templates" / f"{name}.jinja"
    return path.read_text(encoding="utf-8") if path.is_file() else None


def build_tiny_model_dir(path: str | Path, tokenizer: PreTrainedTokenizerFast, hidden_size: int = 32,
                         layers: int = 2) -> Path:
    """Save a random Llama (2 layers unless told) and ``tokenizer`` into ``path``; return the directory."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=64, max_position_embeddings=256,
        tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_jsonl(path: str | Path, records: list[Any]) -> Path:
    """Write one JSON value per line (UTF-8, non-ASCII kept as is); return the path."""
    path = Path(path)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


_TOPICS = ["the ocean", "a red bicycle", "coffee", "the moon", "Paris", "a small robot", "winter",
           "prime numbers", "the library", "green tea", "a mountain trail", "jazz music", "Straße"]
_VERBS = ["Describe", "Explain", "Summarize", "Write a sentence about", "Give a fact about",
          "List two things about", "Name one word for"]
_WORDS = ("the quick brown fox jumps over the lazy dog while birds sing in the warm evening light "
          "and the river runs past the old mill toward the sea").split()


def alpaca_records(n: int) -> list[dict[str, str]]:
    """``n`` distinct, deterministic prepared records (id, instruction, input, output, source).

    Every third record has a non-empty input; answers run from 1 to 40 words.
    """
    records = []
    for i in range(n):
        topic = _TOPICS[i % len(_TOPICS)]
        verb = _VERBS[i % len(_VERBS)]
        n_words = 1 + (i * 7) % 40
        words = [_WORDS[(i + j) % len(_WORDS)] for j in range(n_words)]
        records.append({
            "id": f"rec-{i:04d}",
            "instruction": f"{verb} {topic} (item {i}).",
            "input": f"Context {i}: {_WORDS[i % len(_WORDS)]} and {topic}." if i % 3 == 1 else "",
            "output": " ".join(words).capitalize() + ".",
            "source": "alpaca",
        })
    return records


def conversation_records(n: int) -> list[dict[str, Any]]:
    """alpaca_records(n) as sft.data.prepared.read_conversations returns them: id, source, messages."""
    return [{"id": r["id"], "source": r["source"],
             "messages": [{"role": "user", "content": alpaca_user_text(r["instruction"], r["input"])},
                          {"role": "assistant", "content": r["output"]}]}
            for r in alpaca_records(n)]


def write_prepared_split(directory: str | Path, n_train: int = 32, n_val: int = 8) -> tuple[Path, Path]:
    """Prepared train and validation JSONL files of alpaca_records, as prepare would write them."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    records = alpaca_records(n_train + n_val)
    return (write_jsonl(directory / "sft_train.jsonl", records[:n_train]),
            write_jsonl(directory / "sft_val.jsonl", records[n_train:]))


def as_flags(overrides: dict[str, Any]) -> list[str]:
    """Config overrides as the train command's flags: {"max_steps": 4} -> ["--max-steps", "4"]."""
    return [arg for key, value in overrides.items() for arg in (f"--{key.replace('_', '-')}", str(value))]


def logged(output_dir: str | Path, key: str = "loss") -> dict[int, float]:
    """{step: value} of one key ("loss", "eval_loss") in a run's trainer_state.json log."""
    state = json.loads((Path(output_dir) / "trainer_state.json").read_text(encoding="utf-8"))
    return {entry["step"]: entry[key] for entry in state["log_history"] if key in entry}


def tiny_run_overrides(model_dir: Path, train_file: Path, val_file: Path, output_dir: Path,
                       **changes: Any) -> dict[str, Any]:
    """Config overrides for a fast CPU run of the tiny model (flat field names, as CLI flags)."""
    overrides = {
        "model": str(model_dir), "train_file": str(train_file), "val_file": str(val_file),
        "output_dir": str(output_dir), "device": "cpu", "max_seq_length": 64, "batch_size": 4,
        "eval_batch_size": 4, "gradient_accumulation_steps": 1, "learning_rate": 5e-3, "warmup_ratio": 0.0,
        "logging_steps": 1, "eval_steps": 100, "save_steps": 100, "max_steps": 6, "lora_dropout": 0.1,
    }
    overrides.update(changes)
    return overrides
