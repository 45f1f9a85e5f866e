"""A DPO run goes the whole way out: merged, written as GGUF with its tokenizer and chat
template, read back by `--verify`, and given a Modelfile whose template is the run's."""

from __future__ import annotations

from pathlib import Path

import gguf
import pytest

from sft.export.gguf import main as export_main
from sft.export.merge import merge
from sft.export.ollama import recognize_layout
from sft.modeling.models import load_tokenizer
from sft.recipes import dpo as dpo_recipe
from tests.tiny import as_flags, tiny_run_overrides
from tests.training.tiny_pairs import write_preference_split


def test_a_merged_dpo_run_exports_with_its_chat_template_and_tokens(tiny_model_dir: Path, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture) -> None:
    pairs = write_preference_split(tmp_path / "pairs", n_train=8, n_val=4)
    run = tmp_path / "dpo"
    assert dpo_recipe.main(as_flags(tiny_run_overrides(tiny_model_dir, *pairs, run, max_seq_length=128, batch_size=2,
                                                       eval_batch_size=2, max_steps=2, lora_dropout=0.0,
                                                       learning_rate=2e-2))) == 0
    merged = merge(run, tmp_path / "merged")
    out = tmp_path / "gguf"
    out.mkdir()
    assert export_main(["--model", str(merged), "--gguf", str(out / "dpo.gguf"), "--precision", "f32", "--verify",
                        "--ollama", "tiny-dpo"]) == 0
    assert "verify: passed" in capsys.readouterr().out

    tokenizer = load_tokenizer(str(run))  # the run's tokenizer, saved with its adapter
    fields = {key: field.contents() for key, field in gguf.GGUFReader(out / "dpo.gguf").fields.items()}
    assert tokenizer.chat_template and fields["tokenizer.chat_template"] == tokenizer.chat_template
    assert fields["tokenizer.ggml.tokens"][:len(tokenizer)] == tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    assert fields["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    modelfile = (out / "Modelfile").read_text(encoding="utf-8")
    assert f'TEMPLATE """{recognize_layout(tokenizer).go_template()}"""' in modelfile
