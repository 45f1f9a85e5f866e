"""GGUF export of a Llama with attention and MLP biases: each bias under its own ``.bias`` name,
as llama.cpp's converter (gguf's tensor name map) writes it, q/k biases permuted with their rows."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch
from transformers import LlamaForCausalLM

from sft.export.gguf import rotary_permute, export_gguf
from tests.tiny import build_tiny_model_dir, build_tokenizer


def test_a_llama_with_biases_exports_every_bias_by_its_own_name(tmp_path: Path) -> None:
    model_dir = build_tiny_model_dir(tmp_path / "plain", build_tokenizer("chatml"))
    model = LlamaForCausalLM.from_pretrained(model_dir)
    model.config.attention_bias = model.config.mlp_bias = True
    torch.manual_seed(1)
    biased = LlamaForCausalLM(model.config)
    biased.save_pretrained(tmp_path / "biased")
    build_tokenizer("chatml").save_pretrained(tmp_path / "biased")

    out = export_gguf(tmp_path / "biased", tmp_path / "biased.gguf", "f32")
    tensors = {tensor.name: np.asarray(tensor.data).reshape(tuple(reversed(tensor.shape.tolist())))
               for tensor in gguf.GGUFReader(out).tensors}
    names = gguf.TensorNameMap(gguf.MODEL_ARCH.LLAMA, model.config.num_hidden_layers)
    state = biased.state_dict()
    biases = [name for name in state if name.endswith(".bias")]
    assert len(biases) == 2 * 7  # q, k, v, o, gate, up, down in each of 2 layers
    config = biased.config
    for name in biases:
        expected_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        assert expected_name in tensors, expected_name
        expected = state[name].numpy()
        if "q_proj" in name:
            expected = rotary_permute(expected, config.num_attention_heads)
        elif "k_proj" in name:
            expected = rotary_permute(expected, config.num_key_value_heads)
        np.testing.assert_array_equal(tensors[expected_name], expected)
    assert len(tensors) == len(state)
