"""The sections of a run's configuration: one dataclass each, with docstrings and validation.

A recipe's configuration is a dataclass of sections (SFTConfig: model, lora, data, training,
eval; DPOConfig adds dpo). Field names are unique across the sections of a configuration, so
each command-line flag (``--max-steps``, ``--beta``) maps to exactly one field. Everything is
validated in ``__post_init__``, before any model is loaded, so a typo costs a second rather than
a model download.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sft.config.dpo import DPOSettings
from sft.config.grpo import GRPOSettings
from sft.errors import ConfigError
from sft.files import atomic_write_text

ATTENTION_IMPLEMENTATIONS = ("auto", "varlen_sdpa", "sdpa", "eager", "flash_attention_2")

RUN_CONFIG_FILE = "sft_config.yaml"
"""Name of the full configuration that training saves beside its adapter."""

MAX_SEED = 2**32 - 1

MAX_LORA_SCALE = 1024
"""The largest LoRA scale, alpha / r, a run may use. Common ones are 0.5 to 16; far beyond, the
update's gradients overflow to inf at the first step, every step is clipped to nothing, and the
adapter never trains while the run reports success."""

MAX_EPOCHS = 100_000
"""More passes over the data than any run makes; beyond, the step count is not a number."""
"""The seed goes to numpy too, which takes 0 to 2**32 - 1."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


TRAIN_ON = ("all_assistant_turns", "last_assistant_turn")
"""The values of data.train_on: every answer of a conversation trained, or only the last."""


ALL_LINEAR = "all-linear"
"""lora.target_modules: every linear layer of the decoder blocks (PEFT's own name for it)."""


@dataclass
class ModelConfig:
    model: str = "smollm2-135m-instruct"
    """Bundled model name (``smollm2-135m-instruct``, works offline), a local directory, or a
    Hugging Face Hub id such as ``TinyLlama/TinyLlama-1.1B-Chat-v1.0``."""
    dtype: str = "auto"
    """``auto`` picks per device (float32 on CPU and MPS, bfloat16 on CUDA where supported,
    else float16 mixed precision); or one of float32, bfloat16, float16."""
    attn_implementation: str = "auto"
    """Attention kernel: auto (flash-attn's varlen kernel on CUDA when installed, else
    varlen_sdpa: PyTorch's varlen FlashAttention on CUDA in bf16/fp16, one block-diagonal SDPA
    call on MPS and CUDA float32, one SDPA call per packed example on CPU), varlen_sdpa, sdpa,
    eager or flash_attention_2."""
    trust_remote_code: bool = False
    """Run code shipped with a Hub model. Off unless you trust the model's author."""
    load_in_4bit: bool = False
    """QLoRA: hold the frozen base weights in 4-bit NF4 (bitsandbytes, double quantization),
    computing in bfloat16 or float16. CUDA only; needs ``pip install -e '.[cuda]'``."""

    def __post_init__(self) -> None:
        _require(bool(self.model.strip()), "model: must name a model")
        _require(self.dtype in {"auto", "float32", "bfloat16", "float16"},
                 f"dtype: expected auto, float32, bfloat16 or float16, got {self.dtype!r}")
        _require(self.attn_implementation in ATTENTION_IMPLEMENTATIONS,
                 f"attn_implementation: expected one of {', '.join(ATTENTION_IMPLEMENTATIONS)}, "
                 f"got {self.attn_implementation!r}")


@dataclass
class LoraSettings:
    FLAG_PREFIX: typing.ClassVar[str] = "lora_"
    """The section's flags and flat names are lora_r, lora_alpha, ... (``--lora-r``): a bare
    ``--r`` or ``--alpha`` would say nothing. In YAML both ``lora: {r: 16}`` and the flat
    ``lora: {lora_r: 16}`` (presets and saved runs of earlier versions) are read."""

    r: int = 16
    """Rank of the LoRA update matrices."""
    alpha: int = 32
    """LoRA scaling numerator; the update is scaled by alpha / r."""
    dropout: float = 0.05
    """Dropout on the LoRA input."""
    target_modules: list[str] = field(default_factory=lambda: [ALL_LINEAR])
    """Linear layers that get adapters: all-linear (PEFT's: every linear layer of the decoder
    blocks, whatever the family calls them: q/k/v/o and gate/up/down in Llama, Qwen, Gemma,
    Mistral; qkv_proj and gate_up_proj in Phi-3), or the layers' names (q_proj,v_proj)."""
    fused: bool = True
    """Run the adapted layers that read one input (q, k, v; gate, up) as one function (one base
    matmul, one dropout mask, one adapter matmul), the SwiGLU activation inside the down
    projection, and each RMSNorm as one function. Same adapters and results; false runs PEFT's
    layers one by one and the model's own MLP and norms."""

    def __post_init__(self) -> None:
        _require(self.r > 0, f"r: must be > 0, got {self.r}")
        _require(self.alpha > 0, f"alpha: must be > 0, got {self.alpha}")
        _require(self.alpha / self.r <= MAX_LORA_SCALE,
                 f"alpha: {self.alpha} with r {self.r} scales the update by {self.alpha / self.r:.3g}, more than "
                 f"{MAX_LORA_SCALE}: its gradients would overflow and it would never train; common alphas are 1 to "
                 f"4 times r")
        _require(0.0 <= self.dropout < 1.0, f"dropout: must be in [0, 1), got {self.dropout}")
        _require(len(self.target_modules) > 0, "target_modules: must name at least one module")
        _require(ALL_LINEAR not in self.target_modules or len(self.target_modules) == 1,
                 f"target_modules: {ALL_LINEAR} already names every linear layer; give it alone or list names")
        _require("lm_head" not in self.target_modules,
                 "target_modules: lm_head cannot take an adapter here (the loss runs the head's "
                 "base weight on answer tokens only)")


@dataclass
class DataConfig:
    train_file: str = "data/processed/sft_train.jsonl"
    """Prepared training records (written by scripts/prepare_sft_data.py)."""
    val_file: str = "data/processed/sft_val.jsonl"
    """Prepared validation records."""
    max_seq_length: int = 512
    """Prompt + response tokens per example; longer examples lose the end of their response."""
    packing: bool = True
    """Concatenate each micro-batch into one row without padding (attention stays within each
    example); false pads every example to the longest of its batch."""
    system_prompt: str | None = None
    """System message of every conversation, in training, evaluation and chat alike. None sends
    no system message, which leaves it to the chat template: SmolLM2's inserts "You are a helpful
    AI assistant named SmolLM, trained by Hugging Face", TinyLlama's adds none. A conversation
    with its own system turn keeps that one."""
    train_on: str = "all_assistant_turns"
    """Which answers of a conversation are trained: all_assistant_turns (each with its end-of-turn
    token; system and user turns are masked) or last_assistant_turn (earlier answers are context
    only). Check with `sft inspect`."""

    def __post_init__(self) -> None:
        _require(self.max_seq_length >= 8, f"max_seq_length: must be >= 8, got {self.max_seq_length}")
        _require(self.train_on in TRAIN_ON, f"train_on: expected {' or '.join(TRAIN_ON)}, got {self.train_on!r}")


@dataclass
class TrainingConfig:
    output_dir: str = "models/sft_output"
    """Where adapters, checkpoints, trainer_state.json and the evaluation report go."""
    device: str = "auto"
    """auto picks cuda, then mps, then cpu; or name one."""
    seed: int = 42
    """Seeds weights of the adapters, data order and dropout."""
    num_train_epochs: float = 1.0
    """Passes over the training set (ignored when max_steps > 0)."""
    max_steps: int = -1
    """Optimizer steps to run; -1 means use num_train_epochs."""
    batch_size: int = 4
    """Examples per device per micro-batch."""
    eval_batch_size: int = 8
    """Examples per device per evaluation batch."""
    gradient_accumulation_steps: int = 4
    """Micro-batches per optimizer step; the loss is averaged over all their supervised tokens."""
    learning_rate: float = 2e-4
    """Peak learning rate of the adapters."""
    lr_scheduler_type: str = "cosine"
    """Schedule after warm-up: cosine, linear or constant."""
    warmup_ratio: float = 0.03
    """Fraction of the steps spent warming up linearly from 0."""
    weight_decay: float = 0.0
    """AdamW weight decay on the adapters."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm."""
    logging_steps: int = 10
    """Log the training loss every N optimizer steps."""
    eval_steps: int = 100
    """Compute the validation loss every N optimizer steps (and before the first)."""
    save_steps: int = 100
    """Write checkpoint-N every N optimizer steps."""
    save_total_limit: int = 3
    """Keep at most this many checkpoints."""
    gradient_checkpointing: bool = False
    """Trade speed for activation memory (its measured cost: docs/performance.md)."""
    report_to: str = "none"
    """Also log to: none or tensorboard (needs `pip install tensorboard`; logs under output_dir/runs/)."""
    group_by_length: bool = False
    """Batch examples of similar length together so less compute goes to padding; only useful
    with packing off (packed batches have no padding)."""

    def __post_init__(self) -> None:
        _require(self.device in {"auto", "cpu", "mps", "cuda"},
                 f"device: expected auto, cpu, mps or cuda, got {self.device!r}")
        _require(0 <= self.seed <= MAX_SEED, f"seed: must be between 0 and {MAX_SEED}, got {self.seed}")
        _require(self.learning_rate > 0, f"learning_rate: must be > 0, got {self.learning_rate}")
        _require(self.max_steps > 0 or self.num_train_epochs > 0,
                 "max_steps or num_train_epochs: one of them must be > 0")
        _require(self.num_train_epochs <= MAX_EPOCHS,
                 f"num_train_epochs: must be at most {MAX_EPOCHS}, got {self.num_train_epochs:g} (use max_steps for "
                 f"a run of a given length)")
        for name in ("batch_size", "eval_batch_size", "gradient_accumulation_steps",
                     "logging_steps", "eval_steps", "save_steps", "save_total_limit"):
            value = getattr(self, name)
            _require(value > 0, f"{name}: must be > 0, got {value}")
        _require(0.0 <= self.warmup_ratio < 1.0, f"warmup_ratio: must be in [0, 1), got {self.warmup_ratio}")
        _require(self.lr_scheduler_type in {"cosine", "linear", "constant", "constant_with_warmup"},
                 f"lr_scheduler_type: expected cosine, linear, constant or constant_with_warmup, "
                 f"got {self.lr_scheduler_type!r}")
        _require(self.weight_decay >= 0, f"weight_decay: must be >= 0, got {self.weight_decay}")
        _require(self.max_grad_norm > 0, f"max_grad_norm: must be > 0, got {self.max_grad_norm}")
        _require(self.report_to in {"none", "tensorboard"},
                 f"report_to: expected none or tensorboard, got {self.report_to!r}")


@dataclass
class EvalConfig:
    num_generations: int = 5
    """Held-out prompts answered by base and adapter side by side."""
    max_new_tokens: int = 128
    """Longest generated answer."""
    max_eval_examples: int = 0
    """Validation records used for loss and perplexity; 0 means all."""

    def __post_init__(self) -> None:
        _require(self.num_generations >= 0, f"num_generations: must be >= 0, got {self.num_generations}")
        _require(self.max_new_tokens > 0, f"max_new_tokens: must be > 0, got {self.max_new_tokens}")
        _require(self.max_eval_examples >= 0, f"max_eval_examples: must be >= 0, got {self.max_eval_examples}")


@dataclass
class SFTConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @classmethod
    def sections(cls) -> dict[str, type]:
        """Section name -> its dataclass, in order: the YAML's top-level keys."""
        return {f.name: typing.get_type_hints(cls)[f.name] for f in dataclasses.fields(cls)}

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {group: dataclasses.asdict(getattr(self, group)) for group in self.sections()}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, self.to_yaml())


@dataclass
class DPOConfig(SFTConfig):
    """A preference-training run: the SFT sections plus ``dpo``."""

    dpo: DPOSettings = field(default_factory=DPOSettings)


@dataclass
class GRPOConfig(SFTConfig):
    """An online reinforcement-learning run (GRPO): the SFT sections plus ``grpo``."""

    grpo: GRPOSettings = field(default_factory=GRPOSettings)


CONFIG_CLASSES: tuple[type[SFTConfig], ...] = (SFTConfig, DPOConfig, GRPOConfig)
"""Every kind of run configuration; a saved one is read back as the kind whose sections it has."""
