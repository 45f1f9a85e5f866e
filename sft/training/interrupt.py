"""Ctrl-C and SIGTERM during training: finish the step, save a checkpoint, stop.

The first signal asks the Trainer to save a checkpoint at the end of the current optimizer step
and stop, so nothing trained is lost and ``--resume`` continues exactly there. A second signal
exits at once (exit status 130), for when saving is not wanted or hangs.

With several processes (torchrun, accelerate launch) the decision to stop is taken together at the
end of every step, so all processes save the same checkpoint and stop even when only one of them
got the signal. torchrun passes the terminal's Ctrl-C on to its workers, which the terminal has
signalled too, so a worker sees two signals for one key press: under a launcher (LOCAL_RANK set),
a second signal within SAME_INTERRUPT_SECONDS of the first counts as the same interrupt.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from types import FrameType

import torch
import torch.distributed as dist
from transformers import TrainerCallback

SIGNALS = (signal.SIGINT, signal.SIGTERM)
SAME_INTERRUPT_SECONDS = 2.0


class GracefulInterrupt(TrainerCallback):
    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._first_signal_at = 0.0
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        for signum in SIGNALS:
            self._previous[signum] = signal.signal(signum, self.handle)

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]
        self._previous.clear()

    def handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signal_name is not None:
            launched = "LOCAL_RANK" in os.environ
            if launched and time.monotonic() - self._first_signal_at < SAME_INTERRUPT_SECONDS:
                return  # the launcher passing the same Ctrl-C on
            print("\nSecond interrupt: exiting now without saving.", file=sys.stderr, flush=True)
            os._exit(130)
        self.signal_name = signal.Signals(signum).name
        self._first_signal_at = time.monotonic()
        print(f"\n{self.signal_name}: saving a checkpoint at the end of this step, then stopping "
              f"(interrupt again to exit at once).", file=sys.stderr, flush=True)

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
        if args.world_size > 1 and dist.is_available() and dist.is_initialized():
            flag = torch.tensor([self.signal_name is not None], dtype=torch.int32, device=args.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if flag.item() and self.signal_name is None:
                self.signal_name = "an interrupt of another process"
        if self.signal_name is not None:
            control.should_save = True
            control.should_training_stop = True
        return control
