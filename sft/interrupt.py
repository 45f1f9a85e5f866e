"""Ctrl-C and SIGTERM during training: finish the step, save a checkpoint, stop.

The first signal asks the Trainer to save a checkpoint at the end of the current optimizer step
and stop, so nothing trained is lost and ``--resume`` continues exactly there. A second signal
exits at once (exit status 130), for when saving is not wanted or hangs.
"""

from __future__ import annotations

import os
import signal
import sys
from types import FrameType

from transformers import TrainerCallback

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class GracefulInterrupt(TrainerCallback):
    def __init__(self) -> None:
        self.signal_name: str | None = None
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
            print("\nSecond interrupt: exiting now without saving.", file=sys.stderr, flush=True)
            os._exit(130)
        self.signal_name = signal.Signals(signum).name
        print(f"\n{self.signal_name}: saving a checkpoint at the end of this step, then stopping "
              f"(interrupt again to exit at once).", file=sys.stderr, flush=True)

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
        if self.signal_name is not None:
            control.should_save = True
            control.should_training_stop = True
        return control
