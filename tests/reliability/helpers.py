"""What the reliability tests share: running a command as a user does, reading its one error
line, a read-only folder, damaging a file, and stopping a run at a given step."""

from __future__ import annotations

import contextlib
import os
import re
import resource
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

ROOT = Path(__file__).resolve().parents[2]


def run_python(*args: str, cwd: Path = ROOT, file_size_limit: int | None = None,
               timeout: float = 300) -> subprocess.CompletedProcess:
    """``python ARGS`` in a fresh process, as a user runs it. ``file_size_limit`` (bytes) makes
    any write beyond that size fail as a full disk does (RLIMIT_FSIZE: the write returns an
    error, which Python raises as OSError), so a "full disk" needs no special file system."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, resource.RLIM_INFINITY))

    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=env, preexec_fn=limit if file_size_limit is not None else None)


def error_line(stderr: str) -> str:
    """The one ``error:`` line a command printed (it may follow an unfinished progress bar on the
    same line); fails on a traceback or on several errors."""
    assert "Traceback" not in stderr, stderr
    lines = re.findall(r"error: .*", stderr)
    assert len(lines) == 1, stderr
    return lines[0]


def assert_user_error(status: int, stderr: str, *fragments: str) -> str:
    """Exit status 2 and one error line that names each of ``fragments``; returns the line."""
    line = error_line(stderr)
    assert status == 2, stderr
    for fragment in fragments:
        assert fragment in line, f"{fragment!r} not in {line!r}"
    return line


@contextlib.contextmanager
def read_only(directory: Path) -> Iterator[Path]:
    """``directory`` made unwritable for this process. Permission bits do not stop root, so as
    root the immutable attribute is set instead (skipping where chattr cannot set it)."""
    if os.geteuid() != 0:
        mode = directory.stat().st_mode
        directory.chmod(stat.S_IRUSR | stat.S_IXUSR)
        try:
            yield directory
        finally:
            directory.chmod(mode)
        return
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(directory)]).returncode != 0:
        pytest.skip("running as root where chattr +i is not available: no way to make a folder read-only")
    try:
        yield directory
    finally:
        subprocess.run(["chattr", "-i", str(directory)], check=True)


def truncate(path: Path, keep: float = 0.5) -> None:
    """Cut ``path`` to a fraction of its size, as a full disk or a kill during a copy leaves it."""
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


def cut_adapter(checkpoint: Path) -> Path:
    truncate(checkpoint / "adapter_model.safetensors")
    return checkpoint / "adapter_model.safetensors"


def cut_trainer_state(checkpoint: Path) -> Path:
    truncate(checkpoint / "trainer_state.json")
    return checkpoint / "trainer_state.json"


def cut_optimizer(checkpoint: Path) -> Path:
    truncate(checkpoint / "optimizer.pt", keep=0.9)
    return checkpoint / "optimizer.pt"


def delete_adapter(checkpoint: Path) -> Path:
    (checkpoint / "adapter_model.safetensors").unlink()
    return checkpoint / "adapter_model.safetensors"


DAMAGES: dict[str, Callable[[Path], Path]] = {
    # What --resume must survive in a checkpoint: each returns the damaged file.
    "truncated adapter": cut_adapter, "truncated trainer_state.json": cut_trainer_state,
    "truncated optimizer.pt": cut_optimizer, "deleted adapter": delete_adapter,
}


def assert_same_adapter(run: Path, reference: Path) -> None:
    final = load_file(run / "adapter_model.safetensors")
    expected = load_file(reference / "adapter_model.safetensors")
    assert final.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(final[name], tensor, rtol=1e-5, atol=1e-6)


class SignalAtStep(TrainerCallback):
    """Sends a signal to this process at the end of a given step, as Ctrl-C would."""

    def __init__(self, step: int, signum: int = signal.SIGINT):
        self.step, self.signum = step, signum

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), self.signum)


def inode(pattern: Path) -> int | None:
    """The inode of the entry matching ``pattern`` (a glob: the staging folder's name is the run's own)."""
    for path in pattern.parent.parent.glob(f"{pattern.parent.name}/{pattern.name}"):
        try:
            return path.stat().st_ino
        except FileNotFoundError:
            continue
    return None


def kill_after(process: subprocess.Popen, folder: Path, delay: float, timeout: float = 120) -> bool:
    """SIGKILL ``process`` ``delay`` seconds after it writes ``folder`` (a glob) anew (a damaged one
    of the same name may be there from before); False if the process had ended by then."""
    before = inode(folder)
    deadline = time.monotonic() + timeout
    while inode(folder) in (None, before) and process.poll() is None:
        assert time.monotonic() < deadline, f"{folder} did not appear"
        time.sleep(0.005)
    time.sleep(delay)
    ended_first = process.poll() is not None
    process.kill()
    process.wait()
    return not ended_first
