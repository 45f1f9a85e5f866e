"""`sft export --gguf`: write a merged Llama-architecture model as one GGUF file.

GGUF is the format llama.cpp, Ollama and LM Studio run. The file carries the weights (f32, f16,
q8_0, or q4_0 with the embedding and output layer at q8_0; norms always f32), the model's
hyper-parameters, its tokenizer and its chat template, so those tools render prompts as training
did. Two tokenizer kinds are written: byte-level BPE (SmolLM2, GPT-2 style) and SentencePiece
BPE with byte fallback (TinyLlama, Llama 2 style), the latter as llama.cpp's converter does, with
scores that reproduce the merge order. Merge the adapter first (`sft merge`), then export the
merged directory.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import gguf
import numpy as np
import torch

from sft.config import ConfigError, StrictArgumentParser
from sft.errors import ModelNotFoundError, run_command
from sft.files import atomic_paths, unwritable_reason
from sft.modeling.models import load_model, load_tokenizer, resolve_model_path

TYPES = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
         "q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}
FILE_TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
              "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}
BLOCK_QUANTIZED = {gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_0}
EMBEDDING_TENSORS = {"model.embed_tokens.weight", "lm_head.weight"}
"""Kept at 8 bits in a q4_0 file, as llama.cpp keeps its output tensor at higher precision: with
tied embeddings (SmolLM2) the token embedding is also the output layer."""
LAYER_TENSORS = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def _rotary_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """Reorder q/k rows from Hugging Face's rotate-half rotary layout to GGML's interleaved one."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]) \
        .swapaxes(1, 2).reshape(weight.shape)


def _gguf_name(hf_name: str) -> str:
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":
        return "output.weight"
    parts = hf_name.split(".")  # model.layers.{i}.{module...}.weight (or .bias: attention_bias, mlp_bias)
    module = ".".join(parts[3:-1])
    if parts[:2] != ["model", "layers"] or module not in LAYER_TENSORS or parts[-1] not in ("weight", "bias"):
        raise ConfigError(f"tensor {hf_name} has no GGUF name: only the Llama architecture is exported")
    return f"blk.{parts[2]}.{LAYER_TENSORS[module]}.{parts[-1]}"


def _tokenizer_kind(backend: dict) -> str | None:
    """gpt2 (byte-level BPE), llama (SentencePiece BPE with byte fallback), or None."""
    model = backend["model"]
    if model["type"] != "BPE":
        return None
    if "ByteLevel" in json.dumps(backend.get("pre_tokenizer")):
        return "gpt2"
    if model.get("byte_fallback") and any("\u2581" in token for token in model["vocab"]):
        return "llama"
    return None


def _adds_space_prefix(backend: dict) -> bool:
    """Whether the tokenizer prepends a space to the text: Metaspace's prepend_scheme in newer
    tokenizer.json files, a Prepend normalizer in older ones (TinyLlama's)."""
    text = json.dumps([backend.get("normalizer"), backend.get("pre_tokenizer")], ensure_ascii=False)
    pre = backend.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre])
    schemes = [step.get("prepend_scheme", "always" if step.get("add_prefix_space", True) else "never")
               for step in steps if step and step.get("type") == "Metaspace"]
    return any(scheme in ("first", "always") for scheme in schemes) or '"Prepend"' in text


def _sentencepiece_scores(tokens: list[str], merges: list) -> list[float]:
    """llama.cpp's SentencePiece tokenizer merges the adjacent pair whose joined token has the
    highest score; Hugging Face's BPE applies the merge of lowest rank. A token made by merge
    rank r scores -r, so both pick the same merges; the rest (characters, bytes, special
    tokens, which no merge makes) score below every merge."""
    rank_of: dict[str, int] = {}
    for rank, merge in enumerate(merges):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        rank_of.setdefault(left + right, rank)
    floor = -float(len(merges))
    return [-float(rank_of[token]) if token in rank_of else floor - index for index, token in enumerate(tokens)]


def _add_tokenizer(writer: gguf.GGUFWriter, tokenizer, backend: dict, kind: str, rows: int) -> None:
    """The tokenizer, padded to the embedding's ``rows`` with unused [PADi] tokens (as llama.cpp's
    converter does), since llama.cpp wants one token per row."""
    vocab = len(tokenizer)
    tokens = tokenizer.convert_ids_to_tokens(list(range(vocab)))
    special = set(tokenizer.all_special_ids)
    added = {token.content for token in tokenizer.added_tokens_decoder.values()}
    merges = backend["model"]["merges"]
    types = []
    for index, token in enumerate(tokens):
        if index == tokenizer.unk_token_id:
            types.append(gguf.TokenType.UNKNOWN)
        elif index in special:
            types.append(gguf.TokenType.CONTROL)
        elif kind == "llama" and re.fullmatch(r"<0x[0-9A-F]{2}>", token):
            types.append(gguf.TokenType.BYTE)
        elif token in added:
            types.append(gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    tokens += [f"[PAD{index}]" for index in range(vocab, rows)]
    types += [gguf.TokenType.UNUSED] * (rows - vocab)
    writer.add_tokenizer_model(kind)
    if kind == "gpt2":
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    else:
        # As llama.cpp's converter writes a SentencePiece vocabulary: scores, no merges.
        writer.add_token_list(tokens)
        writer.add_token_scores(_sentencepiece_scores(tokens[:vocab], merges) + [-1000.0] * (rows - vocab))
        writer.add_add_space_prefix(_adds_space_prefix(backend))
    writer.add_token_types(types)
    for token_id, add in ((tokenizer.bos_token_id, writer.add_bos_token_id),
                          (tokenizer.eos_token_id, writer.add_eos_token_id),
                          (tokenizer.pad_token_id, writer.add_pad_token_id),
                          (tokenizer.unk_token_id, writer.add_unk_token_id)):
        if token_id is not None:
            add(token_id)
    probe = tokenizer("a").input_ids
    writer.add_add_bos_token(bool(probe) and probe[0] == tokenizer.bos_token_id)
    writer.add_add_eos_token(bool(probe) and probe[-1] == tokenizer.eos_token_id)


def export_gguf(model_dir: str | Path, out: str | Path, precision: str = "f16") -> Path:
    model_dir, out = Path(model_dir), Path(out)
    if (model_dir / "adapter_config.json").is_file():
        raise ConfigError(f"{model_dir} holds an adapter, not a model: run `sft merge` first and export its output")
    if not model_dir.is_dir():
        raise ModelNotFoundError(f"--model {model_dir}: no such directory; pass the directory `sft merge` wrote")
    if out.exists():
        raise ConfigError(f"--gguf {out} exists; choose a new file name")
    problem = unwritable_reason(out.parent)
    if problem:
        raise ConfigError(f"--gguf {out}: cannot write into {out.parent} ({problem}); choose another path")
    model = load_model(resolve_model_path(str(model_dir)), torch.float32)
    config = model.config
    if config.model_type != "llama":
        raise ConfigError(f"{model_dir}: model type {config.model_type!r}; only llama is exported")
    tokenizer = load_tokenizer(str(model_dir))
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    tokenizer_kind = _tokenizer_kind(backend)
    if tokenizer_kind is None:
        raise ConfigError(f"{model_dir}: only byte-level BPE tokenizers (GPT-2 style, as SmolLM2's) and "
                          f"SentencePiece BPE tokenizers with byte fallback (Llama style, as TinyLlama's) are exported")
    if len(tokenizer) > config.vocab_size:
        raise ConfigError(f"{model_dir}: the tokenizer has {len(tokenizer)} tokens but the model's embedding only "
                          f"{config.vocab_size} rows; resize the embedding (model.resize_token_embeddings) first")

    with atomic_paths([out]) as (temporary,):  # a full disk or a kill leaves no half-written file
        writer = gguf.GGUFWriter(str(temporary), "llama")
        try:
            _write_model(writer, model, tokenizer, backend, tokenizer_kind, model_dir.name, precision)
        finally:
            writer.close()
    return out


def _write_model(writer: gguf.GGUFWriter, model, tokenizer, backend: dict, tokenizer_kind: str, model_name: str,
                 precision: str) -> None:
    """The hyper-parameters, tokenizer and tensors of ``model`` into ``writer``'s file."""
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_name(model_name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_rope_dimension_count(head_dim)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"] if getattr(config, "rope_parameters", None)
                              else config.rope_theta)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(FILE_TYPES[precision])

    _add_tokenizer(writer, tokenizer, backend, tokenizer_kind, config.vocab_size)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)

    tied = config.tie_word_embeddings
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and tied:
            continue
        data = tensor.numpy()
        if name.endswith(("q_proj.weight", "q_proj.bias")):  # a bias follows its rows, as llama.cpp's converter does
            data = _rotary_permute(data, config.num_attention_heads)
        elif name.endswith(("k_proj.weight", "k_proj.bias")):
            data = _rotary_permute(data, config.num_key_value_heads)
        kind = TYPES[precision] if data.ndim == 2 else gguf.GGMLQuantizationType.F32
        if kind == gguf.GGMLQuantizationType.Q4_0 and name in EMBEDDING_TENSORS:
            kind = gguf.GGMLQuantizationType.Q8_0
        if kind in BLOCK_QUANTIZED and data.shape[-1] % 32:
            kind = gguf.GGMLQuantizationType.F16  # block types need rows in blocks of 32
        quantized = gguf.quants.quantize(data.astype(np.float32), kind)
        writer.add_tensor(_gguf_name(name), quantized, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=True)


def main(argv: list[str] | None = None) -> int:
    parser = StrictArgumentParser(prog="sft export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", required=True, metavar="FILE", help="GGUF file to write")
    parser.add_argument("--model", required=True, help="merged model directory (from sft merge)")
    parser.add_argument("--precision", choices=sorted(TYPES), default="f16", help="weight type (default: f16)")
    args = parser.parse_args(argv)
    return run_command(lambda: print(f"wrote {export_gguf(args.model, args.gguf, args.precision)}"))


if __name__ == "__main__":
    raise SystemExit(main())
