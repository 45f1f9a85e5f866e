"""Data-parallel training on CPU (gloo): two processes must train what one process trains.

torchrun and accelerate launch each start two processes that train the tiny model with a
per-process batch of 1 and 2 accumulation steps: a global batch of 4, as the single-process
reference with one batch of 4. The steps stay within the first epoch (16 of 17 examples), where
both see the same examples per step; at an epoch's ragged end the launchers pad the last batch
with repeated examples, as every Trainer-based tool does.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file
from transformers import TrainerControl

from sft.config import build_config
from sft.recipes.sft import train
from sft.training.checkpoints import latest_complete_checkpoint
from sft.training.interrupt import GracefulInterrupt
from tests.tiny import as_flags, logged, tiny_run_overrides

STEPS = 4
SETTINGS = {"max_steps": STEPS, "lora_dropout": 0.0, "eval_steps": 2, "save_steps": 2, "seed": 7}


@pytest.fixture(scope="module")
def single(tiny_model_dir: Path, data: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    output_dir = tmp_path_factory.mktemp("single") / "out"
    train(build_config(None, tiny_run_overrides(tiny_model_dir, *data, output_dir, batch_size=4,
                                                gradient_accumulation_steps=1, **SETTINGS)))
    return output_dir


def _launch(launcher: list[str], tiny_model_dir: Path, data: tuple[Path, Path], output_dir: Path,
            *extra: str) -> subprocess.CompletedProcess:
    settings = tiny_run_overrides(tiny_model_dir, *data, output_dir, batch_size=1, gradient_accumulation_steps=2,
                                  **SETTINGS)
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run([*launcher, "-m", "sft.train_sft", *as_flags(settings), *extra], capture_output=True,
                          text=True, timeout=600, env=env, cwd=Path(__file__).resolve().parents[1])


def _history(output_dir: Path) -> tuple[dict[int, float], dict[int, float]]:
    return logged(output_dir), logged(output_dir, "eval_loss")


def _files(output_dir: Path) -> set[str]:
    """Relative paths, with the per-process RNG states (rng_state_0.pth ...) as one entry."""
    names = set()
    for path in output_dir.rglob("*"):
        name = str(path.relative_to(output_dir))
        names.add(name.rsplit("_", 1)[0] + ".pth" if path.name.startswith("rng_state_") else name)
    return names


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


LAUNCHERS = {  # the DDP preset runs CPU processes too (gloo), through the same torchrun launcher
    "torchrun": lambda port: [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                              "--master-port", str(port)],
    "accelerate": lambda port: [sys.executable, "-m", "accelerate.commands.launch",
                                "--config_file", "configs/accelerate/ddp.yaml", "--num_processes", "2",
                                "--main_process_port", str(port)],
}


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_two_processes_train_what_one_process_trains(launcher: str, single: Path, tiny_model_dir: Path,
                                                     data: tuple[Path, Path], tmp_path: Path) -> None:
    output_dir = tmp_path / "out"
    result = _launch(LAUNCHERS[launcher](_free_port()), tiny_model_dir, data, output_dir)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    # Only the main process prints and writes.
    assert result.stdout.count("Adapter saved to") == 1
    assert result.stdout.count("train: ") == 1
    assert "2 processes on cpu in float32; global batch = 1 per process x 2 accumulation steps x 2 = 4 examples" \
        in result.stdout
    assert (output_dir / "checkpoint-2" / "rng_state_1.pth").is_file()  # each process's RNG, for --resume
    assert _files(output_dir) == _files(single)

    # The same losses: training normalized over the supervised tokens of both processes, and the
    # validation loss over every validation token once.
    (losses, evals), (reference_losses, reference_evals) = _history(output_dir), _history(single)
    assert losses.keys() == reference_losses.keys() == set(range(1, STEPS + 1))
    assert losses == pytest.approx(reference_losses, rel=1e-5)
    assert evals.keys() == reference_evals.keys() == {0, 2, 4}
    assert evals == pytest.approx(reference_evals, rel=1e-6)

    adapter, reference = load_file(output_dir / "adapter_model.safetensors"), load_file(
        single / "adapter_model.safetensors")
    assert adapter.keys() == reference.keys()
    for name, tensor in reference.items():
        torch.testing.assert_close(adapter[name], tensor, rtol=1e-3, atol=1e-4)


def test_two_processes_resume_where_they_stopped(single: Path, tiny_model_dir: Path, data: tuple[Path, Path],
                                                tmp_path: Path) -> None:
    """A two-process run resumed from checkpoint-2 (one RNG state per process) ends where an
    uninterrupted run ends: the single-process reference, as the test above shows they agree."""
    first = tmp_path / "first"
    assert _launch(LAUNCHERS["torchrun"](_free_port()), tiny_model_dir, data, first).returncode == 0
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(first / "checkpoint-2", resumed / "checkpoint-2")
    result = _launch(LAUNCHERS["torchrun"](_free_port()), tiny_model_dir, data, resumed, "--resume")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert _history(resumed) == _history(first)  # the same losses, and no second evaluation at step 2
    adapter = load_file(resumed / "adapter_model.safetensors")
    for name, tensor in load_file(first / "adapter_model.safetensors").items():
        torch.testing.assert_close(adapter[name], tensor, rtol=1e-5, atol=1e-7)


def test_ctrl_c_on_a_torchrun_group_saves_one_checkpoint_for_all_processes(
        tiny_model_dir: Path, data: tuple[Path, Path], tmp_path: Path) -> None:
    """SIGINT to the whole process group, as Ctrl-C in a terminal sends it (torchrun passes it on
    as well, which the grace window of sft.training.interrupt absorbs when it lands during a long save):
    both workers save the same step's checkpoint and stop."""
    output_dir = tmp_path / "out"
    settings = tiny_run_overrides(tiny_model_dir, *data, output_dir, batch_size=1, max_steps=100_000,
                                  save_steps=2, eval_steps=100_000, logging_steps=1000, lora_dropout=0.0)
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    log = tmp_path / "log.txt"
    with log.open("w") as sink, subprocess.Popen(
            [*LAUNCHERS["torchrun"](_free_port()), "-m", "sft.train_sft", *as_flags(settings)], stdout=sink,
            stderr=subprocess.STDOUT, env=env, cwd=Path(__file__).resolve().parents[1],
            start_new_session=True) as launcher:
        try:
            deadline = time.monotonic() + 300
            # Any complete checkpoint: with steps this short, older ones are rotated away quickly.
            while not (output_dir.is_dir() and latest_complete_checkpoint(output_dir)):
                assert launcher.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.1)
            os.killpg(launcher.pid, signal.SIGINT)
            launcher.wait(timeout=120)
        finally:
            if launcher.poll() is None:
                os.killpg(launcher.pid, signal.SIGKILL)
    output = log.read_text()
    assert "stopped by SIGINT" in output and "Second interrupt" not in output, output[-3000:]
    last = latest_complete_checkpoint(output_dir)
    assert last is not None and int(last.name.split("-")[1]) >= 2
    assert {p.name for p in last.glob("rng_state_*.pth")} == {"rng_state_0.pth", "rng_state_1.pth"}
    assert not (output_dir / "adapter_model.safetensors").exists()  # not mistaken for a finished run


def test_a_different_global_batch_trains_something_else(tiny_model_dir: Path, data: tuple[Path, Path],
                                                        single: Path, tmp_path: Path) -> None:
    """Negative control for the test above: the comparison can tell runs apart."""
    output_dir = tmp_path / "out"
    train(build_config(None, tiny_run_overrides(tiny_model_dir, *data, output_dir, batch_size=2,
                                                gradient_accumulation_steps=1, **SETTINGS)))
    assert _history(output_dir)[0] != pytest.approx(_history(single)[0], rel=1e-5)


class _Args:
    def __init__(self, world_size: int) -> None:
        self.world_size, self.device = world_size, torch.device("cpu")


def _interrupt_worker(rank: int, port: int, results: dict) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    interrupt = GracefulInterrupt()
    if rank == 1:
        interrupt.signal_name = "SIGTERM"  # only this process got the signal
    control = interrupt.on_step_end(_Args(2), None, TrainerControl())
    results[rank] = (control.should_save, control.should_training_stop, interrupt.signal_name)
    dist.destroy_process_group()


def test_an_interrupt_of_one_process_stops_all_of_them_at_the_same_step() -> None:
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_interrupt_worker, args=(_free_port(), results), nprocs=2)
        assert results[0] == (True, True, "an interrupt of another process")
        assert results[1] == (True, True, "SIGTERM")


def _fsdp_worker(rank: int, port: int, model_dir: str, results: dict) -> None:
    from peft import LoraConfig, get_peft_model
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sft.data.collate import PackingCollator
    from sft.data.tokenize import encode_records
    from sft.training.loss import supervised_forward
    from tests.tiny import conversation_records

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    examples, _ = encode_records(tokenizer, conversation_records(8), 96, None, progress=False)
    batch = PackingCollator()(examples)

    def lora_model() -> torch.nn.Module:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        model.config.use_cache = False
        return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                                                target_modules=["q_proj", "v_proj", "down_proj"]))

    reference = lora_model()
    nll, _, _ = supervised_forward(reference, batch)
    nll.backward()
    expected = {name: p.grad for name, p in reference.named_parameters() if p.requires_grad}

    sharded = lora_model()
    for layer in sharded.base_model.model.model.layers:  # as the preset's TRANSFORMER_BASED_WRAP
        fully_shard(layer)
    fully_shard(sharded)
    sharded_nll, _, _ = supervised_forward(sharded, batch, logits_in_forward=True)
    sharded_nll.backward()
    errors = [float((p.grad.full_tensor() - expected[name]).abs().max())
              for name, p in sharded.named_parameters() if p.requires_grad]
    with torch.no_grad():
        eval_nll, _, _ = supervised_forward(sharded.eval(), batch, logits_in_forward=True)
    results[rank] = (float(nll), float(sharded_nll), float(eval_nll), max(errors), len(errors) == len(expected))
    dist.destroy_process_group()


def test_fsdp2_sharded_model_gives_the_unsharded_loss_and_lora_gradients(tiny_model_dir: Path) -> None:
    """The loss path the trainer takes under FSDP, on a model sharded by torch's fully_shard over
    two CPU processes (accelerate's FSDP launcher itself needs GPUs)."""
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_fsdp_worker, args=(_free_port(), str(tiny_model_dir), results), nprocs=2)
        for rank in (0, 1):
            nll, sharded_nll, eval_nll, max_error, all_lora = results[rank]
            assert sharded_nll == pytest.approx(nll, rel=1e-6) and eval_nll == pytest.approx(nll, rel=1e-6)
            assert all_lora and max_error < 1e-5
