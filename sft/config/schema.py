"""Hyper-parameters of a fine-tuning run.

Every knob lives in one of the dataclasses below. A run's configuration is built in three layers,
later ones winning: the defaults here, a YAML preset (``--config configs/NAME.yaml``, one section
per group: ``model``, ``lora``, ``data``, ``training``, ``eval``), and command-line flags named
after the fields (``--max-steps 2``, ``--learning-rate 1e-4``). Field names are unique across
groups so that each flag maps to exactly one field. Everything is validated here, before any
model is loaded, so a typo costs a second rather than a model download.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sft.errors import ConfigError
from sft.files import atomic_write_text

ATTENTION_IMPLEMENTATIONS = ("auto", "varlen_sdpa", "sdpa", "eager", "flash_attention_2")

RUN_CONFIG_FILE = "sft_config.yaml"
"""Name of the full configuration that training saves beside its adapter."""

MAX_SEED = 2**32 - 1
"""The seed goes to numpy too, which takes 0 to 2**32 - 1."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass
class ModelConfig:
    model: str = "smollm2-135m-instruct"
    """Bundled model name (``smollm2-135m-instruct``, works offline), a local directory, or a
    Hugging Face Hub id such as ``TinyLlama/TinyLlama-1.1B-Chat-v1.0``."""
    dtype: str = "auto"
    """``auto`` picks per device (float32 on CPU and MPS, bfloat16 on CUDA where supported,
    else float16 mixed precision); or one of float32, bfloat16, float16."""
    attn_implementation: str = "auto"
    """Attention kernel: auto (FlashAttention varlen on CUDA when flash-attn is installed, else
    varlen_sdpa: one SDPA call per packed example), varlen_sdpa, sdpa, eager or flash_attention_2."""
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
    lora_r: int = 16
    """Rank of the LoRA update matrices."""
    lora_alpha: int = 32
    """LoRA scaling numerator; the update is scaled by lora_alpha / lora_r."""
    lora_dropout: float = 0.05
    """Dropout on the LoRA input."""
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj",
                                 "gate_proj", "up_proj", "down_proj"])
    """Linear layers that get adapters (all attention and MLP projections of a Llama block)."""

    def __post_init__(self) -> None:
        _require(self.lora_r > 0, f"lora_r: must be > 0, got {self.lora_r}")
        _require(self.lora_alpha > 0, f"lora_alpha: must be > 0, got {self.lora_alpha}")
        _require(0.0 <= self.lora_dropout < 1.0,
                 f"lora_dropout: must be in [0, 1), got {self.lora_dropout}")
        _require(len(self.lora_target_modules) > 0, "lora_target_modules: must name at least one module")
        _require("lm_head" not in self.lora_target_modules,
                 "lora_target_modules: lm_head cannot take an adapter here (the loss runs the head's "
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
        _require(self.train_on in ("all_assistant_turns", "last_assistant_turn"),
                 f"train_on: expected all_assistant_turns or last_assistant_turn, got {self.train_on!r}")


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
    """Trade about a third of the speed for activation memory."""
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


GROUPS: dict[str, type] = {
    "model": ModelConfig,
    "lora": LoraSettings,
    "data": DataConfig,
    "training": TrainingConfig,
    "eval": EvalConfig,
}


@dataclass
class SFTConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {group: dataclasses.asdict(getattr(self, group)) for group in GROUPS}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, self.to_yaml())


def saved_run_config(adapter_dir: str | Path) -> Path | None:
    """The configuration a training run saved beside its adapter, or beside the run holding a
    checkpoint-N; None for an adapter trained elsewhere."""
    for candidate in (Path(adapter_dir) / RUN_CONFIG_FILE, Path(adapter_dir).parent / RUN_CONFIG_FILE):
        if candidate.is_file():
            return candidate
    return None


def _field_owner() -> dict[str, tuple[str, dataclasses.Field]]:
    owners: dict[str, tuple[str, dataclasses.Field]] = {}
    for group, cls in GROUPS.items():
        for f in dataclasses.fields(cls):
            assert f.name not in owners, f"field {f.name} is defined twice"
            owners[f.name] = (group, f)
    return owners


FIELDS = _field_owner()


def _resolved_type(cls: type, name: str) -> Any:
    return typing.get_type_hints(cls)[name]


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check a YAML or CLI value against a field's annotation, converting ints to floats."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, where)
    if origin is list:
        (inner,) = typing.get_args(annotation)
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, inner, where) for v in value]
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in {"true", "false", "1", "0", "yes", "no"}:
            return value.lower() in {"true", "1", "yes"}
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if annotation is float:
        try:
            number = float(value) if isinstance(value, (str, int, float)) and not isinstance(value, bool) else None
        except (ValueError, OverflowError):
            number = None
        if number is None:
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(number):  # inf and nan parse, but no field means them (inf epochs never end)
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return number
    if annotation is int:
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    raise AssertionError(f"unsupported annotation {annotation}")


def _did_you_mean(name: str, candidates: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(candidates), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping: PyYAML would keep the last
    without a word, so a preset edited in two places trains with whichever came later."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in first_line:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice (first on line {first_line[key]}); keep one",
                    key_node.start_mark)
            first_line[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def _load_yaml(path: Path) -> Any:
    """The YAML document in ``path``, or a one-line error naming the file, the line and what to do."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}: line {line}: byte 0x{data[exc.start]:02x} is not UTF-8; save the file as "
                          f"UTF-8") from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None


def _read_yaml(path: str | Path) -> dict[str, dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    loaded = _load_yaml(path) or {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected sections {', '.join(GROUPS)} at the top level")
    values: dict[str, dict[str, Any]] = {}
    for group, section in loaded.items():
        if group not in GROUPS:
            raise ConfigError(f"{path}: unknown section {group!r}{_did_you_mean(str(group), GROUPS)}; "
                              f"sections are {', '.join(GROUPS)}")
        if not isinstance(section, dict):
            raise ConfigError(f"{path}: section {group!r} must be a mapping")
        for key, value in section.items():
            owner = FIELDS.get(key)
            if owner is None or owner[0] != group:
                names = [f.name for f in dataclasses.fields(GROUPS[group])]
                hint = f" (it belongs in section {owner[0]!r})" if owner else _did_you_mean(str(key), names)
                raise ConfigError(f"{path}: unknown key {group}.{key}{hint}")
            values.setdefault(group, {})[key] = value
    return values


def build_config(config_path: str | Path | None = None,
                 overrides: dict[str, Any] | None = None) -> SFTConfig:
    """Defaults, then the YAML file, then overrides (flat field names), validated."""
    values = _read_yaml(config_path) if config_path else {}
    for key, value in (overrides or {}).items():
        if key not in FIELDS:
            raise ConfigError(f"unknown option {key!r}{_did_you_mean(key, FIELDS)}")
        values.setdefault(FIELDS[key][0], {})[key] = value
    groups = {}
    for group, cls in GROUPS.items():
        kwargs = {key: _coerce(value, _resolved_type(cls, key), f"{group}.{key}")
                  for key, value in values.get(group, {}).items()}
        try:
            groups[group] = cls(**kwargs)
        except ConfigError as exc:
            raise ConfigError(f"{group}.{exc}") from None
    return SFTConfig(**groups)


class StrictArgumentParser(argparse.ArgumentParser):
    """An argument parser that takes no abbreviations (``--learning-rat 3`` must not quietly set
    the learning rate) and answers an unknown flag with the closest known one."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def parse_args(self, args: typing.Sequence[str] | None = None,  # type: ignore[override]
                   namespace: argparse.Namespace | None = None) -> argparse.Namespace:
        parsed, unknown = self.parse_known_args(args, namespace)
        if unknown:
            known = [flag for action in self._actions for flag in action.option_strings]
            flag = unknown[0].split("=")[0]
            self.error(f"unrecognized argument {unknown[0]!r}{_did_you_mean(flag, known)}")
        return parsed

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n(see {self.prog} --help)\n")


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--config`` and one flag per field; flags left out do not override the YAML."""
    parser.add_argument("--config", metavar="YAML", help="preset to start from (configs/*.yaml)")
    docs = _field_docs()
    for group, cls in GROUPS.items():
        section = parser.add_argument_group(f"{group} options")
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            annotation = _resolved_type(cls, f.name)
            metavar = "A,B,..." if typing.get_origin(annotation) is list else None
            section.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, default=argparse.SUPPRESS,
                                 metavar=metavar,
                                 help=f"{docs.get(f.name, '')} (default: {default})")


def config_from_args(args: argparse.Namespace) -> SFTConfig:
    overrides = {name: getattr(args, name) for name in FIELDS if hasattr(args, name)}
    return build_config(args.config, overrides)


def _field_docs() -> dict[str, str]:
    """The docstring under each field, so --help and the code say the same thing."""
    import ast
    import inspect

    docs: dict[str, str] = {}
    for cls in GROUPS.values():
        body = ast.parse(inspect.getsource(cls)).body[0].body
        for node, nxt in zip(body, body[1:]):
            if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) \
                    and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
                docs[node.target.id] = " ".join(nxt.value.value.split()).replace("%", "%%")
    return docs
