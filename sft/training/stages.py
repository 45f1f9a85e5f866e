"""The stages every training recipe is made of, in the order a recipe runs them.

    with setup_runtime(config) as runtime:               device, precision, processes, seed
    checkpoint = prepare_output_dir(config, runtime, resume, overwrite)   locks the folder for the run
    tokenizer = load_run_tokenizer(config, runtime)
    model = load_lora_model(config, runtime)
    save_run_files(config, runtime, reports)
    result = run_guarded(trainer, checkpoint, config, runtime)
    finish(trainer, result, runtime)

The recipes' one skeleton (sft.recipes.skeleton) calls these in this order, each recipe (sft,
dpo, grpo) reading its data and building its trainer; everything they share (what is validated before a model loads, what may be deleted, how a
resume is checked, how an interrupt or an out-of-memory error ends) is written once, here.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from peft import LoraConfig, PeftModel, prepare_model_for_kbit_training
from safetensors import SafetensorError
from transformers import PreTrainedTokenizerBase, Trainer, TrainingArguments, set_seed
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from sft.config import RUN_CONFIG_FILE, LoraSettings, SFTConfig, did_you_mean
from sft.config.sections import ALL_LINEAR
from sft.data.templates import ensure_chat_template
from sft.errors import ConfigError, ResourceError, TrainingInterrupted, describe_os_error
from sft.files import atomic_write_text, unwritable_reason
from sft.modeling.attention import resolve_attention
from sft.modeling.devices import (
    DevicePolicy,
    describe_precision,
    device_policy,
    keep_freed_cpu_memory,
)
from sft.modeling.fusion import fuse, fused_group_counts
from sft.modeling.lora import add_lora
from sft.modeling.models import check_4bit_supported, load_config, load_model, load_tokenizer, resolve_model_path
from sft.outputs import MANIFEST_FILE, Manifest, remove_stale_staging, writer_lock
from sft.training.checkpoints import (
    CHECKPOINT_NAME,
    RUN_FILES,
    SFT_ADAPTER_DIR,
    STAGING_DIR,
    damage,
    descends_from,
    holds_run,
    is_peft_model_card,
    latest_complete_checkpoint,
    legacy_run_entries,
    written_order,
)
from sft.training.identity import check_resumable, new_session, run_identity
from sft.training.interrupt import GracefulInterrupt
from sft.training.plots import plot_losses

DATA_REPORT_FILE = "data_report.json"

@dataclass
class Runtime:
    """Where and how this process trains; used as a context manager, it holds what the run holds
    (the output directory's writer lock) until the run ends, however it ends."""

    policy: DevicePolicy
    state: PartialState
    attention: str
    """The attention implementation the model loads with (``auto`` resolved for this device)."""
    held: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    logs_before: set[str] = field(default_factory=set)
    """The TensorBoard log folders (``runs/``) that were there before the run: not its own."""

    def __enter__(self) -> Runtime:  # noqa: PYI034
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.held.close()

    @property
    def main_process(self) -> bool:
        return self.state.is_main_process

    def say(self, *args: Any, **kwargs: Any) -> None:
        """Print on the main process only: one line per run, not one per process."""
        if self.main_process:
            print(*args, **kwargs)


def setup_runtime(config: SFTConfig) -> Runtime:
    """Device, precision and attention kernel, the process group under a launcher, TF32 on CUDA,
    the seed. What this machine cannot run is refused here, before any file is read or written."""
    policy = device_policy(config.training.device, config.model.dtype)
    attention = resolve_attention(config.model.attn_implementation, policy.device)
    if config.model.load_in_4bit:
        check_4bit_supported(policy.device)
    if config.training.report_to == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("report_to: tensorboard is not installed; run `pip install tensorboard`")
    # Under torchrun / accelerate launch this joins the process group (gloo on CPU, nccl on CUDA).
    state = PartialState(cpu=policy.device == "cpu")
    if policy.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 tensor cores for float32 matmuls (Ampere+)
        torch.backends.cudnn.allow_tf32 = True
    if policy.device == "cpu":
        keep_freed_cpu_memory()  # a step reuses the pages the step before freed
    set_seed(config.training.seed)
    runtime = Runtime(policy, state, attention)
    data = config.data
    if Path(data.val_file).resolve() == Path(data.train_file).resolve():
        runtime.say(f"warning: the validation file is the training file ({data.train_file}): the validation loss "
                    f"will measure memorization, not generalization. Pass the split's own --val-file.")
    return runtime


def prepare_output_dir(config: SFTConfig, runtime: Runtime, resume: str | None, overwrite: bool) -> str | None:
    """Check the output directory, lock it for the run's life, and return the checkpoint to resume
    from (None: a new run).

    A new run refuses a directory holding another run unless ``overwrite``, and then deletes only
    what that run's manifest lists and is still as written; it refuses a folder where a file it
    would write is not its own (:func:`start_new_run`). A resume checks that the configuration
    can continue the saved one and picks the newest intact checkpoint, saying which damaged ones
    it skipped."""
    output_dir = Path(config.training.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ConfigError(f"output_dir: {output_dir} is a file; choose a directory (--output-dir)")
    check_not_an_input(config, output_dir)
    problem = unwritable_reason(output_dir, create=True)
    if problem:
        raise ConfigError(f"output_dir: cannot write to {output_dir} ({problem}); choose another --output-dir")
    if runtime.main_process:
        runtime.held.enter_context(writer_lock(output_dir))
        remove_stale_staging(output_dir, STAGING_DIR)  # a killed run's; none can be a live one's now
        runtime.logs_before = set(os.listdir(output_dir / "runs")) if (output_dir / "runs").is_dir() else set()
    with runtime.state.main_process_first():  # the main process deletes a run being replaced before others look
        if resume is None:
            if runtime.main_process:
                start_new_run(output_dir, overwrite)
            return None
        checkpoint = resume_checkpoint(output_dir, resume, runtime)
        check_resumable(config, checkpoint)
        manifest = Manifest.load(output_dir)
        if runtime.main_process and not manifest.found:  # a run of an older sft, resumed: its files are ours
            manifest.record(*legacy_run_entries(output_dir))
        return str(checkpoint)


def check_not_an_input(config: SFTConfig, output_dir: Path) -> None:
    """Refuse an output directory that is the base model's folder, the SFT adapter's (DPO) or the
    folder of the data files: the run would write its files over theirs."""
    inputs = {"the base model's folder (--model)": config.model.model,
              "the SFT adapter's folder (--sft-adapter)": getattr(getattr(config, "dpo", None), "sft_adapter", None),
              "the folder of --train-file": Path(config.data.train_file).parent,
              "the folder of --val-file": Path(config.data.val_file).parent}
    for role, path in inputs.items():
        with contextlib.suppress(OSError, TypeError):
            if path is not None and os.path.samefile(output_dir, path):
                raise ConfigError(f"output_dir: {output_dir} is {role}; the run's files would replace its own. "
                                  f"Choose another --output-dir")


def run_writes(run_dir: Path, name: str) -> bool:
    """Whether a run writes an entry called ``name`` at the top of its folder (and would replace
    one there): its files, its checkpoints, a DPO run's SFT adapter copy, PEFT's model card."""
    return (name in RUN_FILES or name == SFT_ADAPTER_DIR or CHECKPOINT_NAME.match(name) is not None
            or (name == "README.md" and is_peft_model_card(run_dir / name)))


def start_new_run(output_dir: Path, overwrite: bool) -> None:
    """Make ``output_dir`` ready for a new run: with ``overwrite`` delete the previous run's
    entries its manifest lists (as far as they are as written); refuse while an entry the run
    would write is there and not the manifest's; then start a fresh manifest claiming the run's
    file names, so even a run killed before it records them leaves them known as its own."""
    manifest = Manifest.load(output_dir)
    if (manifest.present() or holds_run(output_dir)) and not overwrite:
        raise ConfigError(f"output_dir: {output_dir} holds another run; pass --resume to continue it, "
                          f"--overwrite-output-dir to replace it, or choose another --output-dir")
    kept = manifest.delete_all() if overwrite and manifest.found else []
    in_the_way = sorted(name for name in os.listdir(output_dir) if run_writes(output_dir, name))
    if in_the_way:
        shown = ", ".join(in_the_way[:8]) + (f" and {len(in_the_way) - 8} more" if len(in_the_way) > 8 else "")
        changed = f" ({len(kept)} of the previous run's entries changed since it wrote them)" if kept else ""
        legacy = ("" if manifest.found else f"; a run of an older sft kept no manifest ({MANIFEST_FILE}) of its "
                                            f"files: delete that run's files yourself")
        raise ConfigError(f"output_dir: {output_dir} holds {shown}, which this run would overwrite and which sft "
                          f"did not write{changed}; move them away or choose another --output-dir{legacy}")
    fresh = Manifest(output_dir, {}, found=False)
    fresh.claim(*RUN_FILES, SFT_ADAPTER_DIR)


def record_run_files(output_dir: Path, final: bool = False, also: tuple[str, ...] = ()) -> None:
    """Describe in the manifest the run's files now in ``output_dir`` (all ours: a new run refused
    any it did not write) and the entries ``also``; ``final``: the run has written all it will,
    and the names it claimed but did not write are no longer its own."""
    names = [name for name in os.listdir(output_dir) if run_writes(output_dir, name) and not CHECKPOINT_NAME.match(name)]
    claimed = [*RUN_FILES, SFT_ADAPTER_DIR] if final else []
    Manifest.load(output_dir).record(*dict.fromkeys([*names, *claimed, *also]))


def resume_checkpoint(output_dir: Path, resume: str, runtime: Runtime) -> Path:
    """The checkpoint ``--resume`` names (refused if damaged), or for ``latest`` the one written
    last in ``output_dir`` that is intact: a damaged one is named and skipped for the newest intact
    checkpoint it continues, never for one of a branch a rewind abandoned."""
    if resume != "latest":
        checkpoint = Path(resume)
        if not (checkpoint / "trainer_state.json").is_file():
            raise ConfigError(f"--resume: {checkpoint} is not a checkpoint directory (no trainer_state.json)")
        problem = damage(checkpoint)
        if problem:
            raise ConfigError(f"--resume: {checkpoint} is damaged: {problem}. Pass another checkpoint, or --resume "
                              f"alone for the newest intact one")
        return checkpoint
    found = written_order(output_dir)
    if latest_complete_checkpoint(output_dir) is None:
        raise ConfigError(f"--resume: no checkpoint-N directory in {output_dir} to resume from")
    skipped = None
    for checkpoint in reversed(found):
        if skipped is not None and not descends_from(skipped, checkpoint):
            continue  # of a branch abandoned by a rewind: not what the damaged one continued
        problem = damage(checkpoint)
        if problem is None:
            return checkpoint
        runtime.say(f"warning: skipping the damaged {checkpoint.name}: {problem}")
        skipped = checkpoint
    raise ConfigError(f"--resume: every checkpoint in {output_dir} is damaged (newest: {damage(found[-1])}); "
                      f"start a new run with --overwrite-output-dir")


def load_run_tokenizer(config: SFTConfig, runtime: Runtime) -> PreTrainedTokenizerBase:
    """The model's tokenizer with a chat template (the fallback where it has none) and a pad token,
    after checking that max_seq_length fits the model's positions."""
    model_path = resolve_model_path(config.model.model)
    max_positions = getattr(load_config(model_path, config.model.trust_remote_code), "max_position_embeddings", None)
    if max_positions is not None and config.data.max_seq_length > max_positions:
        raise ConfigError(f"data.max_seq_length: {config.data.max_seq_length} exceeds what {config.model.model} "
                          f"takes ({max_positions} positions)")
    tokenizer = load_tokenizer(model_path, config.model.trust_remote_code)
    if ensure_chat_template(tokenizer):
        runtime.say("The tokenizer has no chat template; using the Alpaca-style fallback (see sft/data/templates.py).")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # safe: labels are masked by position, never by pad id
    return tokenizer


def describe_layout(config: SFTConfig, runtime: Runtime) -> str:
    t, n, policy = config.training, runtime.state.num_processes, runtime.policy
    base = " (4-bit base)" if config.model.load_in_4bit else ""
    return (f"{n} process{'es' if n > 1 else ''} on {policy.device} in "
            f"{str(policy.compute_dtype).removeprefix('torch.')}{base}; "
            f"global batch = {t.batch_size} per process x {t.gradient_accumulation_steps} accumulation steps x {n} = "
            f"{t.batch_size * t.gradient_accumulation_steps * n} examples per optimizer step\n"
            f"{describe_precision(policy)}")


def load_lora_model(config: SFTConfig, runtime: Runtime,
                    prepare_base: Callable[[torch.nn.Module], torch.nn.Module] | None = None) -> PeftModel:
    """The base model in the policy's precision (NF4 for QLoRA) with fresh LoRA adapters;
    ``prepare_base`` may change the base first (DPO folds an SFT adapter into it)."""
    policy = runtime.policy
    model = load_model(resolve_model_path(config.model.model), policy.load_dtype, runtime.attention,
                       config.model.trust_remote_code,
                       load_in_4bit_compute=policy.compute_dtype if config.model.load_in_4bit else None,
                       device=policy.device)
    if prepare_base is not None:
        model = prepare_base(model)
    model.config.use_cache = False
    t = config.training
    if config.model.load_in_4bit:
        # QLoRA's preparation: norms and head in float32, and gradient checkpointing if asked.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=t.gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    elif t.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # Frozen embeddings give checkpointed blocks inputs that need no grad; LoRA then gets none.
        model.enable_input_require_grads()
    lora = config.lora
    check_lora_targets(model, lora, config.model.model)
    model = add_lora(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                       target_modules=peft_targets(lora), task_type="CAUSAL_LM"),
                     policy.device)
    fusion = fuse(model) if lora.fused else None
    _keep_users_readme(model)
    if runtime.main_process:
        model.print_trainable_parameters()
        if fusion is not None:
            runtime.say(fusion.line())
    return model


def _keep_users_readme(model: PeftModel) -> None:
    """PEFT merges its model card into any README.md of the folder it saves to; a README.md there
    that is not such a card is the user's (a run written into a project folder) and stays as it is."""
    update_card = model.create_or_update_model_card

    def create_or_update_model_card(output_dir: str) -> None:
        readme = Path(output_dir) / "README.md"
        if not readme.exists() or is_peft_model_card(readme):
            update_card(output_dir)

    model.create_or_update_model_card = create_or_update_model_card


def peft_targets(lora: LoraSettings) -> str | list[str]:
    """lora.target_modules as PEFT takes it: its "all-linear" is a string, names a list."""
    return ALL_LINEAR if lora.target_modules == [ALL_LINEAR] else lora.target_modules


def check_lora_targets(model: torch.nn.Module, lora: LoraSettings, model_name: str) -> None:
    """Each of lora_target_modules must name linear layers of the model (as PEFT matches them: the
    module's name or its dotted suffix), and lora_r must fit them. PEFT stops only when no name
    matches at all, so ``q_proj,foo_proj`` would train q_proj alone without a word; and a rank
    beyond a layer's size allocates a huge adapter that adds no capacity (the update's rank is at
    most the layer's smaller dimension). Checked on the loaded model, before adapters are added."""
    head = model.get_output_embeddings()
    linear = {name: module for name, module in model.named_modules()
              if isinstance(module, torch.nn.Linear) and module is not head}
    layer_names = sorted({name.rsplit(".", 1)[-1] for name in linear})
    for target in lora.target_modules:
        matched = [module for name, module in linear.items()
                   if target == ALL_LINEAR or name == target or name.endswith(f".{target}")]
        if not matched:
            raise ConfigError(f"lora_target_modules: {model_name} has no linear layer {target!r}"
                              f"{did_you_mean(target, layer_names)}; its linear layers are {', '.join(layer_names)}")
        smallest = min(min(module.in_features, module.out_features) for module in matched)
        if lora.r > smallest:
            layers = "linear" if target == ALL_LINEAR else target
            raise ConfigError(f"lora_r: {lora.r} exceeds {smallest}, the smaller dimension of the {layers} layers "
                              f"of {model_name}; choose at most {smallest} (--lora-r; 8 to 64 is usual)")


def save_run_files(config: SFTConfig, runtime: Runtime, data_report: dict[str, Any]) -> None:
    """The run's configuration (evaluation and chat read it back) and what tokenization did."""
    if not runtime.main_process:
        return
    output_dir = Path(config.training.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    config.save(output_dir / RUN_CONFIG_FILE)
    atomic_write_text(output_dir / DATA_REPORT_FILE, json.dumps(data_report, indent=2) + "\n")
    record_run_files(output_dir)


def _out_of_memory_advice(config: SFTConfig, device: str, exc: BaseException) -> str:
    t = config.training
    return (f"out of memory on {device} ({str(exc).splitlines()[0][:200]}). Lower --batch-size (now {t.batch_size}) "
            f"and raise --gradient-accumulation-steps (now {t.gradient_accumulation_steps}) to keep the same "
            f"effective batch, lower --max-seq-length (now {config.data.max_seq_length}), or turn on "
            f"--gradient-checkpointing true (now {str(t.gradient_checkpointing).lower()}).")


TORCH_WRITER = "inline_container"
"""torch.save reports a failed write (a full disk) as a RuntimeError of its zip writer,
inline_container.cc, not as an OSError."""


@contextlib.contextmanager
def explained_write_failures(args: TrainingArguments) -> Iterator[None]:
    """A write that fails while saving (a full disk, a file size limit) becomes one line of advice:
    what failed, the space left, and that the checkpoints saved before are intact."""
    try:
        yield
    except (OSError, RuntimeError, SafetensorError) as exc:  # safetensors writes the adapter; its errors are its own
        if isinstance(exc, RuntimeError) and TORCH_WRITER not in str(exc):
            raise
        reason = describe_os_error(exc) if isinstance(exc, OSError) else str(exc).splitlines()[0][:200]
        free_mb = shutil.disk_usage(args.output_dir).free // 2**20
        raise ResourceError(
            f"could not write to {args.output_dir} ({reason}). If the disk is full ({free_mb} MB free there), free "
            f"space or lower --save-total-limit (now {args.save_total_limit}); the checkpoints saved before are "
            f"intact, and the same command plus --resume continues from the newest.") from None


def run_guarded(trainer: Trainer, checkpoint: str | None, config: SFTConfig, runtime: Runtime) -> Any:
    """trainer.train() with Ctrl-C/SIGTERM saving a checkpoint and stopping, and out-of-memory
    errors and failed writes turned into advice."""
    trainer.run_identity = {**run_identity(config), **new_session(checkpoint)}
    interrupt = GracefulInterrupt()
    trainer.add_callback(interrupt)
    interrupt.install()
    try:
        with explained_write_failures(trainer.args):
            result = trainer.train(resume_from_checkpoint=checkpoint)
    except torch.OutOfMemoryError as exc:
        raise ResourceError(_out_of_memory_advice(config, runtime.policy.device, exc)) from None
    except RuntimeError as exc:
        if "out of memory" not in str(exc).lower():
            raise
        raise ResourceError(_out_of_memory_advice(config, runtime.policy.device, exc)) from None
    finally:
        interrupt.uninstall()
    if interrupt.signal_name is not None:
        checkpoint_dir = Path(config.training.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{trainer.state.global_step}"
        raise TrainingInterrupted(
            f"stopped by {interrupt.signal_name} at step {trainer.state.global_step}; the checkpoint is in "
            f"{checkpoint_dir}. Continue with the same command plus --resume.")
    return result


def final_metrics(trainer: Trainer, result: Any) -> dict[str, Any]:
    """The training metrics plus the validation loss at the last step (evaluated now if it was not)."""
    metrics = dict(result.metrics)
    if trainer.eval_dataset is not None:
        evals = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
        last_eval_is_final = evals and evals[-1]["step"] == trainer.state.global_step
        metrics.update(evals[-1] if last_eval_is_final else trainer.evaluate())
    return metrics


def finish(trainer: Trainer, metrics: dict[str, Any], runtime: Runtime) -> None:
    """Save the adapter, tokenizer and trainer state, draw the loss plot."""
    output_dir = Path(trainer.args.output_dir)
    before = set(os.listdir(output_dir))
    with explained_write_failures(trainer.args):
        trainer.save_model()
        trainer.save_state()
    trainer.log_metrics("final", metrics)
    if runtime.main_process:
        print(f"Loss plot: {plot_losses(trainer.args.output_dir)}")
        # What saving added (a tokenizer's files of other names) and the TensorBoard logs this run wrote.
        added = set(os.listdir(output_dir)) - before - {"runs"}
        logs = set(os.listdir(output_dir / "runs")) - runtime.logs_before if (output_dir / "runs").is_dir() else set()
        record_run_files(output_dir, final=True, also=(*sorted(added), *(f"runs/{name}" for name in sorted(logs))))
    report_unfused_groups(trainer.accelerator.unwrap_model(trainer.model), runtime)


def report_unfused_groups(model: torch.nn.Module, runtime: Runtime) -> None:
    """Say so when fused LoRA groups (q/k/v, gate/up) trained through PEFT's separate layers: the
    run is correct but slower than it could be, and the speed the user measures is not ours."""
    ran, groups = fused_group_counts(model)
    if ran < groups:
        runtime.say(f"Note: {groups - ran} of {groups} fused LoRA groups (q/k/v, gate/up) ran PEFT's separate layers "
                    f"instead, which is slower. That happens with adapters disabled or merged, several adapters "
                    f"active, DoRA, a quantized base, mixed dtypes without autocast, or weights sharded "
                    f"(FSDP); --lora-fused false turns fusing off.")

