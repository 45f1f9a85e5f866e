"""A file of answers appended as they complete, so a long generation resumes where it stopped.

Two files live side by side: the answers, one JSON object a line, and a small JSON of the
settings they were generated with and the seconds spent over all runs. The settings are written
before the first answer, so a rerun with other settings cannot mix its answers into the file;
the seconds are updated after each answer, so an interrupted run's time still counts. A last line
cut short by an interruption is dropped and its answer generated again. `sft ifeval` and
`sft sample` both keep their answers this way.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from sft.data.sources import decode_utf8, jsonl_values
from sft.errors import ConfigError, DataError
from sft.files import atomic_file, atomic_write_text


def _damaged(problem: str, path: Path) -> DataError:
    """``problem`` (which names the file) with what to do about an answers file of sft's own."""
    return DataError(f"{problem}; an answers file of sft (ifeval, sample) that cannot be read: generate it again "
                     f"(delete {path.parent} to start over)")


def read_state(path: Path) -> dict[str, Any]:
    """The settings and seconds an earlier run recorded ({} before the first)."""
    if not path.is_file():
        return {}
    try:
        state = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise _damaged(f"{path}: not UTF-8", path) from None
    except (json.JSONDecodeError, RecursionError) as exc:
        raise _damaged(f"{path}: not JSON ({getattr(exc, 'msg', exc)})", path) from None
    if not isinstance(state, dict) or not isinstance(state.get("seconds", 0.0), (int, float)) \
            or not isinstance(state.get("settings", {}), dict):
        raise _damaged(f"{path}: not an object with the generation's settings and seconds", path)
    return state


def read_saved_answers(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """``("<path>:<line>", record)`` of an answers file. A last line cut short by an interruption (no
    newline after it, perhaps not even whole characters) is dropped, and removed from the file so
    appending continues cleanly; anything else unreadable (not UTF-8, not JSON, not an answer
    record) is an error."""
    if not path.is_file():
        return []
    data = path.read_bytes()
    complete = data[:data.rfind(b"\n") + 1]
    if len(complete) < len(data):
        with atomic_file(path, "wb") as handle:  # a kill during this rewrite must not cost the answers before the cut
            handle.write(complete)
    try:
        values = list(jsonl_values(path, decode_utf8(path, complete)))
    except DataError as exc:
        raise _damaged(str(exc), path) from None
    saved = []
    for number, record in values:
        if not (isinstance(record, dict) and isinstance(record.get("response"), str)
                and isinstance(record.get("finished", False), bool) and isinstance(record.get("new_tokens", 0), int)):
            raise _damaged(f"{path}: line {number} is not an answer record (an object with a response, and finished "
                           f"and new_tokens where given)", path)
        saved.append((f"{path}:{number}", record))
    return saved


class AnswerLog:
    """The answers file and its settings file; refuses answers of other settings."""

    def __init__(self, answers_file: Path, settings_file: Path, settings: dict[str, Any]) -> None:
        answers_file.parent.mkdir(parents=True, exist_ok=True)
        saved = read_state(settings_file)
        if saved.get("settings", settings) != settings:
            raise ConfigError(f"{answers_file} holds answers generated with {saved['settings']}, not {settings}; "
                              f"pass another --out or delete {answers_file.parent}")
        self.answers_file, self.settings_file = answers_file, settings_file
        self.state = {"settings": settings, "seconds": saved.get("seconds", 0.0)}
        atomic_write_text(settings_file, json.dumps(self.state, indent=2) + "\n")

    def saved(self) -> list[tuple[str, dict[str, Any]]]:
        return read_saved_answers(self.answers_file)

    @contextlib.contextmanager
    def appending(self, total: int, done: int, desc: str) -> Iterator[Callable[[dict[str, Any]], None]]:
        """``save(record)``, which appends an answer record (with its ``new_tokens``) and moves a
        progress bar of ``total`` answers, ``done`` of them before, showing new tokens/s."""
        bar = tqdm(total=total, initial=done, unit="answer", disable=None, desc=desc)
        started, seconds_before, new_tokens = time.perf_counter(), self.state["seconds"], 0
        with self.answers_file.open("a", encoding="utf-8") as handle:
            def save(record: dict[str, Any]) -> None:
                nonlocal new_tokens
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
                handle.flush()
                elapsed = time.perf_counter() - started
                self.state["seconds"] = seconds_before + elapsed
                atomic_write_text(self.settings_file, json.dumps(self.state, indent=2) + "\n")
                new_tokens += record["new_tokens"]
                bar.set_postfix(new_tokens_per_s=f"{new_tokens / elapsed:.1f}")
                bar.update()

            yield save
        bar.close()
