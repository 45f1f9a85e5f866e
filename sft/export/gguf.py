"""`sft export`: write a merged model as one GGUF file (llama.cpp, Ollama, LM Studio).

The file carries the weights (f32, f16, bf16, q8_0, or q4_0 with the embedding and output layer
at q8_0; norms and biases always f32; or llama.cpp's k-quants q4_k_m, q5_k_m, q6_k, written by
its own quantizer where llama-cpp-python is installed: sft.export.quantize), the family's
hyper-parameters as llama.cpp reads them (soft caps, sliding windows, norm epsilons, rope base
and scaling, logit and embedding scales, head sizes), the tokenizer with llama.cpp's name of its
pre-tokenizer, and the chat template, so those tools tokenize, position and prompt as training
did. Tensor names come from gguf-py's own name map. Merge the adapter first (`sft merge`), then
export the merged directory; `--verify` reads the file back with independent readers and compares
it with the model; `--ollama` writes a Modelfile beside it.

Families: llama (Llama 2/3.x, SmolLM2, TinyLlama), mistral, qwen2, qwen3, gemma2, gemma3,
phi3, olmo2, granite, cohere (llama.cpp's command-r), smollm3.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch

from sft.config import ConfigError, StrictArgumentParser
from sft.errors import ModelNotFoundError, run_command
from sft.export.gguf_vocab import add_tokenizer, tokenizer_kind
from sft.export.quantize import K_QUANT_SOURCE, K_QUANTS, llama_cpp_module, quantize
from sft.export.verify import VerificationError
from sft.files import atomic_paths, unwritable_reason
from sft.modeling.models import load_model, load_tokenizer, resolve_model_path

Q = gguf.GGMLQuantizationType
TYPES = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}
FILE_TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
              "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
              "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}
BLOCK_QUANTIZED = {Q.Q8_0, Q.Q4_0}
EMBEDDING_TENSORS = {"token_embd.weight", "output.weight"}
"""Kept at 8 bits in a q4_0 file, as llama.cpp keeps its output tensor at higher precision: with
tied embeddings (SmolLM2) the token embedding is also the output layer."""


@dataclass(frozen=True)
class Family:
    """How llama.cpp runs one Hugging Face ``model_type``."""

    arch: gguf.MODEL_ARCH
    rotary_permute: bool = False
    """llama.cpp's 'normal' rope pairs neighbouring dimensions; HF Llama-style models rotate
    halves: their q/k rows are reordered (the others use llama.cpp's NeoX rope, as HF does)."""
    norm_shift: float = 0.0
    """Gemma's norms multiply by 1 + w; llama.cpp's by w: the file stores w + 1."""


FAMILIES: dict[str, Family] = {
    "llama": Family(gguf.MODEL_ARCH.LLAMA, rotary_permute=True),
    "mistral": Family(gguf.MODEL_ARCH.LLAMA, rotary_permute=True),  # llama.cpp's converter does the same
    "qwen2": Family(gguf.MODEL_ARCH.QWEN2),
    "qwen3": Family(gguf.MODEL_ARCH.QWEN3),
    "gemma2": Family(gguf.MODEL_ARCH.GEMMA2, norm_shift=1.0),
    "gemma3_text": Family(gguf.MODEL_ARCH.GEMMA3, norm_shift=1.0),
    "phi3": Family(gguf.MODEL_ARCH.PHI3),
    "olmo2": Family(gguf.MODEL_ARCH.OLMO2),
    "granite": Family(gguf.MODEL_ARCH.GRANITE, rotary_permute=True),
    "cohere": Family(gguf.MODEL_ARCH.COMMAND_R),
    "smollm3": Family(gguf.MODEL_ARCH.SMOLLM3, rotary_permute=True),
}


def arch_name(config) -> str:
    """llama.cpp's architecture name for ``config`` ('llama', 'qwen2', 'command-r', ...)."""
    return gguf.MODEL_ARCH_NAMES[family_of(config).arch]


def family_of(config) -> Family:
    if config.model_type not in FAMILIES:
        known = ", ".join(sorted(FAMILIES))
        raise ConfigError(f"model type {config.model_type!r} has no GGUF export; exported families: {known}")
    return FAMILIES[config.model_type]


def rotary_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """Reorder q/k rows from Hugging Face's rotate-half rotary layout to GGML's interleaved one."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]) \
        .swapaxes(1, 2).reshape(weight.shape)


def _rope(config) -> dict:
    return getattr(config, "rope_parameters", None) or {"rope_theta": getattr(config, "rope_theta", 10000.0)}


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def llama3_rope_factors(config) -> np.ndarray | None:
    """Llama 3.x's rope scaling as llama.cpp takes it: one frequency divisor per rotary pair
    (the ``rope_freqs`` tensor), computed as llama.cpp's converter computes it."""
    rope = _rope(config)
    if rope.get("rope_type", "default").lower() != "llama3":
        return None
    dim = _head_dim(config)
    base, factor = rope.get("rope_theta", 10000.0), rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_context = rope.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old_context / low, old_context / high
    factors = []
    for freq in 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim)):
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(factors, dtype=np.float32)


def llama_cpp_gaps(config) -> list[str]:
    """What this model computes that llama.cpp's architecture cannot express: the exported file
    then differs from the model (said, not hidden)."""
    gaps = []
    family = family_of(config)
    window = getattr(config, "sliding_window", None)
    uses_window = window and (config.model_type == "mistral" or getattr(config, "use_sliding_window", False))
    if uses_window and family.arch in (gguf.MODEL_ARCH.LLAMA, gguf.MODEL_ARCH.QWEN2, gguf.MODEL_ARCH.QWEN3,
                                       gguf.MODEL_ARCH.SMOLLM3):
        gaps.append(f"llama.cpp's {arch_name(config)} has no sliding window: the file matches the model on "
                    f"contexts up to {window} tokens only")
    if config.model_type in ("gemma2", "gemma3_text") and \
            getattr(config, "query_pre_attn_scalar", _head_dim(config)) != _head_dim(config):
        gaps.append("llama.cpp scales Gemma's attention by 1/sqrt(head_dim), not by query_pre_attn_scalar")
    if config.model_type == "phi3" and config.sliding_window:
        gaps.append(f"llama.cpp's phi3 sliding window gives other logits than transformers' (measured with a window of "
                    f"4): the file matches the model on contexts up to {config.sliding_window} tokens only")
    if config.model_type == "smollm3" and getattr(config, "no_rope_layer_interval", 4) != 4:
        gaps.append("llama.cpp's smollm3 skips rope on every 4th layer, not on every "
                    f"{config.no_rope_layer_interval}th")
    rope_type = _rope(config).get("rope_type", "default")
    if rope_type not in ("default", "llama3", "linear", "yarn"):
        gaps.append(f"rope scaling {rope_type!r} is not exported")
    return gaps


def llama_cpp_config(config):
    """``config`` as llama.cpp runs the exported file: Mistral as Llama, no sliding window where
    llama.cpp's architecture has none (the transformers model of what the file computes)."""
    from transformers import AutoConfig

    settings = config.to_dict()
    arch = family_of(config).arch
    if config.model_type == "mistral":
        settings = {key: value for key, value in settings.items() if key not in ("model_type", "sliding_window")}
        return AutoConfig.for_model("llama", **settings)
    if arch in (gguf.MODEL_ARCH.QWEN2, gguf.MODEL_ARCH.QWEN3, gguf.MODEL_ARCH.SMOLLM3):
        settings.update(use_sliding_window=False, layer_types=["full_attention"] * config.num_hidden_layers)
    return AutoConfig.for_model(settings.pop("model_type"), **settings)


def _add_hyper_parameters(writer: gguf.GGUFWriter, config, name: str, precision: str) -> None:
    """The family's hyper-parameters under llama.cpp's keys (as its convert_hf_to_gguf writes them)."""
    family = family_of(config)
    rope = _rope(config)
    full_rope = rope.get("full_attention", rope)
    writer.add_name(name)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_freq_base(full_rope.get("rope_theta", 10000.0))
    if (local := rope.get("sliding_attention", {}).get("rope_theta")) is not None:
        writer.add_rope_freq_base_swa(local)
    if getattr(config, "rms_norm_eps", None) is not None:
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    if getattr(config, "layer_norm_eps", None) is not None:  # Cohere's LayerNorm
        writer.add_layer_norm_eps(config.layer_norm_eps)
    head_dim = _head_dim(config)
    if getattr(config, "head_dim", None):
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if family.rotary_permute or family.arch == gguf.MODEL_ARCH.PHI3:
        writer.add_rope_dimension_count(head_dim)
    rope_type = full_rope.get("rope_type", "default")
    if rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(full_rope["factor"])
    elif rope_type == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(full_rope["factor"])
        writer.add_rope_scaling_orig_ctx_len(full_rope["original_max_position_embeddings"])
    if family.arch == gguf.MODEL_ARCH.PHI3:
        writer.add_rope_scaling_orig_ctx_len(getattr(config, "original_max_position_embeddings", None)
                                             or config.max_position_embeddings)
        writer.add_sliding_window(config.sliding_window or 0)
    if family.arch in (gguf.MODEL_ARCH.GEMMA2, gguf.MODEL_ARCH.GEMMA3):
        if getattr(config, "attn_logit_softcapping", None) and family.arch == gguf.MODEL_ARCH.GEMMA2:
            writer.add_attn_logit_softcapping(config.attn_logit_softcapping)
        if getattr(config, "final_logit_softcapping", None):
            writer.add_final_logit_softcapping(config.final_logit_softcapping)
        if config.sliding_window:
            writer.add_sliding_window(config.sliding_window)
            writer.add_sliding_window_pattern([kind == "sliding_attention" for kind in config.layer_types])
    if family.arch == gguf.MODEL_ARCH.GRANITE:
        writer.add_attention_scale(config.attention_multiplier)
        writer.add_embedding_scale(config.embedding_multiplier)
        writer.add_residual_scale(config.residual_multiplier)
        writer.add_logit_scale(config.logits_scaling)
    if family.arch == gguf.MODEL_ARCH.COMMAND_R:
        writer.add_logit_scale(config.logit_scale)
        writer.add_rope_scaling_type(gguf.RopeScalingType.NONE)
    writer.add_file_type(FILE_TYPES[precision])


def gguf_tensors(model) -> Iterator[tuple[str, np.ndarray]]:
    """(llama.cpp name, float32 array) of every tensor llama.cpp reads, in the layout it reads."""
    config = model.config
    family = family_of(config)
    names = gguf.get_tensor_name_map(family.arch, config.num_hidden_layers)
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        found = names.get_type_and_name(hf_name, try_suffixes=(".weight", ".bias"))
        if found is None or found[0] not in gguf.MODEL_TENSORS[family.arch]:
            raise ConfigError(f"tensor {hf_name} has no place in llama.cpp's {arch_name(config)} architecture")
        data = tensor.detach().float().numpy()
        if family.rotary_permute and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            data = rotary_permute(data, config.num_attention_heads)
        elif family.rotary_permute and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            data = rotary_permute(data, kv_heads)
        if family.norm_shift and hf_name.endswith("norm.weight"):
            data = data + family.norm_shift
        yield found[1], data
    if (factors := llama3_rope_factors(config)) is not None:
        yield gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", factors


def _tensor_type(name: str, data: np.ndarray, precision: str) -> gguf.GGMLQuantizationType:
    exact = data.ndim != 2 or "_norm." in name  # norms (Cohere's q/k norms are 2-D), biases, rope factors
    kind = Q.F32 if exact else TYPES[precision]
    if kind == Q.Q4_0 and name in EMBEDDING_TENSORS:
        kind = Q.Q8_0
    if kind in BLOCK_QUANTIZED and data.shape[-1] % 32:
        kind = Q.F16  # block types need rows in blocks of 32
    return kind


def check_export(model_dir: Path, out: Path, precision: str) -> None:
    """The one-line errors a bad request gets before any model is loaded."""
    if precision not in TYPES and precision not in K_QUANTS:
        raise ConfigError(f"--precision {precision}: not a GGUF weight type sft writes; choose one of "
                          f"{', '.join(TYPES)} (written by sft) or {', '.join(K_QUANTS)} (by llama.cpp's "
                          f"quantizer, with llama-cpp-python)")
    if precision in K_QUANTS:
        llama_cpp_module(precision)
    if (model_dir / "adapter_config.json").is_file():
        raise ConfigError(f"{model_dir} holds an adapter, not a model: run `sft merge` first and export its output")
    if not model_dir.is_dir():
        raise ModelNotFoundError(f"--model {model_dir}: no such directory; pass the directory `sft merge` wrote")
    check_gguf_out(out)


def check_gguf_out(out: Path) -> None:
    """Refuse a GGUF path that exists or whose directory cannot take a new file."""
    if out.exists():
        raise ConfigError(f"--gguf {out} exists; choose a new file name")
    if problem := unwritable_reason(out.parent):
        raise ConfigError(f"--gguf {out}: cannot write into {out.parent} ({problem}); choose another path")


@contextlib.contextmanager
def gguf_file(out: Path, arch: str) -> Iterator[gguf.GGUFWriter]:
    """A writer for the GGUF file ``out`` of architecture ``arch``: what the block adds (metadata,
    tensors) is written when it ends; on an error, or a kill or a full disk while writing, no file
    is left at ``out``."""
    with atomic_paths([out]) as (temporary,):
        writer = gguf.GGUFWriter(str(temporary), arch)
        try:
            yield writer
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file(progress=False)
        finally:
            writer.close()


def _refuse_unknown_family(model_dir: Path) -> None:
    """An unknown family is refused before the weights load (a damaged config.json is left for the
    model loader to name)."""
    try:
        model_type = json.loads((model_dir / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        return
    family_of(argparse.Namespace(model_type=model_type))


def export_gguf(model_dir: str | Path, out: str | Path, precision: str = "f16",
                log: Callable[[str], None] = lambda line: None) -> Path:
    """Write the merged model in ``model_dir`` as the GGUF file ``out``; nothing is left on failure."""
    model_dir, out = Path(model_dir), Path(out)
    check_export(model_dir, out, precision)
    if precision in K_QUANTS:
        return _export_k_quant(model_dir, out, precision, log)
    _refuse_unknown_family(model_dir)
    model = load_model(resolve_model_path(str(model_dir)), torch.float32, attn_implementation="eager")
    config = model.config
    tokenizer = load_tokenizer(str(model_dir))
    if tokenizer_kind(json.loads(tokenizer.backend_tokenizer.to_str())) is None:
        raise ConfigError(f"{model_dir}: only byte-level BPE tokenizers (GPT-2 style, as SmolLM2's) and "
                          f"SentencePiece BPE tokenizers with byte fallback (Llama style, as TinyLlama's) are exported")
    if len(tokenizer) > config.vocab_size:
        raise ConfigError(f"{model_dir}: the tokenizer has {len(tokenizer)} tokens but the model's embedding only "
                          f"{config.vocab_size} rows; resize the embedding (model.resize_token_embeddings) first")
    if config.model_type == "cohere" and bool(getattr(config, "use_qk_norm", False)) != (config.num_hidden_layers >= 64):
        raise ConfigError(f"{model_dir}: llama.cpp's command-r reads q/k norms exactly when a model has 64 layers or "
                          f"more (Command R+); this one has {config.num_hidden_layers} with use_qk_norm="
                          f"{config.use_qk_norm}, and llama.cpp would refuse the file")
    for gap in llama_cpp_gaps(config):
        warnings.warn(gap, stacklevel=2)
    with gguf_file(out, arch_name(config)) as writer:
        _add_hyper_parameters(writer, config, model_dir.name, precision)
        pre = add_tokenizer(writer, tokenizer, model_dir, config.vocab_size)
        if pre:
            log(f"pre-tokenizer: {pre}")
        for name, data in gguf_tensors(model):
            kind = _tensor_type(name, data, precision)
            writer.add_tensor(name, gguf.quants.quantize(data, kind), raw_dtype=kind)
    return out


def _export_k_quant(model_dir: Path, out: Path, precision: str, log: Callable[[str], None]) -> Path:
    """The f16 file in a scratch directory beside ``out``, rewritten by llama.cpp's quantizer into
    ``out``; the f16 file is removed, also on failure, and ``out`` appears only whole."""
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as scratch:
        source = export_gguf(model_dir, Path(scratch) / f"model-{K_QUANT_SOURCE}.gguf", K_QUANT_SOURCE, log)
        log(f"quantizing to {precision} with llama.cpp")
        with atomic_paths([out]) as (temporary,):
            for warning in quantize(source, temporary, precision):
                log(f"llama.cpp: {warning} (k-quant blocks take rows of a multiple of 256)")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = StrictArgumentParser(prog="sft export", description=__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", required=True, metavar="FILE", help="GGUF file to write")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="merged model directory (from sft merge)")
    source.add_argument("--adapter", help="a run's adapter (output directory or checkpoint-N): written as a GGUF "
                                          "LoRA adapter for llama.cpp's --lora / Ollama's ADAPTER, beside the "
                                          "base model's GGUF")
    parser.add_argument("--base-model", help="with --adapter: the base model (default: the one the adapter names)")
    parser.add_argument("--precision", default="f16",
                        help=f"weight type: {', '.join(TYPES)}, or with llama-cpp-python installed "
                             f"{', '.join(K_QUANTS)} (default: f16)")
    parser.add_argument("--verify", action=argparse.BooleanOptionalAction, default=False,
                        help="read the file back and compare tokens, logits and greedy replies with the model "
                             "(the bundled model's demo command passes it)")
    parser.add_argument("--ollama", metavar="NAME", nargs="?", const="", default=None,
                        help="also write a Modelfile beside the GGUF (NAME: the Ollama model name to print; "
                             "default: the file's stem)")
    parser.add_argument("--system-prompt", help="the run's system prompt, written as the Modelfile's SYSTEM")
    args = parser.parse_args(argv)

    if args.adapter is not None:
        if args.verify or args.ollama is not None:
            parser.error("--verify and --ollama apply to --model; a LoRA adapter is checked by its tests")
        from sft.export.gguf_lora import export_lora_gguf

        return run_command(lambda: print(f"wrote {export_lora_gguf(args.adapter, args.gguf, args.base_model)}"))

    def command() -> None:
        out = Path(args.gguf)
        modelfile_path = out.parent / "Modelfile"
        if args.ollama is not None and modelfile_path.exists():
            raise ConfigError(f"--ollama: {modelfile_path} exists; export into another directory")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            path = export_gguf(args.model, out, args.precision, log=print)
        for warning in caught:
            print(f"warning: {warning.message}")
        print(f"wrote {path}")
        try:
            _after_export(args, path, modelfile_path)
        except BaseException as exc:
            path.unlink(missing_ok=True)  # a file that failed its checks is not left for use
            if isinstance(exc, ConfigError | VerificationError):
                raise type(exc)(f"{exc} ({path} removed)") from None
            raise

    return run_command(command)


def _after_export(args: argparse.Namespace, path: Path, modelfile_path: Path) -> None:
    from transformers import GenerationConfig

    from sft.export.ollama import describe, modelfile, recognize_layout
    from sft.export.verify import verify_gguf
    from sft.files import atomic_write_text

    if args.verify:
        verify_gguf(args.model, path, args.precision, log=print)
        print("verify: passed")
    if args.ollama is not None:
        tokenizer = load_tokenizer(str(args.model))
        try:
            generation = GenerationConfig.from_pretrained(args.model)
        except OSError:
            generation = None
        layout = recognize_layout(tokenizer)
        atomic_write_text(modelfile_path, modelfile(path, tokenizer, generation, args.system_prompt, layout))
        name = args.ollama or path.stem
        print(f"wrote {modelfile_path} ({describe(layout)}); next:\n  ollama create {name} -f {modelfile_path}\n  ollama run {name}")


if __name__ == "__main__":
    raise SystemExit(main())
