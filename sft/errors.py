"""Errors a user can fix, and the one way commands report them."""

from __future__ import annotations

import sys
from collections.abc import Callable

from sft.data.sources import DataError
from sft.models import ModelNotFoundError
from sft.sft_config import ConfigError
from sft.templates import TemplateError

USER_ERRORS = (ConfigError, DataError, ModelNotFoundError, TemplateError)
"""Bad input, bad configuration or a missing model: reported in one line, without a traceback."""


def report_user_errors(command: Callable[[], object]) -> int:
    """Run a command; 0 when it succeeds, 2 with an ``error:`` line when the user can fix the cause."""
    try:
        command()
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
