"""Errors a user can fix, and the one way commands report them."""

from __future__ import annotations

import sys
from collections.abc import Callable

from sft.data.sources import DataError
from sft.models import ModelNotFoundError
from sft.sft_config import ConfigError
from sft.templates import TemplateError
from sft.trainer import NonFiniteLossError


class ResourceError(RuntimeError):
    """The run needs more memory than the device has; the message says which knobs to turn."""


class TrainingInterrupted(RuntimeError):
    """Training stopped on a signal after saving a checkpoint; the message says how to resume."""


USER_ERRORS = (ConfigError, DataError, ModelNotFoundError, TemplateError, ResourceError, NonFiniteLossError)
"""Bad input, bad configuration, a missing model, too little memory or a diverged loss: reported
in one line, without a traceback."""

INTERRUPTED_EXIT_STATUS = 130


def report_user_errors(command: Callable[[], object]) -> int:
    """Run a command; 0 when it succeeds, 2 with an ``error:`` line when the user can fix the cause."""
    try:
        command()
    except TrainingInterrupted as exc:
        print(f"interrupted: {exc}", file=sys.stderr)
        return INTERRUPTED_EXIT_STATUS
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
