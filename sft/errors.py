"""Every error a user can fix, and the one boundary every command runs under.

This module imports nothing from sft, so any layer can raise these types. A command's ``main``
hands its work to :func:`run_command`, which turns a user error (bad data, bad configuration, a
missing model, too little memory, a file system that refuses) into one ``error:`` line and exit
status 2, an interrupt into status 130, and only a genuine bug into a traceback.
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable


class UserError(Exception):
    """A problem the user can fix; the message says what and how."""


class ConfigError(UserError, ValueError):
    """A configuration that cannot be run; the message names the field and why."""


class DataError(UserError, ValueError):
    """A source or prepared file that cannot be used; the message names the file and line."""


class TemplateError(UserError, ValueError):
    """A chat template that cannot separate prompts from answers."""


class ModelNotFoundError(UserError, RuntimeError):
    """A model or adapter that cannot be loaded; the message says what to do."""


class ResourceError(UserError, RuntimeError):
    """The run needs more memory (or disk) than there is; the message says which knobs to turn."""


class NonFiniteLossError(UserError, RuntimeError):
    """The training loss became NaN or infinite; the message names the step and likely causes."""


class TrainingInterrupted(RuntimeError):
    """Training stopped on a signal after saving a checkpoint; the message says how to resume."""


INTERRUPTED_EXIT_STATUS = 130
USER_ERROR_EXIT_STATUS = 2
BUG_EXIT_STATUS = 1


def describe_os_error(exc: OSError) -> str:
    """An OSError in one line: what failed, on which path, and why."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    paths = [str(path) for path in (exc.filename, exc.filename2) if path is not None]
    return f"{' -> '.join(paths)}: {reason}" if paths else reason


def run_command(command: Callable[[], object]) -> int:
    """Run a command's work; the exit status a shell should see.

    0 on success; 2 with one ``error:`` line for anything the user can fix (our error types, and
    OSError: a full disk, a read-only or missing path); 130 after an interrupt; 1 with the
    traceback and a request to report it for anything else, which is a bug of ours."""
    try:
        command()
    except TrainingInterrupted as exc:
        print(f"interrupted: {exc}", file=sys.stderr)
        return INTERRUPTED_EXIT_STATUS
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return INTERRUPTED_EXIT_STATUS
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return USER_ERROR_EXIT_STATUS
    except OSError as exc:
        print(f"error: {describe_os_error(exc)}", file=sys.stderr)
        return USER_ERROR_EXIT_STATUS
    except Exception:  # noqa: BLE001 - the boundary: anything else is ours to fix
        traceback.print_exc()
        print("error: this is a bug in sft; please report it with the traceback above", file=sys.stderr)
        return BUG_EXIT_STATUS
    return 0
