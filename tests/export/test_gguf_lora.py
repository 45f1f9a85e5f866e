"""A run's adapter as a GGUF LoRA adapter: for every adapted weight, the base model's GGUF tensor
plus alpha/rank * lora_b @ lora_a (as llama.cpp applies it) is the merged model's GGUF tensor,
whose file --verify checks against the merged model on its own."""

from __future__ import annotations

import warnings
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from sft.export.gguf import export_gguf
from sft.export.gguf import main as export_main
from tests.families import build_family_model_dir
from tests.tiny import build_tokenizer


def tensors(path: Path) -> dict[str, np.ndarray]:
    return {t.name: np.asarray(t.data, dtype=np.float32) for t in gguf.GGUFReader(path).tensors}


@pytest.mark.parametrize("family, rslora", [("llama", False), ("qwen2", True), ("phi3", False)])
def test_lora_adapter_applied_as_llama_cpp_does_gives_the_merged_file(tmp_path: Path, family: str,
                                                                       rslora: bool) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base_dir = build_family_model_dir(tmp_path / "base", family, build_tokenizer("chatml"))
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    torch.manual_seed(3)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                  init_lora_weights=False, use_rslora=rslora))
    adapter_dir = tmp_path / "adapter"
    peft_model.save_pretrained(adapter_dir)
    merged_dir = tmp_path / "merged"
    peft_model.merge_and_unload().save_pretrained(merged_dir)
    build_tokenizer("chatml").save_pretrained(merged_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = tensors(export_gguf(base_dir, tmp_path / "base.gguf", "f32"))
        merged = tensors(export_gguf(merged_dir, tmp_path / "merged.gguf", "f32"))
    assert export_main(["--adapter", str(adapter_dir), "--base-model", str(base_dir),
                        "--gguf", str(tmp_path / "lora.gguf")]) == 0

    reader = gguf.GGUFReader(tmp_path / "lora.gguf")
    assert reader.fields["general.type"].contents() == "adapter"
    assert reader.fields["adapter.type"].contents() == "lora"
    alpha = reader.fields["adapter.lora.alpha"].contents()
    assert alpha == pytest.approx(8 * 2 if rslora else 8)  # rsLoRA's alpha/sqrt(r) written as alpha'/r
    lora = tensors(tmp_path / "lora.gguf")
    adapted = sorted(name.removesuffix(".lora_a") for name in lora if name.endswith(".lora_a"))
    assert len(adapted) == 2 * (4 if family == "phi3" else 7)  # every linear layer of both blocks (phi3: fused)
    for name in adapted:
        lora_a, lora_b = lora[name + ".lora_a"], lora[name + ".lora_b"]
        assert lora_a.shape[0] == lora_b.shape[1] == 4
        applied = base[name] + alpha / 4 * lora_b @ lora_a
        np.testing.assert_allclose(applied, merged[name], atol=2e-5, rtol=0, err_msg=name)
        assert np.abs(merged[name] - base[name]).max() > 1e-3  # the adapter changed it


def test_an_adapter_without_its_config_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert export_main(["--adapter", str(tmp_path), "--gguf", str(tmp_path / "lora.gguf")]) == 2
    err = capsys.readouterr().err
    assert "no adapter_config.json" in err and not (tmp_path / "lora.gguf").exists()
