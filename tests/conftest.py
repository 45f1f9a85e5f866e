"""Shared fixtures: offline tiny tokenizers and a tiny Llama saved to disk (see tests/tiny.py).

The session-scoped tokenizers are shared by every test: a test that mutates one (setting a chat
template, say) must work on ``build_tokenizer(kind)`` or a copy instead.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from tests.tiny import build_tiny_model_dir, build_tokenizer, write_prepared_split


@pytest.fixture(autouse=True)
def _machine_independent_precision(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The suite computes in float32 on every CPU, and no test leaks TF32 into the next.

    CPU training autocasts to bfloat16 where the CPU has native bf16 dot products; the tests that
    compare against float32 references would then depend on the machine, so the suite pins float32
    (SFT_CPU_BF16=0, inherited by the commands tests start) and the precision tests lift the pin.
    A CUDA training run turns TF32 matmuls on for its process; they are put back after each test,
    so float32 comparisons later in the session stay float32."""
    if "SFT_CPU_BF16" not in os.environ:
        monkeypatch.setenv("SFT_CPU_BF16", "0")
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


@pytest.fixture(scope="session")
def chatml_tokenizer() -> PreTrainedTokenizerFast:
    """SmolLM2-Instruct-like: no BOS added, <|im_end|> is eos and pad, default system prompt."""
    return build_tokenizer("chatml")


@pytest.fixture(scope="session")
def zephyr_tokenizer() -> PreTrainedTokenizerFast:
    """TinyLlama-Chat-like: <s> prepended, </s> is eos and pad."""
    return build_tokenizer("zephyr")


@pytest.fixture(scope="session")
def plain_tokenizer() -> PreTrainedTokenizerFast:
    """A base model's tokenizer: TinyLlama's tokens, no chat template, no pad token."""
    return build_tokenizer("plain")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with a random 2-layer LlamaForCausalLM and the chatml tokenizer, loadable with
    AutoModelForCausalLM / AutoTokenizer.from_pretrained."""
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny_model"), build_tokenizer("chatml"))


@pytest.fixture(scope="session")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Prepared train (32) and validation (8) JSONL files of tests.tiny.alpaca_records (read-only)."""
    return write_prepared_split(tmp_path_factory.mktemp("data"))
