"""Tiny random models of the families people fine-tune, every family-specific transform switched on.

Each family's config turns on what makes it differ from Llama after the last layer and inside
attention, at values far from identity so that skipping one changes the result: soft-capped
final logits and attention scores (Gemma 2/3), logit scaling and embedding / residual /
attention multipliers (Granite), a logit scale (Cohere), sliding windows shorter than the
examples (Mistral, Qwen2/3, Gemma 2/3, Phi-3, SmolLM3), q/k norms (Qwen3, OLMo 2, Cohere, Gemma 3),
projection biases (Qwen2, Llama with attention_bias and mlp_bias), fused projections (Phi-3's
qkv_proj and gate_up_proj), layers without rotary embedding (SmolLM3), tied and untied
embeddings. Weights are drawn with ``initializer_range`` 0.3 so that logits are not flat.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

WINDOW = 4
"""Sliding window of the families that have one: shorter than every test example."""

COMMON: dict[str, Any] = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
                              "num_key_value_heads": 2, "max_position_embeddings": 256, "initializer_range": 0.3}

FAMILY_SETTINGS: dict[str, dict[str, Any]] = {
    "llama": {"attention_bias": True, "mlp_bias": True, "tie_word_embeddings": True},
    "mistral": {"sliding_window": WINDOW, "head_dim": 16},
    "qwen2": {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1},
    "qwen3": {"head_dim": 16, "use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1,
                  "tie_word_embeddings": True},
    "gemma2": {"head_dim": 16, "query_pre_attn_scalar": 24, "sliding_window": WINDOW, "final_logit_softcapping": 5.0,
                   "attn_logit_softcapping": 3.0, "layer_types": ["sliding_attention", "full_attention"]},
    "gemma3_text": {"head_dim": 16, "query_pre_attn_scalar": 24, "sliding_window": WINDOW, "final_logit_softcapping": 5.0,
                        "attn_logit_softcapping": 3.0, "layer_types": ["sliding_attention", "full_attention"]},
    "phi3": {"sliding_window": WINDOW, "pad_token_id": 0},
    "olmo2": {},
    "granite": {"logits_scaling": 4.0, "embedding_multiplier": 3.0, "residual_multiplier": 0.5,
                    "attention_multiplier": 0.4, "attention_bias": True},
    "cohere": {"logit_scale": 0.3, "use_qk_norm": True},
    "smollm3": {"no_rope_layer_interval": 2, "use_sliding_window": True, "sliding_window": WINDOW},
}
"""What each family switches on, on top of COMMON."""

FAMILIES = tuple(FAMILY_SETTINGS)


def family_config(family: str, tokenizer: PreTrainedTokenizerFast, **changes: Any):
    """The tiny config of ``family`` for ``tokenizer``'s vocabulary and special tokens."""
    settings = COMMON | FAMILY_SETTINGS[family] | changes
    settings.setdefault("pad_token_id", tokenizer.pad_token_id)
    return AutoConfig.for_model(family, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                eos_token_id=tokenizer.eos_token_id, **settings)


def build_family_model(family: str, tokenizer: PreTrainedTokenizerFast, seed: int = 0, **changes: Any):
    """A random ``family`` model in float32 and eval mode, eager attention (the reference)."""
    config = family_config(family, tokenizer, **changes)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _perturb_norms(model)
    return model.eval()


def _perturb_norms(model: torch.nn.Module) -> None:
    """Norm weights start at one (or zero, Gemma's 1 + w); random ones make a skipped norm show."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name and parameter.dim() == 1:
                parameter.add_(0.2 * torch.randn(parameter.shape, generator=generator))


def build_family_model_dir(path: str | Path, family: str, tokenizer: PreTrainedTokenizerFast, **changes: Any) -> Path:
    """Save a random ``family`` model and ``tokenizer`` into ``path``; return the directory."""
    path = Path(path)
    model = build_family_model(family, tokenizer, **changes)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(model.generation_config, key, getattr(tokenizer, key))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
