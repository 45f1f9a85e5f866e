"""The one GGUF writer of sft export (models and LoRA adapters): whole files or none."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest

from sft.config import ConfigError
from sft.export.gguf import check_gguf_out, gguf_file


def test_what_the_block_adds_is_written_and_read_back(tmp_path: Path) -> None:
    out = tmp_path / "model.gguf"
    with gguf_file(out, "llama") as writer:
        writer.add_string(gguf.Keys.General.NAME, "tiny")
        writer.add_tensor("token_embd.weight", np.arange(6, dtype=np.float32).reshape(2, 3))
    reader = gguf.GGUFReader(out)
    assert reader.fields[gguf.Keys.General.ARCHITECTURE].contents() == "llama"
    assert reader.fields[gguf.Keys.General.NAME].contents() == "tiny"
    (tensor,) = reader.tensors
    assert tensor.name == "token_embd.weight" and tensor.data.tolist() == [[0, 1, 2], [3, 4, 5]]
    with pytest.raises(ConfigError, match="exists; choose a new file name"):
        check_gguf_out(out)


def test_an_error_while_writing_leaves_no_file(tmp_path: Path) -> None:
    out = tmp_path / "model.gguf"
    with pytest.raises(RuntimeError, match="stop"), gguf_file(out, "llama") as writer:
        writer.add_tensor("token_embd.weight", np.zeros((2, 3), dtype=np.float32))
        raise RuntimeError("stop")
    assert list(tmp_path.iterdir()) == []
    check_gguf_out(out)
    with pytest.raises(ConfigError, match="cannot write into"):
        check_gguf_out(tmp_path / "missing" / "model.gguf")
