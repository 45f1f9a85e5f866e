"""`sft export --adapter DIR --gguf FILE`: the run's LoRA adapter as a GGUF LoRA adapter, which
llama.cpp applies to the base model's GGUF at load time (`llama-cli -m base.gguf --lora FILE`,
Ollama's `ADAPTER`), without merging.

As llama.cpp's convert_lora_to_gguf writes one: ``general.type`` adapter, ``adapter.type`` lora,
``adapter.lora.alpha``, and for each adapted weight ``<gguf name>.lora_a`` (rank x in) and
``.lora_b`` (out x rank), B's rows reordered as the weight's are for llama.cpp's rope layout.
llama.cpp scales by alpha / rank; an rsLoRA adapter (alpha / sqrt(rank)) is written with the
alpha that gives the same scale.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import gguf
import numpy as np
from safetensors.numpy import load_file

from sft.config import ConfigError
from sft.export.gguf import arch_name, check_gguf_out, family_of, gguf_file, rotary_permute

PEFT_PREFIX = "base_model.model."


def _base_config(adapter_dir: Path, model: str | None):
    from transformers import AutoConfig

    from sft.modeling.models import resolve_model_path

    settings = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    base = model or settings.get("base_model_name_or_path")
    if not base:
        raise ConfigError(f"{adapter_dir}: the adapter does not name its base model; pass --base-model")
    return settings, AutoConfig.from_pretrained(resolve_model_path(base))


def export_lora_gguf(adapter_dir: str | Path, out: str | Path, base_model: str | None = None) -> Path:
    """Write the adapter in ``adapter_dir`` as the GGUF LoRA adapter ``out`` (float32 tensors)."""
    adapter_dir, out = Path(adapter_dir), Path(out)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise ConfigError(f"--adapter {adapter_dir}: no adapter_config.json; pass a training output directory "
                          f"or checkpoint-N")
    check_gguf_out(out)
    settings, config = _base_config(adapter_dir, base_model)
    if settings.get("use_dora"):
        raise ConfigError(f"{adapter_dir}: a DoRA adapter has no llama.cpp form; merge it (`sft merge`) and export that")
    if settings.get("modules_to_save"):
        raise ConfigError(f"{adapter_dir}: the adapter also trains whole modules ({settings['modules_to_save']}); "
                          f"merge it (`sft merge`) and export that")
    family = family_of(config)
    names = gguf.get_tensor_name_map(family.arch, config.num_hidden_layers)
    weights = load_file(adapter_dir / "adapter_model.safetensors")
    rank = settings["r"]
    alpha = settings["lora_alpha"] * (math.sqrt(rank) if settings.get("use_rslora") else 1.0)
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads

    pairs = []
    for key in sorted(weights):
        if ".lora_A." not in key:
            continue
        module = key.removeprefix(PEFT_PREFIX).split(".lora_A.")[0]
        found = names.get_type_and_name(module + ".weight", try_suffixes=(".weight",))
        if found is None or found[0] not in gguf.MODEL_TENSORS[family.arch]:
            raise ConfigError(f"adapter tensor {key} has no place in llama.cpp's {arch_name(config)} architecture")
        lora_a = weights[key].astype(np.float32)
        lora_b = weights[key.replace(".lora_A.", ".lora_B.")].astype(np.float32)
        if family.rotary_permute and module.endswith("q_proj"):
            lora_b = rotary_permute(lora_b, config.num_attention_heads)
        elif family.rotary_permute and module.endswith("k_proj"):
            lora_b = rotary_permute(lora_b, kv_heads)
        pairs.append((found[1], lora_a, lora_b))
    if not pairs:
        raise ConfigError(f"{adapter_dir}: no LoRA weights in adapter_model.safetensors")

    with gguf_file(out, arch_name(config)) as writer:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
        for name, lora_a, lora_b in pairs:
            writer.add_tensor(name + ".lora_a", lora_a)
            writer.add_tensor(name + ".lora_b", lora_b)
    return out
