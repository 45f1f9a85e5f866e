"""The tiny byte-level tokenizers split text with GPT-2's regex (``ByteLevel(use_regex=True)``),
which is llama.cpp's 'gpt-2' pre-tokenizer: they are registered under that name, as a real
tokenizer's probe hash is, so that llama.cpp (where installed) tokenizes their files as training
does. A test of the unknown-tokenizer path removes its entry."""

from __future__ import annotations

import pytest

from sft.export import gguf_vocab
from tests.tiny import build_tokenizer

GPT2_SPLIT_KINDS = ("chatml", "zephyr", "plain", "llama3")


def probe_hash(tokenizer) -> str:
    return gguf_vocab.sha256(str(tokenizer.encode(gguf_vocab.PRE_TOKENIZER_PROBE)).encode()).hexdigest()


@pytest.fixture(autouse=True)
def tiny_tokenizers_split_as_gpt2(monkeypatch: pytest.MonkeyPatch) -> None:
    for kind in GPT2_SPLIT_KINDS:
        monkeypatch.setitem(gguf_vocab.PRE_TOKENIZERS, probe_hash(build_tokenizer(kind)), "gpt-2")
